"""Sequences -> windows -> batches: truncation at visit starts, [CLS] re-prepended, padding and labels."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_sequences import CODES_PER_GROUP, LONG_VISIT_REPEATS, write_sequences

from odyssey.training.data import (
    LengthBucketSampler,
    SequenceCollator,
    SequenceDataset,
    read_sequences,
    read_vocabulary,
    sort_by_length,
)

VISIT_TOKENS = CODES_PER_GROUP + 3  # [VS] codes [VE] [REG]


def test_vocabulary_and_splits(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    assert (vocab.pad_id, vocab.cls_id, vocab.visit_start_id) == (0, 2, 3)
    assert vocab.size == 33 + 4 * CODES_PER_GROUP + 1
    train, tuning = read_sequences(sequences_dir, "train"), read_sequences(sequences_dir, "tuning")
    assert train.num_rows == 40 and tuning.num_rows == 8
    assert read_sequences(sequences_dir).num_rows == 48


def test_short_sequences_are_kept_whole(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    table = read_sequences(sequences_dir, "train")
    dataset = SequenceDataset(table, vocab, context_length=10_000)
    assert len(dataset) == table.num_rows
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset[i]["input_ids"], table["input_ids"][i].as_py())
        np.testing.assert_allclose(dataset[i]["times"], table["times"][i].as_py())


def test_recent_window_keeps_the_header_and_starts_at_a_visit(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    table = read_sequences(sequences_dir, "train")
    context = 20
    dataset = SequenceDataset(table, vocab, context_length=context, long_sequences="recent")
    assert len(dataset) == table.num_rows
    cut = 0
    for i in range(len(dataset)):
        full = table["input_ids"][i].as_py()
        item = dataset[i]["input_ids"].tolist()
        assert len(item) <= context
        assert item[:2] == full[:2] and item[0] == vocab.cls_id  # [CLS] + demographic header
        if len(full) > context:
            cut += 1
            assert item[2] == vocab.visit_start_id
            tail = len(item) - 3 if dataset.windows[i][4] != -1 else len(item) - 2
            assert item[-tail:] == full[-tail:]  # the most recent tokens
    assert cut >= 5


def test_a_visit_longer_than_the_window_keeps_its_start_and_newest_tokens(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    table = read_sequences(sequences_dir, "train")
    single_visit = [len(ids) if max(orders) == 1 else 0
                    for ids, orders in zip(table["input_ids"].to_pylist(), table["visit_orders"].to_pylist(),
                                           strict=True)]
    long_row = single_visit.index(max(single_visit))
    assert max(single_visit) == 2 + 3 + LONG_VISIT_REPEATS * CODES_PER_GROUP
    dataset = SequenceDataset(table.slice(long_row, 1), vocab, context_length=12, long_sequences="windows")
    full = table["input_ids"][long_row].as_py()
    items = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    assert len(items) == 5 and all(len(item) <= 12 for item in items)
    assert items[0] == full[: len(items[0])]
    for item, window in zip(items[1:], dataset.windows[1:], strict=True):
        assert window[4] != -1 and item[:3] == [vocab.cls_id, full[1], vocab.visit_start_id]
    assert [t for item in items[1:] for t in item[3:]] == full[len(items[0]) :]


def test_windows_cover_every_token_once(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    table = read_sequences(sequences_dir, "train")
    dataset = SequenceDataset(table, vocab, context_length=20, long_sequences="windows")
    assert len(dataset) > table.num_rows
    rows = {}
    for i in range(len(dataset)):
        row, header_end, start, end, opener = (int(v) for v in dataset.windows[i])
        ids = dataset[i]["input_ids"].tolist()
        assert len(ids) <= 20
        if row in rows:  # a later window: drop the repeated header and any copied [VS]
            ids = ids[2 + (opener != -1):]
        rows.setdefault(row, []).extend(ids)
    for row, ids in rows.items():
        assert ids == table["input_ids"][row].as_py()


def test_collator_pads_and_masks_labels():
    collator = SequenceCollator(pad_id=0, pad_to_multiple_of=8)
    items = [
        {name: np.arange(1, n + 1) for name in
         ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")}
        for n in (3, 10)
    ]
    batch = collator(items)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert batch["labels"][0].tolist() == [-100, 2, 3] + [-100] * 13
    assert batch["labels"][1, 1:10].tolist() == list(range(2, 11)) and batch["labels"][1, 10:].eq(-100).all()
    assert batch["ages"].dtype.is_floating_point and not batch["visit_orders"].dtype.is_floating_point


def test_length_buckets_are_deterministic_and_homogeneous():
    lengths = list(np.random.default_rng(0).integers(1, 1000, size=400))
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=3)
    first, again = list(sampler), list(sampler)
    assert first == again and sorted(first) == list(range(400))
    sampler.set_epoch(1)
    assert list(sampler) != first
    batches = [first[i : i + 8] for i in range(0, 400, 8)]
    spread = np.mean([max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches])
    random_batches = np.random.default_rng(1).permutation(400).reshape(-1, 8)
    random_spread = np.mean([max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in random_batches])
    assert spread < random_spread / 5


def test_length_buckets_come_in_random_order_longest_first():
    # transformers' grouping walks each mega-batch from its longest batch to its shortest; that 50-step
    # cycle in length (and label rates) kept the finetuning heads near chance (docs/finetune.md).
    lengths = list(np.random.default_rng(2).integers(1, 5000, size=16 * 400))
    order = list(LengthBucketSampler(lengths, batch_size=16, seed=0))
    maxima = [max(lengths[j] for j in order[i : i + 16]) for i in range(0, len(order), 16)]
    assert maxima[0] == max(lengths)
    descents = np.mean(np.diff(maxima) < 0)
    assert 0.35 < descents < 0.65, descents


def test_eval_order_is_longest_first(sequences_dir):
    vocab = read_vocabulary(sequences_dir)
    dataset = sort_by_length(SequenceDataset(read_sequences(sequences_dir, "tuning"), vocab, 100))
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert lengths == sorted(lengths, reverse=True)


def test_bad_inputs_name_the_problem(tmp_path, sequences_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        read_vocabulary(tmp_path)
    with pytest.raises(FileNotFoundError, match="no sequence files"):
        read_sequences(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        read_sequences(sequences_dir, "test")
    broken = write_sequences(tmp_path / "broken", subjects=3, parts=1)
    part = broken / "sequences" / "part-0000.parquet"
    table = pq.read_table(part)
    ages = table["ages"].to_pylist()
    ages[1] = ages[1][:-1]
    pq.write_table(table.set_column(table.schema.get_field_index("ages"), "ages",
                                    pa.array(ages, pa.list_(pa.float32()))), part)
    with pytest.raises(ValueError, match=r"part-0000.parquet: row 1 has .* ages"):
        read_sequences(broken)
    pq.write_table(table.drop_columns(["visit_orders"]), part)
    with pytest.raises(ValueError, match=r"part-0000.parquet: not a sequences file"):
        read_sequences(broken)
    times = table["times"].to_pylist()
    times[2] = None
    pq.write_table(table.set_column(table.schema.get_field_index("times"), "times",
                                    pa.array(times, pa.list_(pa.float32()))), part)
    with pytest.raises(ValueError, match=r"part-0000.parquet: row 2 has no times"):
        read_sequences(broken)
    vocab = read_vocabulary(sequences_dir)
    with pytest.raises(ValueError, match="token_type_ids value [4-9] outside"):
        SequenceDataset(read_sequences(sequences_dir, "train"), vocab, 100, type_vocab_size=4)
