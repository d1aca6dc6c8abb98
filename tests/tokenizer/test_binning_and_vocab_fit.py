"""Value bins and the vocabulary are fitted on the train split only."""

import random

import numpy as np
import polars as pl
import pytest
from meds_events import admission, at, event, write_dataset

from odyssey.tokenizer import EHRTokenizer, TokenizeConfig, load_sequences, tokenize
from odyssey.tokenizer.binning import bin_index, fit_bins


def test_fit_bins_quantiles_and_collapsing_cut_points():
    values = pl.DataFrame(
        {
            "code": ["a"] * 101 + ["flat"] * 10 + ["rare"] * 2,
            "numeric_value": [float(v) for v in range(101)] + [5.0] * 10 + [1.0, 2.0],
        },
        schema_overrides={"numeric_value": pl.Float32},
    )
    bins = {code: breaks for code, breaks in fit_bins(values.lazy(), n_bins=5, min_count=3).iter_rows()}
    assert bins["a"] == [20.0, 40.0, 60.0, 80.0]
    assert bins["flat"] == [5.0]  # four equal cut points collapse: two bins
    assert "rare" not in bins  # fewer values than min_count
    probe = pl.DataFrame({"v": [0.0, 20.0, 20.5, 80.0, 80.1, 1000.0, None]}, schema={"v": pl.Float32})
    got = probe.with_columns(pl.lit([20.0, 40.0, 60.0, 80.0]).alias("b")).select(
        bin_index(pl.col("v"), pl.col("b"), 4).alias("k")
    )
    assert got["k"].to_list() == [0, 0, 1, 3, 4, 4, None]


def _cohort(seed: int, other_values_scale: float, other_codes: list[str]) -> tuple[list[dict], dict[int, str]]:
    """Train subjects 0-9 fixed; tuning/held_out subjects 10-19 vary with `seed`."""
    rng = random.Random(0)
    rows, splits = [], {}
    for subject in range(10):
        splits[subject] = "train"
        rows += admission(subject, 1000 + subject, at(subject), at(subject + 2))
        rows += [event(subject, at(subject, 1), "LOINC//1", rng.uniform(0, 10), 1000 + subject) for _ in range(5)]
        rows += [event(subject, at(subject, 2), "ICD10CM//I10", encounter=1000 + subject)]
    other_rng = random.Random(seed)
    for subject in range(10, 20):
        splits[subject] = "tuning" if subject % 2 else "held_out"
        rows += admission(subject, 1000 + subject, at(subject), at(subject + 2))
        value = 10 + other_rng.uniform(0, 10) * other_values_scale  # above every train value
        rows += [event(subject, at(subject, 1), "LOINC//1", value, 1000 + subject)]
        rows += [event(subject, at(subject, 2), code, encounter=1000 + subject) for code in other_codes]
    return rows, splits


def test_changing_tuning_and_held_out_data_changes_nothing_in_vocab_or_bins(tmp_path):
    config = TokenizeConfig(min_code_count=2, n_bins=5)
    outputs = []
    for k, (seed, scale, codes) in enumerate([(1, 1.0, []), (2, 1000.0, ["ICD10CM//E11", "ICD10CM//E11", "NDC//1"])]):
        rows, splits = _cohort(seed, scale, codes)
        data = write_dataset(tmp_path / f"meds{k}", rows, splits)
        tokenize(data, tmp_path / f"seq{k}", config, progress=False)
        outputs.append(tmp_path / f"seq{k}" / "tokenizer")
    for name in ("tokenizer.json", "odyssey_tokenizer.json"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes()
    tokenizer = EHRTokenizer.from_pretrained(outputs[1])
    assert tokenizer.token_to_id("ICD10CM//E11") is None
    assert len(tokenizer.bins["LOINC//1"]) == 4
    # Train subjects' sequences are identical too; held-out values far above the train range go to the top bin.
    first, second = (load_sequences(p.parent, split="train").sort("subject_id") for p in outputs)
    assert first.equals(second)
    held_out = load_sequences(outputs[1].parent, split="held_out")
    words = {w for ids in held_out["input_ids"].to_list() for w in tokenizer.decode(ids)}
    assert "[UNK]" in words  # E11 and NDC//1 were never seen in train
    assert "LOINC//1_4" in words and not {"LOINC//1_0", "LOINC//1_1"} & words


def test_rare_codes_become_unknown(tmp_path):
    rows = admission(1, 1, at(0), at(1)) + [event(1, at(0, 1), "ICD10CM//A00", encounter=1)]
    rows += admission(2, 2, at(0), at(1)) + [event(2, at(0, 1), "ICD10CM//B00", encounter=2)] * 2
    data = write_dataset(tmp_path / "meds", rows, {1: "train", 2: "train"})
    tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=2), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer")
    assert tokenizer.token_to_id("ICD10CM//A00") is None
    assert tokenizer.token_to_id("ICD10CM//B00") is not None


@pytest.mark.parametrize("n_bins", [1, 3])
def test_bin_count_is_configurable(tmp_path, n_bins):
    rows = admission(1, 1, at(0), at(1))
    rows += [event(1, at(0, 1), "LOINC//9", float(v), 1) for v in np.linspace(0, 1, 30)]
    data = write_dataset(tmp_path / "meds", rows, {1: "train"})
    tokenize(data, tmp_path / "seq", TokenizeConfig(min_code_count=1, n_bins=n_bins), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(tmp_path / "seq" / "tokenizer")
    binned = sorted(w for w in tokenizer.get_vocab() if w.startswith("LOINC//9_"))
    assert binned == ([] if n_bins == 1 else [f"LOINC//9_{k}" for k in range(n_bins)])
    row = load_sequences(tmp_path / "seq").row(0, named=True)
    counts = np.bincount(row["input_ids"])
    if n_bins == 3:
        assert [counts[tokenizer.token_to_id(w)] for w in binned] == [10, 10, 10]
