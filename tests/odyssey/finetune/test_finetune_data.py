"""Task examples: the cut at prediction time, prompts at both ends (never truncated away), input checks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from odyssey.finetune.data import (
    FinetuneDataError,
    SequenceStore,
    TaskCollator,
    TaskDataset,
    build_examples,
    check_both_classes,
    few_shot,
    prompt_input,
    read_task_labels,
    read_task_specs,
)
from odyssey.finetune.train import sampling_weights
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType, load_sequences
from odyssey.training.data import LengthBucketSampler


@pytest.fixture(scope="module")
def loaded(cohort):
    tokenizer = EHRTokenizer.from_pretrained(cohort.seq / "tokenizer")
    specs = read_task_specs(cohort.labels, tokenizer, ["mortality_30d", "conditions", "los_7d"])
    store = SequenceStore(load_sequences(cohort.seq))
    labels = [read_task_labels(cohort.labels, s) for s in specs]
    return tokenizer, specs, store, labels


def test_task_specs_come_from_the_label_manifest(loaded):
    tokenizer, specs, _, _ = loaded
    assert [s.name for s in specs] == ["mortality_30d", "conditions", "los_7d"]
    assert specs[0].prompt_ids == (SpecialTokens.MOR_1M,)
    assert specs[1].kind == "multilabel" and specs[1].outputs[0] == "heart_failure"
    assert specs[1].prompt_ids == tuple(range(SpecialTokens.C0, SpecialTokens.C5 + 1))
    assert specs[2].prediction_time == {"anchor": "admission", "offset_hours": 24.0}


def test_prompt_at_both_ends_after_the_cut_even_when_truncated(loaded):
    _, specs, store, labels = loaded
    frame = labels[0]
    times = frame["prediction_time"].to_numpy()
    known_tokens = [np.count_nonzero(store.rows[store.index[int(s)]]["event_times"] <= t)
                    for s, t in zip(frame["subject_id"], times, strict=True)]
    i = int(np.argmax(known_tokens))  # the longest history at its prediction time: truncation applies
    assert known_tokens[i] > 200
    row = store.rows[store.index[int(frame["subject_id"][i])]]
    when = times[i]
    for max_length in (40, 64):
        item = prompt_input(row, when, max_length, specs[0].prompt_ids)
        ids = item["input_ids"]
        assert max_length // 2 < len(ids) <= max_length  # truncated at a visit boundary
        assert ids[0] == SpecialTokens.MOR_1M and ids[-1] == SpecialTokens.MOR_1M
        assert SpecialTokens.CLS not in ids
        assert (item["token_type_ids"][[0, -1]] == TokenType.TASK).all()
        assert (item["event_times"] <= when).all()  # nothing after the prediction time
        # Truncation keeps the most recent context: the last event before the trailing prompt is the
        # last one known at the prediction time.
        known = row["event_times"] <= when
        assert item["event_times"][-2] == row["event_times"][known].max()
    multi = prompt_input(row, when, 64, specs[1].prompt_ids)
    assert list(multi["input_ids"][:6]) == list(specs[1].prompt_ids)
    assert list(multi["input_ids"][-6:]) == list(specs[1].prompt_ids)
    assert len(multi["input_ids"]) <= 64


def test_examples_of_a_split_and_the_dataset_items(loaded):
    _, specs, store, labels = loaded
    examples, dropped = build_examples(store, specs, labels, "tuning")
    assert set(store.splits[examples.row]) == {"tuning"}
    assert sum(dropped.values()) == 0
    expected = sum(int((pl.Series(store.splits[[store.index[int(s)] for s in f["subject_id"]]]) == "tuning").sum())
                   for f in labels)
    assert len(examples) == expected
    conditions = examples.task_index == 1
    assert examples.label_mask[conditions].all() and not examples.label_mask[~conditions, 1:].any()
    dataset = TaskDataset(store, examples, specs, 48)
    item = dataset[int(np.flatnonzero(conditions)[0])]
    assert item["task_index"] == 1 and len(item["input_ids"]) <= 48
    assert list(item["input_ids"][-6:]) == list(specs[1].prompt_ids)


def test_labels_for_subjects_missing_from_the_sequences_stop(loaded):
    _, specs, store, labels = loaded
    stranger = labels[0].head(3).with_columns(pl.lit(12345, dtype=pl.Int64).alias("subject_id"))
    broken = [pl.concat([labels[0], stranger]), *labels[1:]]
    with pytest.raises(FinetuneDataError, match=r"3 label rows name subjects missing from the sequences"):
        build_examples(store, specs, broken, "train")


def test_unknown_task_names_stop_with_the_known_ones(cohort, loaded):
    tokenizer = loaded[0]
    with pytest.raises(FinetuneDataError, match=r"unknown task\(s\) mortality_7d; .* defines: .*mortality_30d"):
        read_task_specs(cohort.labels, tokenizer, ["mortality_7d"])


def test_a_split_with_one_class_stops(loaded):
    _, specs, store, labels = loaded
    negatives = labels[0].with_columns(pl.lit(False).alias("boolean_value"))
    examples, _ = build_examples(store, specs, [negatives, *labels[1:]], "train")
    with pytest.raises(FinetuneDataError, match=r"train split cannot be used: mortality_30d: only negative labels"):
        check_both_classes(examples, specs, "train")


def test_few_shot_keeps_k_per_task_with_both_classes(loaded):
    _, specs, store, labels = loaded
    examples, _ = build_examples(store, specs, labels, "train")
    chosen = few_shot(examples, specs, k=8, seed=0)
    assert np.bincount(chosen.task_index).tolist() == [8, 8, 8]
    for task in (0, 2):
        assert set(chosen.labels[chosen.task_index == task, 0]) == {0.0, 1.0}


def test_task_sampling_weights_give_each_task_its_share(loaded):
    _, specs, store, labels = loaded
    examples, _ = build_examples(store, specs, labels, "train")
    weights = sampling_weights(examples, specs, {"mortality_30d": 0.5, "conditions": 0.25, "los_7d": 0.25})
    shares = np.bincount(examples.task_index, weights=weights) / weights.sum()
    assert shares == pytest.approx([0.5, 0.25, 0.25])
    assert sampling_weights(examples, specs, {}) is None


def test_condition_label_column_j_is_the_group_of_prompt_token_j_in_every_batch(loaded):
    """Suspect of issue 6: after batching and shuffling, output j of a conditions example must carry the
    label of the group whose token is the j-th trailing prompt token ([C0] heart failure ... [C5] pneumonia)."""
    tokenizer, specs, store, labels = loaded
    conditions = specs[1]
    examples, _ = build_examples(store, specs, labels, "train")
    members = np.flatnonzero(examples.task_index == 1)
    truth = labels[1].with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    keys = pl.DataFrame({"subject_id": examples.subject_id[members],
                         "prediction_time": examples.prediction_time[members].astype("datetime64[us]")})
    expected = keys.join(truth, on=["subject_id", "prediction_time"], how="left", maintain_order="left")
    dataset = TaskDataset(store, examples, specs, 64)
    order = np.random.default_rng(0).permutation(members)[:24]  # a shuffled batch mixing tasks
    batch = TaskCollator(tokenizer.pad_token_id)([dataset[int(i)] for i in order])
    lengths = batch["attention_mask"].sum(dim=1)
    for row, example in enumerate(order):
        position = int(np.searchsorted(members, example))
        for j, token in enumerate(conditions.prompt_ids):
            group = conditions.outputs[j]
            assert tokenizer.token_to_id(f"[C{j}]") == token
            assert int(batch["input_ids"][row, int(lengths[row]) - len(conditions.prompt_ids) + j]) == token
            assert float(batch["labels"][row, j]) == float(expected[group][position])
    assert conditions.outputs == ("heart_failure", "diabetes", "chronic_kidney_disease", "copd", "sepsis", "pneumonia")


def test_length_grouped_batches_pad_less_and_cover_every_example(loaded):
    _, specs, store, labels = loaded
    examples, _ = build_examples(store, specs, labels, "train")
    dataset = TaskDataset(store, examples, specs, 512)
    sampler = LengthBucketSampler(list(dataset.lengths), 16, seed=0)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    assert sorted(order.tolist()) == list(range(len(dataset)))
    lengths = np.asarray(dataset.lengths)

    def padding(indices: np.ndarray) -> int:
        batches = [lengths[indices[i:i + 16]] for i in range(0, len(indices), 16)]
        return int(sum(b.max() * len(b) - b.sum() for b in batches))

    shuffled = np.random.default_rng(0).permutation(len(dataset))
    assert padding(order) < 0.5 * padding(shuffled)
