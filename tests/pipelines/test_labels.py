"""Task labels on a hand-built cohort, the MEDS label schema, and the no-leakage guarantee."""

import sys
from datetime import datetime, timedelta
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from odyssey.cli import labels as labels_cli
from odyssey.io import read_json
from odyssey.pipelines import schema as S
from odyssey.pipelines.labels import make_labels
from odyssey.pipelines.tasks import TaskSet, UnknownTaskError, load_tasks
from odyssey.tokenizer import EHRTokenizer, TokenizeConfig, cut_at, load_sequences, tokenize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizer"))
from meds_events import admission, at, event, write_dataset  # noqa: E402

TASKS_YAML = Path(__file__).resolve().parents[2] / "configs" / "tasks.yaml"


def _stay(subject, encounter, start, end, codes=(), cls="IMP"):
    rows = admission(subject, encounter, start, end, cls=cls)
    rows += [event(subject, end, code, encounter=encounter) for code in codes]  # coded at discharge
    rows.append(event(subject, start + timedelta(hours=30), "LOINC//1", 1.0, encounter, issued=end))
    rows.append(event(subject, start + timedelta(hours=2), "LOINC//2", 2.0, encounter))
    return rows


def cohort() -> list[dict]:
    rows = []
    for subject in range(1, 8):
        rows.append(event(subject, datetime(1960, 1, 1), "MEDS_BIRTH"))
    rows += _stay(1, 1, at(0), at(8), ["ICD10CM//E11.9"])  # A
    rows += _stay(1, 2, at(20), at(22), ["ICD10CM//I50.9", "ICD9CM//25000", "ICD10CM//J44.1"])  # B
    rows += _stay(1, 3, at(90), at(95), ["ICD10CM//A41.9"])  # C
    rows += [event(1, at(100), "MEDS_DEATH")]
    rows += _stay(2, 4, at(0), at(3)) + [event(2, at(2), "MEDS_DEATH")]  # D: died in the stay
    rows += _stay(3, 5, at(0), at(0, 12))  # E: 12 h stay
    rows += _stay(3, 6, at(30, 12), at(40), ["ICD9CM//4280", "ICD9CM//486"])  # F: 30 days after E
    rows += admission(4, 7, at(5), at(6), cls="EMER") + [event(4, at(50), "ENCOUNTER_START//IMP", encounter=8)]
    rows += _stay(5, 9, at(0), at(2))  # G; H starts 30 days and 72 s after G ends, stays under 24 h
    rows += _stay(5, 10, at(32, 0.02), at(33), ["ICD10CM//E119", "ICD10CM//N18.3", "ICD10CM//J189", "SNOMED//I50"])
    rows += _stay(6, 11, at(0), at(4)) + _stay(6, 12, at(0), at(4))  # I1, I2: same times
    rows += [event(7, at(-400), "CPT//1")] + _stay(7, 13, at(0), at(1))  # an earlier outpatient event
    return rows


SUBJECT = {"A": 1, "B": 1, "C": 1, "D": 2, "E": 3, "F": 3, "G": 5, "H": 5, "I": 6, "J": 7}
ADMIT = {"A": at(0), "B": at(20), "C": at(90), "D": at(0), "E": at(0), "F": at(30, 12), "G": at(0)}
ADMIT |= {"H": at(32, 0.02), "I": at(0), "J": at(0)}
DISCHARGE = {"A": at(8), "B": at(22), "C": at(95), "D": at(3), "E": at(0, 12), "F": at(40), "G": at(2)}
DISCHARGE |= {"H": at(33), "I": at(4), "J": at(1)}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    data = write_dataset(root / "meds", cohort(), {s: "train" for s in range(1, 8)}, shards=2)
    report = make_labels(data, TASKS_YAML, root / "labels", progress=False)
    return data, root / "labels", report


def _read(folder: Path) -> dict[tuple[int, datetime], bool]:
    frame = pl.read_parquet(folder / "labels.parquet")
    return {(s, t): v for s, t, v in frame.iter_rows()}


def _expect(values: dict[str, bool], at_admission_plus: float | None = None) -> dict[tuple[int, datetime], bool]:
    def when(stay):
        if at_admission_plus is None:
            return DISCHARGE[stay]
        return ADMIT[stay] + timedelta(hours=at_admission_plus)

    return {(SUBJECT[stay], when(stay)): value for stay, value in values.items()}


def test_binary_labels(labelled):
    _, out, report = labelled
    assert _read(out / "mortality_30d") == _expect(
        {"A": False, "B": False, "C": True, "E": False, "F": False, "G": False, "H": False, "I": False, "J": False}
    )
    assert _read(out / "los_7d") == _expect(
        {"A": True, "B": False, "C": False, "D": False, "F": True, "G": False, "I": False, "J": False},
        at_admission_plus=24,  # J stayed exactly 24 h: kept
    )
    assert _read(out / "readmission_30d") == _expect(
        {"A": True, "B": False, "C": False, "E": True, "F": False, "G": False, "H": False, "I": False, "J": False}
    )
    mortality = report.tasks["mortality_30d"]
    assert mortality.admissions == 11 and mortality.excluded == {"died_during_stay": 1}
    assert mortality.duplicates == 1 and mortality.labels == 9 and mortality.positives == {"mortality_30d": 1}
    los = report.tasks["los_7d"]
    assert los.excluded == {"discharged_before_prediction": 2, "died_before_prediction": 0}  # E and H
    assert report.admissions_without_discharge == {"IMP": 1}


def test_condition_labels_multilabel_and_per_group(labelled):
    _, out, report = labelled
    wide = pl.read_parquet(out / "conditions" / "labels.parquet")
    got = {}
    for row in wide.iter_rows(named=True):
        got[(row["subject_id"], row["prediction_time"])] = {g for g in wide.columns[2:] if row[g]}
    assert got == _expect(
        {
            "A": {"heart_failure", "diabetes", "copd"},
            "B": {"sepsis"},
            "E": {"heart_failure", "pneumonia"},
            "G": {"diabetes", "chronic_kidney_disease", "pneumonia"},
        }
    )
    assert report.tasks["conditions"].excluded["no_next_admission"] == 6  # C, F, H, both I, J
    assert report.tasks["conditions"].positives["pneumonia"] == 2
    sepsis = _read(out / "conditions_sepsis")
    assert sepsis == _expect({"A": False, "B": True, "E": False, "G": False})
    manifest = read_json(out / "tasks.json")
    assert manifest["conditions"]["kind"] == "multilabel"
    assert manifest["conditions"]["groups"]["heart_failure"] == "[C0]"
    assert manifest["conditions_pneumonia"] == {
        "kind": "binary", "task": "conditions", "token": "[C5]", "group": "pneumonia"
    }  # fmt: skip
    assert manifest["mortality_30d"]["token"] == "[MOR_1M]"


def test_meds_label_schema(labelled):
    _, out, _ = labelled
    expected = meds.LabelSchema.schema()
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "conditions"):
        schema = pq.read_schema(folder / "labels.parquet")
        assert schema.names == ["subject_id", "prediction_time", "boolean_value"], folder.name
        for field in schema:
            assert field.type == expected.field(field.name).type
            assert not field.nullable


def test_unknown_task_lists_known_ones(labelled, tmp_path):
    data, _, _ = labelled
    with pytest.raises(UnknownTaskError, match="known tasks: mortality_30d, los_7d, readmission_30d, conditions"):
        make_labels(data, TASKS_YAML, tmp_path / "x", tasks=["mortality_1y"], progress=False)
    assert not (tmp_path / "x").exists()
    report = make_labels(data, TASKS_YAML, tmp_path / "y", tasks=["los_7d"], progress=False)
    assert list(report.tasks) == ["los_7d"] and (tmp_path / "y" / "los_7d").is_dir()


def test_task_yaml_validation(tmp_path):
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks:\n  t:\n    token: '[X]'\n    prediction_time: {anchor: discharge}\n    outcome: {kind: death}\n")
    with pytest.raises(ValueError, match="needs horizon_days"):
        load_tasks(bad)
    bad.write_text("tasks:\n  t:\n    prediction_time: {anchor: discharge}\n    outcome: {kind: next_admission_codes}\n")
    with pytest.raises(ValueError, match="no condition groups"):
        load_tasks(bad)


def _custom_tasks() -> TaskSet:
    spec = load_tasks(TASKS_YAML).model_dump()
    spec["tasks"]["sepsis_next_visit"] = {
        "token": "[SEPSIS]",
        "prediction_time": {"anchor": "discharge"},
        "outcome": {"kind": "event", "horizon_days": 80, "prefixes": ["ICD10CM//A41"]},
    }
    spec["tasks"]["before_admission"] = {  # inputs cut a week before admission: some have none
        "token": "[EARLY]",
        "prediction_time": {"anchor": "admission", "offset_hours": -24 * 7},
        "outcome": {"kind": "length_of_stay", "min_days": 7},
    }
    return TaskSet(**spec)


def test_user_defined_tasks_without_code(labelled, tmp_path):
    data, _, _ = labelled
    report = make_labels(data, _custom_tasks(), tmp_path / "l", progress=False)
    sepsis = _read(tmp_path / "l" / "sepsis_next_visit")
    assert sepsis[(1, at(22))] is True and sepsis[(1, at(8))] is False  # A41 coded at C (day 95)
    early = report.tasks["before_admission"]
    # Subject 7's outpatient event 400 days earlier is input; every other first admission has none.
    assert early.labels == 10 and early.without_usable_input == 5  # A, D, E, G, I


def test_no_token_after_prediction_time_for_every_task(labelled, tmp_path):
    """Build sequences, cut every label's input at its prediction time: nothing later survives."""
    data, _, _ = labelled
    label_dir = tmp_path / "l"
    report = make_labels(data, _custom_tasks(), label_dir, progress=False)
    tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer")
    rows = {r["subject_id"]: r for r in load_sequences(tmp_path / "seq").iter_rows(named=True)}
    events = pl.read_parquet(data / "data").filter(
        pl.col(S.TIME).is_not_null() & ~pl.col(S.CODE).is_in(["MEDS_BIRTH", "MEDS_DEATH"])
        & ~pl.col(S.CODE).str.starts_with("ENCOUNTER_END")
    )
    # Known when issued, never before it happened (E's late lab is "issued" at a discharge before its time).
    events = events.with_columns(pl.max_horizontal(S.ISSUED, S.TIME).alias("available"))
    checked = 0
    for task, counts in report.tasks.items():
        unusable = 0
        for subject, prediction_time, *_ in pl.read_parquet(label_dir / task / "labels.parquet").iter_rows():
            cut = cut_at(rows[subject], prediction_time)
            if cut is None:
                unusable += 1
                continue
            cutoff = np.datetime64(prediction_time, "us")
            assert (cut["event_times"] <= cutoff).all(), (task, subject, prediction_time)
            # The code tokens kept are exactly the subject's events available by then.
            known = events.filter((pl.col(S.SUBJECT_ID) == subject) & (pl.col("available") <= prediction_time))
            words = [w for w in tokenizer.decode(cut["input_ids"]) if not w.startswith("[")]
            assert sorted(w.rsplit("_", 1)[0] if w.startswith("LOINC") else w for w in words) == sorted(
                known[S.CODE].to_list()
            ), (task, subject, prediction_time)
            ids = cut["input_ids"].tolist()
            assert ids.count(tokenizer.token_to_id("[VS]")) == ids.count(tokenizer.token_to_id("[VE]"))
            assert tokenizer.decode(ids[-2:]) == ["[VE]", "[REG]"]
            checked += 1
        assert unusable == counts.without_usable_input, task
    assert checked > 40
    # The index visit's discharge diagnoses and late lab results are cut from the 24 h prediction.
    los = cut_at(rows[1], at(1))
    words = tokenizer.decode(los["input_ids"])
    assert "ICD10CM//E11.9" not in words and not any(w.startswith("LOINC//1") for w in words)
    assert any(w.startswith("LOINC//2") for w in words)


def test_cli(labelled, tmp_path):
    data, _, _ = labelled
    app = typer.Typer()
    labels_cli.register(app)

    @app.command("noop")
    def _noop() -> None:
        pass

    runner = CliRunner()
    ok = runner.invoke(
        app,
        ["labels", str(data), "--tasks", str(TASKS_YAML), "--out", str(tmp_path / "l"), "--task", "los_7d", "--no-progress"],
    )
    assert ok.exit_code == 0, ok.output
    assert read_json(tmp_path / "l" / "labels_report.json")["tasks"]["los_7d"]["labels"] == 8
    bad = runner.invoke(app, ["labels", str(data), "--tasks", str(TASKS_YAML), "--out", str(tmp_path / "m"), "--task", "x"])
    assert bad.exit_code == 2 and "known tasks" in bad.output


def test_labels_match_the_synthetic_cohort_truth(tmp_path):
    """synth → ingest → labels: every label equals truth.parquet's realized outcome, admission by admission."""
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.synth import synthesize

    synthesize(150, tmp_path / "fhir", seed=7, workers=1)
    ingest_fhir(tmp_path / "fhir", tmp_path / "meds", workers=1)
    report = make_labels(tmp_path / "meds", TASKS_YAML, tmp_path / "labels", progress=False)
    subject_map = pl.read_parquet(tmp_path / "meds" / S.SUBJECT_MAP_FILE)
    truth = pl.read_parquet(tmp_path / "fhir" / "truth.parquet").join(
        subject_map, left_on="patient_fhir_id", right_on="fhir_id", how="left"
    )
    assert truth["subject_id"].null_count() == 0
    discharge, after_24h = pl.col("discharge_time"), pl.col("admit_time") + pl.duration(hours=24)
    groups = list(load_tasks(TASKS_YAML).condition_groups)
    checks = [("mortality_30d", "mortality_30d", discharge), ("los_7d", "los_7d", after_24h)]
    checks += [("readmission_30d", "readmission_30d", discharge)]
    checks += [(f"conditions_{g}", f"condition_{g}", discharge) for g in groups]
    for folder, column, when in checks:
        expected = truth.filter(pl.col(column).is_not_null()).select(
            "subject_id", when.alias("prediction_time"), pl.col(column).alias("truth")
        )
        got = pl.read_parquet(tmp_path / "labels" / folder / "labels.parquet")
        joined = expected.join(got, on=["subject_id", "prediction_time"], how="full", coalesce=True)
        assert got.height == expected.height > 0, folder
        assert joined["boolean_value"].null_count() == 0 and joined["truth"].null_count() == 0, folder
        assert (joined["truth"] == joined["boolean_value"]).all(), folder
        assert expected["truth"].any(), folder  # the comparison sees positives too
    assert report.tasks["mortality_30d"].excluded["died_during_stay"] == truth["mortality_30d"].null_count()

    # The same cohort tokenized: every label's input, cut at its prediction time, holds nothing later.
    tokenize(tmp_path / "meds", tmp_path / "seq", progress=False)
    rows = {r["subject_id"]: r for r in load_sequences(tmp_path / "seq").iter_rows(named=True)}
    late_results = pl.read_parquet(tmp_path / "meds" / "data").filter(pl.col(S.ISSUED) > pl.col(S.TIME)).height
    assert late_results > 0  # labs reported after they were drawn exist, so `issued` matters
    for task in report.tasks:
        labels = pl.read_parquet(tmp_path / "labels" / task / "labels.parquet")
        for subject, prediction_time, *_ in labels.iter_rows():
            cut = cut_at(rows[subject], prediction_time)
            assert cut is not None
            assert (cut["event_times"] <= np.datetime64(prediction_time, "us")).all(), (task, subject)
