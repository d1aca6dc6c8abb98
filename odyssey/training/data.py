"""Pretraining data: token sequences (contracts.md format) -> context-length windows -> padded batches.

Sequences are stored at full length, one row per subject. A sequence longer than the context keeps
its header (`[CLS]` and the static tokens before the first visit) and continues from a visit start
(`[VS]`), as `odyssey.tokenizer.sequences.truncate` does for finetuning; either only its most recent
window (`recent`) or consecutive windows covering every token (`windows`, the pretraining default).
When a single visit is longer than the window, the window holds a copy of that visit's `[VS]` and its
newest tokens. Batches are grouped by length (`LengthBucketSampler`) and padded only
to the longest window in the batch, so padding wastes little compute.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from transformers.trainer_pt_utils import get_length_grouped_indices

from odyssey.models.modeling_ehrmamba import IGNORE_INDEX

# Per-token list columns of the sequences parquet (contracts.md) and the dtype each has in a batch.
# The dataset keeps the file's narrow dtypes (int8/int32/float32, about 18 bytes a token) in memory.
TOKEN_COLUMNS: dict[str, np.dtype] = {
    "input_ids": np.dtype(np.int64),
    "token_type_ids": np.dtype(np.int64),
    "ages": np.dtype(np.float32),
    "times": np.dtype(np.float32),
    "visit_orders": np.dtype(np.int64),
    "visit_segments": np.dtype(np.int64),
}
SPLITS = ("train", "tuning", "held_out")
TOKENIZER_FILE = Path("tokenizer") / "tokenizer.json"
SEQUENCES_GLOB = str(Path("sequences") / "part-*.parquet")
LongSequences = Literal["recent", "windows"]
NO_OPENER = -1  # a window without a copied [VS]


@dataclass(frozen=True)
class Vocabulary:
    """What training needs from the tokenizer: the vocabulary size and three special ids."""

    size: int
    pad_id: int
    cls_id: int
    visit_start_id: int


def read_vocabulary(seq_dir: str | os.PathLike) -> Vocabulary:
    """Read `SEQ_DIR/tokenizer/tokenizer.json` (a standard HF tokenizers file)."""
    path = Path(seq_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {seq_dir} the output folder of `odyssey tokenize`?")
    tokenizer = Tokenizer.from_file(str(path))
    ids = {token: tokenizer.token_to_id(token) for token in ("[PAD]", "[CLS]", "[VS]")}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(f"{path}: special tokens {missing} are not in the vocabulary")
    return Vocabulary(
        size=tokenizer.get_vocab_size(with_added_tokens=True),
        pad_id=ids["[PAD]"],
        cls_id=ids["[CLS]"],
        visit_start_id=ids["[VS]"],
    )


def read_sequences(seq_dir: str | os.PathLike, split: str | None = None) -> pa.Table:
    """All sequence rows (of one split, if given) with the token columns checked, from every part file."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    files = sorted(glob.glob(str(Path(seq_dir) / SEQUENCES_GLOB)))
    if not files:
        raise FileNotFoundError(f"{Path(seq_dir) / SEQUENCES_GLOB}: no sequence files")
    tables = []
    for file in files:
        try:
            table = pq.read_table(file, columns=["split", *TOKEN_COLUMNS])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{file}: not a sequences file: {exc}") from exc
        _check_rows(table, file)
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        tables.append(table)
    return pa.concat_tables(tables)


def _check_rows(table: pa.Table, file: str) -> None:
    """Every token column present (no nulls) and as long as `input_ids` in every row."""
    for name in TOKEN_COLUMNS:
        nulls = np.flatnonzero(table[name].is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise ValueError(f"{file}: row {int(nulls[0])} has no {name}")
    lengths = {name: pc.list_value_length(table[name]).to_numpy(zero_copy_only=False) for name in TOKEN_COLUMNS}
    reference = lengths["input_ids"]
    for name, values in lengths.items():
        bad = np.flatnonzero(values != reference)
        if bad.size:
            raise ValueError(
                f"{file}: row {int(bad[0])} has {int(values[bad[0]])} {name} for {int(reference[bad[0]])} input_ids"
            )


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, offsets) numpy arrays, values in the column's own dtype."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(array, pa.ChunkedArray):  # an empty table
        array = pa.array([], type=column.type)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0] if offsets.size else offsets


class SequenceDataset(torch.utils.data.Dataset):
    """Context-length windows over token sequences; an item is a dict of 1-D numpy arrays."""

    def __init__(
        self,
        table: pa.Table,
        vocabulary: Vocabulary,
        context_length: int,
        long_sequences: LongSequences = "recent",
        min_length: int = 2,
        type_vocab_size: int | None = None,
        visit_segment_size: int | None = None,
    ):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        if long_sequences not in ("recent", "windows"):
            raise ValueError(f"long_sequences must be 'recent' or 'windows', got {long_sequences!r}")
        self.vocabulary = vocabulary
        self.context_length = context_length
        self.columns: dict[str, np.ndarray] = {}
        offsets = None
        for name in TOKEN_COLUMNS:
            self.columns[name], offsets = _flat(table[name])
        self.row_offsets = offsets if offsets is not None else np.zeros(1, dtype=np.int64)
        self._check_ranges(type_vocab_size, visit_segment_size)
        windows = []
        for row in range(len(self.row_offsets) - 1):
            windows += self._row_windows(row, long_sequences)
        self.windows = np.array(windows, dtype=np.int64).reshape(-1, 5)  # (row, header_end, start, end, opener)
        header = self.windows[:, 1] - self.row_offsets[self.windows[:, 0]]
        lengths = header + (self.windows[:, 4] != NO_OPENER) + self.windows[:, 3] - self.windows[:, 2]
        keep = lengths >= min_length
        self.windows = self.windows[keep]
        self.lengths: list[int] = lengths[keep].tolist()

    def _check_ranges(self, type_vocab_size: int | None, visit_segment_size: int | None) -> None:
        limits = {"input_ids": self.vocabulary.size, "token_type_ids": type_vocab_size,
                  "visit_segments": visit_segment_size}
        for name, limit in limits.items():
            values = self.columns[name]
            if limit is None or values.size == 0:
                continue
            bad = np.flatnonzero((values < 0) | (values >= limit))
            if bad.size:
                row = int(np.searchsorted(self.row_offsets, bad[0], side="right") - 1)
                raise ValueError(
                    f"sequence row {row}: {name} value {int(values[bad[0]])} outside [0, {limit}) "
                    "(does the model config match the tokenizer?)"
                )

    def _row_windows(self, row: int, long_sequences: LongSequences) -> list[tuple[int, int, int, int, int]]:
        """(row, header_end, start, end, opener): tokens [row start, header_end) + [opener] + [start, end)."""
        begin, end = int(self.row_offsets[row]), int(self.row_offsets[row + 1])
        if end - begin <= self.context_length:
            return [(row, begin, begin, end, NO_OPENER)]
        ids, orders = self.columns["input_ids"], self.columns["visit_orders"]
        in_visit = np.flatnonzero(orders[begin:end] > 0)
        header_end = begin + min(int(in_visit[0]) if in_visit.size else end - begin, self.context_length - 1)
        budget = self.context_length - (header_end - begin)
        windows = []
        while end > header_end:
            start = end - budget
            if start <= header_end:
                windows.append((row, begin, begin, end, NO_OPENER))  # the first window: header included
                break
            boundaries = np.flatnonzero(ids[start:end] == self.vocabulary.visit_start_id)
            if boundaries.size:
                windows.append((row, header_end, start + int(boundaries[0]), end, NO_OPENER))
            else:  # one visit longer than the budget: its [VS], then its newest tokens
                openers = np.flatnonzero(ids[header_end:start] == self.vocabulary.visit_start_id)
                if openers.size and budget > 1:
                    windows.append((row, header_end, start + 1, end, header_end + int(openers[-1])))
                else:
                    windows.append((row, header_end, start, end, NO_OPENER))
            if long_sequences == "recent":
                break
            end = windows[-1][2]
        return windows[::-1]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row, header_end, start, end, opener = (int(v) for v in self.windows[index])
        first = int(self.row_offsets[row])
        if header_end == first and opener == NO_OPENER:
            return {name: values[start:end] for name, values in self.columns.items()}
        pieces = [slice(first, header_end)] + ([slice(opener, opener + 1)] if opener != NO_OPENER else [])
        pieces.append(slice(start, end))
        return {name: np.concatenate([values[p] for p in pieces]) for name, values in self.columns.items()}


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Batches of similar length, the batches themselves in random order.

    Random mega-batches are sorted by length and cut into batches (as transformers' length grouping does),
    then the batches are shuffled. Without that shuffle, training walks each mega-batch from its longest
    batch to its shortest: a 50-step cycle in length, and so in label rates, which kept the heads near
    chance at 1,000 patients (docs/finetune.md). The longest batch still comes first, so a batch that does
    not fit in memory fails at once. Deterministic per (seed, epoch), so a resumed run replays the order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        # The first batch holds the longest item; a short last batch stays last (drop_last sees it there).
        short_tail = 1 if batches and len(batches[-1]) < self.batch_size else 0
        middle = batches[1 : len(batches) - short_tail]
        order = torch.randperm(len(middle), generator=generator).tolist()
        batches = batches[:1] + [middle[i] for i in order] + batches[1 + len(middle):]
        return iter([index for batch in batches for index in batch])


def padded_width(lengths, multiple: int):
    """`lengths` (a number or an array) rounded up to a multiple of `multiple`, as batches are padded."""
    return -(-lengths // multiple) * multiple


class SequenceCollator:
    """Pads a list of dataset items to the longest one (rounded up to `pad_to_multiple_of`).

    `labels` are the input ids with -100 at padding and at position 0 (never a next-token target), so
    the number of non-ignored labels is exactly the number of predicted tokens.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8):
        self.pad_id = pad_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def pad(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The token columns right-padded to a common width, and their attention mask."""
        longest = max(len(item["input_ids"]) for item in items)
        width = padded_width(longest, self.pad_to_multiple_of)
        batch: dict[str, torch.Tensor] = {}
        for name, dtype in TOKEN_COLUMNS.items():
            fill = self.pad_id if name == "input_ids" else 0
            out = np.full((len(items), width), fill, dtype=dtype)
            for i, item in enumerate(items):
                out[i, : len(item[name])] = item[name]
            batch[name] = torch.from_numpy(out)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, item in enumerate(items):
            mask[i, : len(item["input_ids"])] = 1
        batch["attention_mask"] = torch.from_numpy(mask)
        return batch

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = self.pad(items)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


def sort_by_length(dataset: SequenceDataset) -> torch.utils.data.Subset:
    """The dataset in decreasing length order: sequential evaluation batches then pad little."""
    order = np.argsort(-np.asarray(dataset.lengths), kind="stable")
    return torch.utils.data.Subset(dataset, order.tolist())
