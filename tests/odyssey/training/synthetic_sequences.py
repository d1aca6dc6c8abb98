"""A tiny synthetic sequences folder in the exact format of contracts.md (tokenizer.json + parquet parts).

Layout as `odyssey tokenize` writes it: a header ([CLS], a demographic token; visit order 0), then
visits `[VS] events [VE] [REG]` with orders 1, 2, ... and a gap token before each later visit;
specials have segment 0, a visit's events alternate segments 1 and 2.
Each subject has one hidden disease group; every visit lists that group's codes in a fixed order, so
the next token is predictable from context and a model that learns shows a falling loss. The last
subject has one visit far longer than the others (to exercise cutting inside a visit).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[REG]", "[MASK]", "[W_0]", "[W_1]", "[W_2]", "[W_3]",
            *[f"[M_{m}]" for m in range(1, 13)], "[LT]", "[MOR_1M]", "[LOS_1W]", "[REA_1M]",
            *[f"[C{c}]" for c in range(6)]]
GROUPS = 4
CODES_PER_GROUP = 5
SPECIAL_TYPE, CONDITION_TYPE, TIME_GAP_TYPE, DEMOGRAPHIC_TYPE = 1, 2, 7, 9
DEMOGRAPHIC = "GENDER//female"
LONG_VISIT_REPEATS = 8
SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("split", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())), ("ages", pa.list_(pa.float32())), ("times", pa.list_(pa.float32())),
    ("visit_orders", pa.list_(pa.int32())), ("visit_segments", pa.list_(pa.int8())),
    ("event_times", pa.list_(pa.timestamp("us"))),
])


def code_tokens() -> list[str]:
    return [f"ICD10CM//G{group}{code}" for group in range(GROUPS) for code in range(CODES_PER_GROUP)]


def write_tokenizer(folder: Path) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIALS + code_tokens() + [DEMOGRAPHIC])}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return vocab


def subject_row(subject: int, split: str, visits: int, rng: np.random.Generator, vocab: dict[str, int],
                repeats: int = 1) -> dict:
    group = subject % GROUPS
    birth_age = float(rng.uniform(20, 80))
    start = datetime(2020, 1, 1)
    tokens, types = ["[CLS]", DEMOGRAPHIC], [SPECIAL_TYPE, DEMOGRAPHIC_TYPE]
    days, orders, segments = [0.0, 0.0], [0, 0], [0, 0]
    day = 0.0
    for visit in range(1, visits + 1):
        if visit > 1:
            gap = float(rng.integers(1, 60))
            day += gap
            tokens.append("[W_0]" if gap < 7 else "[M_1]")
            types.append(TIME_GAP_TYPE), days.append(day), orders.append(visit), segments.append(0)
        codes = [f"ICD10CM//G{group}{c}" for c in range(CODES_PER_GROUP)] * repeats
        for token in ["[VS]", *codes, "[VE]", "[REG]"]:
            tokens.append(token)
            is_code = token.startswith("ICD")
            types.append(CONDITION_TYPE if is_code else SPECIAL_TYPE)
            days.append(day), orders.append(visit), segments.append(2 - visit % 2 if is_code else 0)
    return {
        "subject_id": subject, "split": split, "input_ids": [vocab[t] for t in tokens], "token_type_ids": types,
        "ages": [birth_age + d / 365.25 for d in days], "times": days, "visit_orders": orders,
        "visit_segments": segments, "event_times": [start + timedelta(days=d) for d in days],
    }


def write_sequences(folder: Path, subjects: int = 48, seed: int = 0, max_visits: int = 6, parts: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    vocab = write_tokenizer(folder / "tokenizer")
    rows = []
    for subject in range(subjects):
        split = "tuning" if subject % 6 == 5 else "train"
        long_visit = subject == subjects - 2  # a train subject
        visits = 1 if long_visit else int(rng.integers(1, max_visits + 1))
        rows.append(subject_row(1000 + subject, split, visits, rng, vocab, LONG_VISIT_REPEATS if long_visit else 1))
    (folder / "sequences").mkdir(parents=True, exist_ok=True)
    for part in range(parts):
        table = pa.Table.from_pylist(rows[part::parts], schema=SCHEMA)
        pq.write_table(table, folder / "sequences" / f"part-{part:04d}.parquet")
    return folder
