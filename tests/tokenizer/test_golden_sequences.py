"""Golden sequences for hand-built subjects: tokens, types, ages, times, visits, gaps and event times."""

from datetime import datetime, timedelta

import numpy as np
import pytest
from meds_events import BASE, admission, at, event, write_dataset

from odyssey.tokenizer import EHRTokenizer, TokenizeConfig, TokenType, load_sequences, tokenize

BIRTH = datetime(1980, 1, 1)
LAB = "LOINC//2160-0"


def golden_rows() -> list[dict]:
    rows = [event(1, None, "GENDER//female"), event(1, BIRTH, "MEDS_BIRTH")]
    # An emergency stay that overlaps the inpatient stay: both merge into visit 1.
    rows += admission(1, 11, at(0, -6), at(0, 1), cls="EMER")
    rows += admission(1, 10, at(0), at(3), disposition="home")
    rows += [
        event(1, at(0, 2), LAB, 1.0, 10, issued=at(0, 4)),
        event(1, at(0, 2), "RXNORM//197361", encounter=10),
        event(1, at(1), "CPT//99213"),  # no encounter, inside visit 1
        event(1, at(3), "ICD10CM//I50.9", encounter=10),  # coded at discharge
        # No encounter, outside any stay: an outpatient day-visit 7 days and 1 hour after discharge.
        event(1, at(10, 1), LAB, 3.0),
        event(1, at(10, 7), LAB, 2.0),
        event(1, at(20), "MEDS_DEATH"),
    ]
    rows += [event(2, None, "GENDER//male"), event(2, BIRTH, "MEDS_BIRTH")]  # nothing to tokenize
    rows += admission(3, 30, at(5), at(6)) + [event(3, at(5, 1), "ICD10CM//Z99.9", encounter=30)]
    return rows


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    data = write_dataset(root / "meds", golden_rows(), {1: "train", 2: "held_out", 3: "tuning"})
    config = TokenizeConfig(min_code_count=1, n_bins=2)
    report = tokenize(data, root / "seq", config, progress=False)
    tokenizer = EHRTokenizer.from_pretrained(root / "seq" / "tokenizer")
    frame = load_sequences(root / "seq")
    return report, tokenizer, {r["subject_id"]: r for r in frame.iter_rows(named=True)}


def test_golden_subject(golden):
    _, tokenizer, rows = golden
    row = rows[1]
    expected = [
        ("[CLS]", TokenType.SPECIAL, 0, 0, at(0, -6), at(0, -6)),
        ("GENDER//female", TokenType.DEMOGRAPHIC, 0, 0, at(0, -6), at(0, -6)),
        ("[VS]", TokenType.SPECIAL, 1, 0, at(0, -6), at(0, -6)),
        ("ENCOUNTER_START//EMER", TokenType.ENCOUNTER, 1, 1, at(0, -6), at(0, -6)),
        ("ENCOUNTER_START//IMP", TokenType.ENCOUNTER, 1, 1, at(0), at(0)),
        ("RXNORM//197361", TokenType.MEDICATION, 1, 1, at(0, 2), at(0, 2)),  # medication before lab
        (f"{LAB}_0", TokenType.LAB, 1, 1, at(0, 2), at(0, 4)),  # known when issued
        ("CPT//99213", TokenType.PROCEDURE, 1, 1, at(1), at(1)),
        ("ICD10CM//I50.9", TokenType.CONDITION, 1, 1, at(3), at(3)),
        ("[VE]", TokenType.SPECIAL, 1, 0, at(3), at(3)),
        ("[REG]", TokenType.SPECIAL, 1, 0, at(3), at(3)),
        ("[W_1]", TokenType.TIME_GAP, 2, 0, at(10, 1), at(10, 1)),
        ("[VS]", TokenType.SPECIAL, 2, 0, at(10, 1), at(10, 1)),
        (f"{LAB}_1", TokenType.LAB, 2, 2, at(10, 1), at(10, 1)),  # 3.0 > median 2.0
        (f"{LAB}_0", TokenType.LAB, 2, 2, at(10, 7), at(10, 7)),  # 2.0 is not above the cut point
        ("[VE]", TokenType.SPECIAL, 2, 0, at(10, 7), at(10, 7)),
        ("[REG]", TokenType.SPECIAL, 2, 0, at(10, 7), at(10, 7)),
    ]
    assert tokenizer.decode(row["input_ids"]) == [e[0] for e in expected]
    assert row["token_type_ids"] == [int(e[1]) for e in expected]
    assert row["visit_orders"] == [e[2] for e in expected]
    assert row["visit_segments"] == [e[3] for e in expected]
    assert row["event_times"] == [e[5] for e in expected]
    first = at(0, -6)
    days = [(e[4] - first) / timedelta(days=1) for e in expected]
    np.testing.assert_allclose(row["times"], days, rtol=1e-6)
    years = [(e[4] - BIRTH) / timedelta(days=365.25) for e in expected]
    np.testing.assert_allclose(row["ages"], years, rtol=1e-6)
    assert row["split"] == "train"


def test_death_birth_and_discharge_disposition_never_become_tokens(golden):
    _, tokenizer, _ = golden
    for word in tokenizer.get_vocab():
        assert not word.startswith(("MEDS_DEATH", "MEDS_BIRTH", "ENCOUNTER_END"))


def test_unknown_codes_and_subjects_without_events(golden):
    report, tokenizer, rows = golden
    assert tokenizer.token_to_id("ICD10CM//Z99.9") is None  # only a tuning subject has it
    assert tokenizer.decode(rows[3]["input_ids"])[:5] == ["[CLS]", "[VS]", "ENCOUNTER_START//IMP", "[UNK]", "[VE]"]
    assert rows[3]["token_type_ids"][3] == TokenType.CONDITION  # [UNK] keeps its event's type
    assert rows[3]["split"] == "tuning"
    assert 2 not in rows
    assert report.subjects_without_events == 1
    assert report.subjects == 2
    assert report.unknown_tokens == 1
    assert report.subjects_per_split == {"train": 1, "tuning": 1}
    assert report.subjects_without_birth == 1  # subject 3 has no MEDS_BIRTH: ages are 0
    assert set(rows[3]["ages"]) == {0.0}


GAPS = [0, 6, 7, 27, 28, 29, 30, 59, 364, 365, 366]
GAP_TOKENS = ["[W_0]", "[W_0]", "[W_1]", "[W_3]", "[M_1]", "[M_1]", "[M_1]", "[M_1]", "[M_12]", "[M_12]", "[LT]"]


def test_gap_tokens_at_every_boundary(tmp_path):
    rows, start = [], BASE
    for k, gap in enumerate([None, *GAPS]):
        if gap is not None:
            start = start + timedelta(days=gap, hours=2)  # whole days between the visits: `gap`
        end = start + timedelta(hours=1)
        rows += admission(7, 100 + k, start, end, cls="AMB")
        start = end
    data = write_dataset(tmp_path / "meds", rows, {7: "train"})
    tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer")
    words = tokenizer.decode(load_sequences(tmp_path / "seq").row(0, named=True)["input_ids"])
    assert [w for w in words if w.startswith(("[W_", "[M_", "[LT"))] == GAP_TOKENS
    assert words.count("[VS]") == len(GAPS) + 1
    assert words[-5:] == ["[LT]", "[VS]", "ENCOUNTER_START//AMB", "[VE]", "[REG]"]


def test_touching_encounters_merge_and_same_day_orphans_form_one_visit(tmp_path):
    rows = admission(8, 1, at(0), at(1)) + admission(8, 2, at(1), at(2))  # second starts as first ends
    rows += [event(8, at(30), "CPT//1"), event(8, at(30, 5), "CPT//2"), event(8, at(31), "CPT//3")]
    data = write_dataset(tmp_path / "meds", rows, {8: "train"})
    report = tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer")
    row = load_sequences(tmp_path / "seq").row(0, named=True)
    words = tokenizer.decode(row["input_ids"])
    assert words == [
        "[CLS]", "[VS]", "ENCOUNTER_START//IMP", "ENCOUNTER_START//IMP", "[VE]", "[REG]",
        "[M_1]", "[VS]", "CPT//1", "CPT//2", "[VE]", "[REG]",
        "[W_0]", "[VS]", "CPT//3", "[VE]", "[REG]",
    ]  # fmt: skip
    assert report.visits == 3
    assert row["visit_segments"][8:10] == [2, 2] and row["visit_segments"][14] == 1
