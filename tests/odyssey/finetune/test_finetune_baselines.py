"""Bag-of-codes features: per-window counts of clinical tokens known at the prediction time."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest

from odyssey.finetune.baselines import AGE_SCALE_YEARS, bag_of_codes
from odyssey.finetune.data import SequenceStore, TaskExamples
from odyssey.tokenizer import SpecialTokens, TokenType

A, B, FEMALE, VOCAB = 40, 41, 35, 50
S, C, D = int(TokenType.SPECIAL), int(TokenType.CONDITION), int(TokenType.DEMOGRAPHIC)


def _store() -> SequenceStore:
    day = np.timedelta64(1, "D")
    start = np.datetime64("2100-01-01T00:00:00", "us")
    ids = [SpecialTokens.CLS, FEMALE, SpecialTokens.VS, A, B, SpecialTokens.VE, SpecialTokens.REG, SpecialTokens.M_3,
           SpecialTokens.VS, A, SpecialTokens.VE, SpecialTokens.REG, SpecialTokens.VS, B, SpecialTokens.VE]
    days = [0, 0, 0, 0, 1, 2, 2, 100, 100, 100, 101, 101, 200, 200, 201]
    types = [S, D, S, C, C, S, S, int(TokenType.TIME_GAP), S, C, S, S, S, C, S]
    frame = pl.DataFrame({
        "subject_id": [7], "split": ["train"], "input_ids": [[int(i) for i in ids]], "token_type_ids": [types],
        "ages": [[60 + d / 365.25 for d in days]], "times": [[float(d) for d in days]],
        "visit_orders": [[0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]], "visit_segments": [[0] * 15],
        "event_times": [[(start + d * day).astype(datetime) for d in days]],
    }, schema_overrides={"input_ids": pl.List(pl.Int32), "token_type_ids": pl.List(pl.Int8),
                         "ages": pl.List(pl.Float32), "times": pl.List(pl.Float32)})
    return SequenceStore(frame)


def _one_example(days_after_start: int) -> TaskExamples:
    """The subject's one example, predicted this many days after its first token."""
    when = np.array([np.datetime64("2100-01-01T00:00:00", "us") + np.timedelta64(days_after_start, "D")])
    return TaskExamples(row=np.array([0]), subject_id=np.array([7]), prediction_time=when,
                        task_index=np.array([0]), labels=np.zeros((1, 1), np.float32),
                        label_mask=np.ones((1, 1), bool), known_tokens=np.array([12]))


def test_counts_per_window_use_only_known_clinical_tokens():
    store = _store()
    examples = _one_example(days_after_start=110)
    features = bag_of_codes(store, examples, VOCAB, (30, 365, None)).toarray()[0]
    counts = np.expm1(features[:-1]).round().reshape(3, VOCAB)
    # Last 30 days: the second visit's A. Last year and all history: A twice, B once (the third visit's B
    # on day 200 is after the prediction time). The demographic token counts; specials and gaps do not.
    assert counts[0, A] == 1 and counts[0, B] == 0 and counts[0, FEMALE] == 0
    assert counts[1, A] == 2 and counts[1, B] == 1 and counts[1, FEMALE] == 1
    assert counts[2, A] == 2 and counts[2, B] == 1 and counts[2, FEMALE] == 1
    special = [int(t) for t in SpecialTokens if int(t) < VOCAB]
    assert counts[:, special].sum() == 0
    assert counts.sum() == 1 + 4 + 4
    assert features[-1] == pytest.approx((60 + 101 / 365.25) / AGE_SCALE_YEARS, rel=1e-6)  # age at the last known token


def test_parallel_fits_give_the_sequential_predictions(cohort):
    from odyssey.finetune.baselines import BASELINES, fit_predict
    from odyssey.finetune.train import load_inputs
    from odyssey.training.data import read_vocabulary

    inputs = load_inputs(cohort.seq, cohort.labels, ["mortality_30d", "conditions"], ["train", "tuning"])
    vocab = read_vocabulary(cohort.seq).size
    args = (BASELINES["logistic_regression"], inputs.store, inputs.specs, vocab, inputs.examples["train"],
            {"tuning": inputs.examples["tuning"]})
    one, several = fit_predict(*args, workers=1), fit_predict(*args, workers=3)
    assert np.array_equal(one["tuning"], several["tuning"])
    # every labelled output got a fitted probability, not the zeros it starts from
    tuning = inputs.examples["tuning"]
    assert (one["tuning"][tuning.label_mask] > 0).all()


def test_a_single_class_output_stops_before_fitting(cohort):
    from odyssey.finetune.baselines import BASELINES, fit_predict
    from odyssey.finetune.train import load_inputs
    from odyssey.training.data import read_vocabulary

    inputs = load_inputs(cohort.seq, cohort.labels, ["mortality_30d"], ["train"])
    train = inputs.examples["train"]
    train.labels[:] = 0
    with pytest.raises(ValueError, match="mortality_30d: the train split has one class"):
        fit_predict(BASELINES["logistic_regression"], inputs.store, inputs.specs, read_vocabulary(cohort.seq).size,
                    train, {"train": train})


def test_counts_do_not_depend_on_token_order():
    store = _store()
    examples = _one_example(days_after_start=150)
    ordered = bag_of_codes(store, examples, VOCAB, (30, 365, None)).toarray()[0]
    shuffled = _store()
    order = np.random.default_rng(0).permutation(len(shuffled.rows[0]["input_ids"]))
    shuffled.rows[0] = {name: values[order] if isinstance(values, np.ndarray) and len(values) == len(order) else values
                        for name, values in shuffled.rows[0].items()}
    assert np.array_equal(bag_of_codes(shuffled, examples, VOCAB, (30, 365, None)).toarray()[0][:-1], ordered[:-1])
