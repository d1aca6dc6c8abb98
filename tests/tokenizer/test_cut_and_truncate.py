"""Cutting a stored sequence at a prediction time, truncating it, and prompting it with a task token."""

from datetime import datetime, timedelta

import numpy as np
import pytest
from meds_events import admission, at, event, write_dataset

from odyssey.tokenizer import (
    EHRTokenizer,
    SpecialTokens,
    TokenizeConfig,
    TokenType,
    append_task_token,
    cut_at,
    load_sequences,
    prepare_input,
    tokenize,
    truncate,
)

BIRTH = datetime(1950, 1, 1)


def _rows():
    rows = [event(1, None, "GENDER//male"), event(1, BIRTH, "MEDS_BIRTH")]
    rows += admission(1, 10, at(0), at(10))
    rows += [
        event(1, at(0, 2), "LOINC//1", 1.0, 10, issued=at(1, 4)),  # reported 28 h after admission
        event(1, at(0, 4), "LOINC//2", 1.0, 10, issued=at(0, 6)),
        event(1, at(10), "ICD10CM//I50.9", encounter=10),  # coded at discharge
    ]
    rows += admission(1, 11, at(40), at(42)) + [event(1, at(41), "NDC//1", encounter=11)]
    return rows


def _sequence(tmp_path, availability="issued"):
    data = write_dataset(tmp_path / "meds", _rows(), {1: "train"})
    out = tmp_path / f"seq-{availability}"
    tokenize(data, out, TokenizeConfig(min_code_count=1, n_bins=1, availability=availability), progress=False)
    return EHRTokenizer.from_pretrained(out / "tokenizer"), load_sequences(out).row(0, named=True)


def test_cut_inside_the_index_visit_closes_it_at_the_prediction_time(tmp_path):
    tokenizer, row = _sequence(tmp_path)
    cutoff = at(1)  # admission + 24 h
    cut = cut_at(row, cutoff)
    assert tokenizer.decode(cut["input_ids"]) == [
        "[CLS]", "GENDER//male", "[VS]", "ENCOUNTER_START//IMP", "LOINC//2", "[VE]", "[REG]"
    ]  # fmt: skip
    assert (cut["event_times"] <= np.datetime64(cutoff, "us")).all()
    assert cut["event_times"][-1] == np.datetime64(cutoff, "us")
    np.testing.assert_allclose(cut["times"][-2:], [1.0, 1.0])
    age_at_cut = (cutoff - BIRTH) / timedelta(days=365.25)
    np.testing.assert_allclose(cut["ages"][-2:], [age_at_cut] * 2, rtol=1e-6)
    assert list(cut["visit_orders"][-2:]) == [1, 1]
    assert list(cut["visit_segments"][-2:]) == [0, 0]
    assert list(cut["token_type_ids"][-2:]) == [TokenType.SPECIAL] * 2


def test_availability_time_keeps_results_drawn_before_the_cut(tmp_path):
    tokenizer, row = _sequence(tmp_path, availability="time")
    words = tokenizer.decode(cut_at(row, at(1))["input_ids"])
    assert "LOINC//1" in words and "ICD10CM//I50.9" not in words


def test_cut_at_discharge_keeps_the_visit_and_nothing_later(tmp_path):
    tokenizer, row = _sequence(tmp_path)
    cut = cut_at(row, at(10))
    words = tokenizer.decode(cut["input_ids"])
    assert words[-5:] == ["LOINC//1", "LOINC//2", "ICD10CM//I50.9", "[VE]", "[REG]"]  # by time drawn
    assert "[M_1]" not in words and "NDC//1" not in words  # the gap token belongs to the next visit
    assert words.count("[VE]") == 1
    assert cut_at(row, at(100))["input_ids"].tolist() == row["input_ids"]
    assert tokenizer.decode(row["input_ids"])[-6:] == ["[M_1]", "[VS]", "ENCOUNTER_START//IMP", "NDC//1", "[VE]", "[REG]"]


def test_nothing_known_yet_gives_none(tmp_path):
    _, row = _sequence(tmp_path)
    assert cut_at(row, at(0) - timedelta(seconds=1)) is None
    assert prepare_input(row, at(-3), 16, SpecialTokens.MOR_1M) is None
    with pytest.raises(ValueError, match="tz"):
        from datetime import UTC

        cut_at(row, datetime(2020, 1, 2, tzinfo=UTC))


def test_truncate_keeps_header_and_starts_at_a_visit(tmp_path):
    tokenizer, row = _sequence(tmp_path)
    full = tokenizer.decode(row["input_ids"])
    assert truncate(row, len(full))["input_ids"].tolist() == row["input_ids"]
    short = truncate(row, 9)
    words = tokenizer.decode(short["input_ids"])
    assert words == ["[CLS]", "GENDER//male", "[VS]", "ENCOUNTER_START//IMP", "NDC//1", "[VE]", "[REG]"]
    assert short["event_times"][2] == np.datetime64(at(40), "us")
    # Shorter than the last visit: [VS] of that visit, then its newest tokens.
    tiny = tokenizer.decode(truncate(row, 5)["input_ids"])
    assert tiny == ["[CLS]", "GENDER//male", "[VS]", "[VE]", "[REG]"]


def test_prepare_input_appends_the_task_token_within_the_length(tmp_path):
    tokenizer, row = _sequence(tmp_path)
    prompt = prepare_input(row, at(10), max_length=8, task_token_id=SpecialTokens.MOR_1M)
    words = tokenizer.decode(prompt["input_ids"])
    assert len(words) == 8
    assert words[:3] == ["[CLS]", "GENDER//male", "[VS]"]
    assert words[-3:] == ["[VE]", "[REG]", "[MOR_1M]"]
    assert prompt["token_type_ids"][-1] == TokenType.TASK
    assert prompt["event_times"][-1] == prompt["event_times"][-2]
    lengths = {len(prompt[k]) for k in prompt if k not in ("subject_id", "split")}
    assert lengths == {8}
    assert append_task_token(row, SpecialTokens.LOS_1W)["input_ids"][-1] == SpecialTokens.LOS_1W
