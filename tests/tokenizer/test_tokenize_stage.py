"""The tokenize stage: shards, chunks, output layout, report, CLI and bad input."""

import random

import pyarrow.parquet as pq
import pytest
import typer
from meds_events import admission, at, event, write_dataset
from typer.testing import CliRunner

from odyssey.cli import tokenize as tokenize_cli
from odyssey.io import read_json
from odyssey.pipelines.meds_io import MedsFormatError
from odyssey.tokenizer import SEQUENCE_SCHEMA, TokenizeConfig, load_sequences, tokenize


def _cohort(n_subjects=12, seed=0):
    rng = random.Random(seed)
    rows, splits = [], {}
    for subject in range(n_subjects):
        splits[subject] = ("train", "tuning", "held_out")[subject % 3]
        rows.append(event(subject, at(-365 * 50), "MEDS_BIRTH"))
        for visit in range(rng.randint(1, 4)):
            start = at(visit * 20 + rng.random())
            encounter = subject * 10 + visit
            rows += admission(subject, encounter, start, start.replace(hour=20))
            rows += [event(subject, start.replace(hour=12), "LOINC//7", rng.gauss(5, 1), encounter) for _ in range(3)]
            rows.append(event(subject, start.replace(hour=20), f"ICD10CM//I{rng.randint(10, 12)}", encounter=encounter))
    return rows, splits


def test_chunks_and_shards_do_not_change_the_sequences(tmp_path):
    rows, splits = _cohort()
    one = write_dataset(tmp_path / "one", rows, splits, shards=1)
    three = write_dataset(tmp_path / "three", rows, splits, shards=3)
    base = tokenize(one, tmp_path / "s1", TokenizeConfig(min_code_count=1), progress=False)
    chunked = tokenize(three, tmp_path / "s3", TokenizeConfig(min_code_count=1, max_rows_per_chunk=15), progress=False)
    parallel = tokenize(
        three, tmp_path / "s3p", TokenizeConfig(min_code_count=1, max_rows_per_chunk=15, workers=2), progress=False
    )
    assert chunked.parts > 3 and base.parts == 1 and parallel.parts == chunked.parts
    first = load_sequences(tmp_path / "s1").sort("subject_id")
    second = load_sequences(tmp_path / "s3").sort("subject_id")
    assert first.equals(second)
    assert load_sequences(tmp_path / "s3p").sort("subject_id").equals(first)
    assert (parallel.tokens, parallel.subjects_per_split) == (base.tokens, base.subjects_per_split)
    assert (tmp_path / "s1" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "s3" / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert base.events == len(rows) and base.subjects == 12
    assert base.tokens == sum(len(ids) for ids in first["input_ids"].to_list())
    assert load_sequences(tmp_path / "s1", split="tuning")["subject_id"].to_list() == [1, 4, 7, 10]


def test_output_schema_and_report(tmp_path):
    rows, splits = _cohort(6)
    data = write_dataset(tmp_path / "meds", rows, splits)
    tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1), progress=False)
    part = next((tmp_path / "seq" / "sequences").glob("part-*.parquet"))
    assert pq.read_schema(part).remove_metadata() == SEQUENCE_SCHEMA
    report = read_json(tmp_path / "seq" / "tokenize_report.json")
    assert report["subjects_per_split"] == {"held_out": 2, "train": 2, "tuning": 2}
    assert report["config"]["availability"] == "issued"


def test_without_splits_everyone_is_train(tmp_path):
    rows, _ = _cohort(4)
    data = write_dataset(tmp_path / "meds", rows, None)
    report = tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1), progress=False)
    assert not report.has_splits and report.subjects_per_split == {"train": 4}
    assert any("subject_splits" in note for note in report.notes)


def test_bad_input_leaves_no_output(tmp_path):
    rows, splits = _cohort(4)
    data = write_dataset(tmp_path / "meds", rows, splits)
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), shard)
    with pytest.raises(MedsFormatError, match="0.parquet: row 1"):
        tokenize(data, tmp_path / "seq", TokenizeConfig(), progress=False)
    assert not (tmp_path / "seq").exists()


def test_cli(tmp_path):
    rows, splits = _cohort(4)
    data = write_dataset(tmp_path / "meds", rows, splits)
    app = typer.Typer()
    tokenize_cli.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    runner = CliRunner()
    result = runner.invoke(
        app, ["tokenize", str(data), "--out", str(tmp_path / "seq"), "--min-code-count", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "tokenized" in result.output
    assert read_json(tmp_path / "seq" / "tokenize_report.json")["config"]["min_code_count"] == 1
    bad = runner.invoke(app, ["tokenize", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a MEDS dataset" in bad.output
    config = tmp_path / "bad.yaml"
    config.write_text("n_bins: many\n")
    bad = runner.invoke(app, ["tokenize", str(data), "--out", str(tmp_path / "x"), "--config", str(config)])
    assert bad.exit_code == 2 and "n_bins" in bad.output


def test_foreign_meds_dataset_with_core_columns_only(tmp_path):
    """A MEDS dataset from another ETL (no encounter_id, event_type or issued): day visits, types from codes."""
    import polars as pl
    from meds_events import frame

    rows = [event(1, None, "GENDER//male"), event(1, at(-9000), "MEDS_BIRTH")]
    rows += [event(1, at(0), "ICD10CM//I10"), event(1, at(0, 3), "LOINC//1", 4.0), event(1, at(9), "NDC//5")]
    (tmp_path / "meds" / "data").mkdir(parents=True)
    core = frame(rows).select("subject_id", "time", "code", "numeric_value")
    core.sort("subject_id", "time", nulls_last=False).write_parquet(tmp_path / "meds" / "data" / "0.parquet")
    tokenize(tmp_path / "meds", tmp_path / "seq", TokenizeConfig(min_code_count=1, n_bins=1), progress=False)
    row = load_sequences(tmp_path / "seq").row(0, named=True)
    from odyssey.tokenizer import EHRTokenizer, TokenType

    words = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer").decode(row["input_ids"])
    assert words == ["[CLS]", "GENDER//male", "[VS]", "ICD10CM//I10", "LOINC//1", "[VE]", "[REG]",
                     "[W_1]", "[VS]", "NDC//5", "[VE]", "[REG]"]  # fmt: skip
    assert row["token_type_ids"][3:5] == [TokenType.CONDITION, TokenType.LAB]
    assert pl.Series(row["ages"]).min() > 24
