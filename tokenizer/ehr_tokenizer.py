"""`EHRTokenizer`: the vocabulary (an HF `tokenizers` WordLevel model), value bins and token types.

Saved as one folder: `tokenizer.json` (loadable by `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`)
and `odyssey_tokenizer.json` (bins per code, the token-type of every id, the tokenize settings used).
Ids: `SpecialTokens` first (fixed), then extra task tokens from the config, then code words in sorted
order. Fitting reads the train split only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from odyssey.io import read_json, write_json
from odyssey.pipelines import schema as S
from odyssey.tokenizer.binning import BREAKS, bin_token, fit_bins
from odyssey.tokenizer.build import CodeTable, excluded, token_type_of, word_of
from odyssey.tokenizer.config import TokenizeConfig
from odyssey.tokenizer.vocab import SpecialTokens, TokenType, special_token_type

TOKENIZER_FILE = "tokenizer.json"
EXTRA_FILE = "odyssey_tokenizer.json"
FORMAT_VERSION = 1


class EHRTokenizer:
    """Word-level tokenizer over EHR codes with fixed special ids (see `SpecialTokens`)."""

    special = SpecialTokens

    def __init__(
        self,
        words: Sequence[str],
        word_types: Sequence[int],
        bins: dict[str, list[float]],
        settings: dict[str, Any] | None = None,
        extra_task_tokens: Sequence[str] = (),
    ) -> None:
        """`words`/`word_types`: code words after the specials and task tokens, in id order."""
        if len(words) != len(word_types):
            raise ValueError("words and word_types differ in length")
        specials = [t.token for t in SpecialTokens]
        self._id_to_token: list[str] = [*specials, *extra_task_tokens, *words]
        self._types: list[int] = [
            *(int(special_token_type(t)) for t in SpecialTokens),
            *(int(TokenType.TASK) for _ in extra_task_tokens),
            *(int(t) for t in word_types),
        ]
        self._token_to_id = {token: i for i, token in enumerate(self._id_to_token)}
        if len(self._token_to_id) != len(self._id_to_token):
            raise ValueError("duplicate tokens in the vocabulary")
        self.extra_task_tokens = list(extra_task_tokens)
        self.bins = {code: list(breaks) for code, breaks in bins.items()}
        self.settings = dict(settings or {})

    # Vocabulary lookups -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return int(SpecialTokens.PAD)

    @property
    def cls_token_id(self) -> int:
        return int(SpecialTokens.CLS)

    @property
    def unk_token_id(self) -> int:
        return int(SpecialTokens.UNK)

    @property
    def mask_token_id(self) -> int:
        return int(SpecialTokens.MASK)

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._id_to_token[token_id]

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(self._types[token_id])

    @property
    def token_types(self) -> list[int]:
        """Token type of every id (index = id)."""
        return list(self._types)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        unk = self.unk_token_id
        return [self._token_to_id.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token[int(i)] for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    # Lookup table used by the vectorised builder ----------------------------------------------
    def code_table(self, codes: Iterable[str]) -> CodeTable:
        """Lookup arrays for the vectorised builder over the distinct raw `codes` of a chunk."""
        codes = list(codes)
        width = self.max_breaks
        bare = np.full(len(codes), -1, np.int32)
        breaks = np.full((len(codes), width), np.nan)
        bin_ids = np.full((len(codes), width + 1), -1, np.int32)
        has_bins = np.zeros(len(codes), bool)
        for i, code in enumerate(codes):
            word = word_of(code)
            bare[i] = self._token_to_id.get(word, -1)
            cuts = self.bins.get(code)
            if cuts:
                has_bins[i] = True
                breaks[i, : len(cuts)] = cuts
                bin_ids[i, : len(cuts) + 1] = [
                    self._token_to_id.get(bin_token(word, k), -1) for k in range(len(cuts) + 1)
                ]
        return CodeTable(codes=codes, bare_ids=bare, breaks=breaks, bin_ids=bin_ids, has_bins=has_bins)

    @property
    def max_breaks(self) -> int:
        return max((len(b) for b in self.bins.values()), default=0)

    # HF tokenizers ------------------------------------------------------------------------------
    def to_hf_tokenizer(self) -> Tokenizer:
        """The vocabulary as an HF `tokenizers.Tokenizer` (WordLevel, split on whitespace)."""
        model = WordLevel(vocab=self.get_vocab(), unk_token=SpecialTokens.UNK.token)
        hf = Tokenizer(model)
        hf.pre_tokenizer = WhitespaceSplit()
        special = [t.token for t in SpecialTokens] + self.extra_task_tokens
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return hf

    def to_transformers(self):
        """A `transformers.PreTrainedTokenizerFast` over the same vocabulary (imported lazily)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.to_hf_tokenizer(), **self.hf_special_kwargs())

    @staticmethod
    def hf_special_kwargs() -> dict[str, str]:
        return {
            "pad_token": SpecialTokens.PAD.token,
            "unk_token": SpecialTokens.UNK.token,
            "cls_token": SpecialTokens.CLS.token,
            "mask_token": SpecialTokens.MASK.token,
        }

    # Persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_hf_tokenizer().save(str(directory / TOKENIZER_FILE))
        first_word = len(SpecialTokens) + len(self.extra_task_tokens)
        write_json(
            directory / EXTRA_FILE,
            {
                "format_version": FORMAT_VERSION,
                "extra_task_tokens": self.extra_task_tokens,
                "token_types": self._types,
                "token_type_names": {t.name: int(t) for t in TokenType},
                "special_tokens": {t.name: int(t) for t in SpecialTokens},
                "first_code_id": first_word,
                "bins": self.bins,
                "settings": self.settings,
            },
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> EHRTokenizer:
        directory = Path(directory)
        extra_path, hf_path = directory / EXTRA_FILE, directory / TOKENIZER_FILE
        for path in (extra_path, hf_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (not an Odyssey tokenizer folder)")
        extra = read_json(extra_path)
        if extra.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{extra_path}: unsupported format_version {extra.get('format_version')!r}")
        if extra.get("special_tokens") != {t.name: int(t) for t in SpecialTokens}:
            raise ValueError(f"{extra_path}: special token ids differ from this version of Odyssey")
        vocab = Tokenizer.from_file(str(hf_path)).get_vocab(with_added_tokens=True)
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(f"{hf_path}: token ids are not contiguous")
        first_word = extra["first_code_id"]
        types = extra["token_types"]
        if len(types) != len(by_id):
            raise ValueError(f"{extra_path}: {len(types)} token types for {len(by_id)} tokens")
        return cls(
            words=[t for t, _ in by_id[first_word:]],
            word_types=types[first_word:],
            bins=extra["bins"],
            settings=extra["settings"],
            extra_task_tokens=extra["extra_task_tokens"],
        )

    # Fitting ------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train_shards: Callable[[], Iterable[pl.LazyFrame]], config: TokenizeConfig) -> EHRTokenizer:
        """Fit words, word types and bins on train rows; `train_shards()` yields lazy frames of them.

        Called twice (counts, then values of the kept codes), so memory stays at one shard's rows
        plus the numeric values of binned codes.
        """
        counts: list[pl.DataFrame] = []
        for frame in train_shards():
            counts.append(
                frame.filter(~excluded(config))
                .group_by(S.CODE, S.EVENT_TYPE)
                .agg(pl.len().alias("_n"))
                .collect()
            )
        if not counts:
            raise ValueError("no train subjects: cannot fit a vocabulary")
        totals = pl.concat(counts).group_by(S.CODE, S.EVENT_TYPE).agg(pl.col("_n").sum())
        per_code = (
            totals.sort(["_n", S.EVENT_TYPE], descending=[True, False])
            .group_by(S.CODE, maintain_order=True)
            .agg(pl.col("_n").sum().alias("_count"), pl.col(S.EVENT_TYPE).first())
            .filter(pl.col("_count") >= config.min_code_count)
        )
        kept = per_code[S.CODE].to_list()
        # Values as (code index, value): 8 bytes a row, so tens of millions of lab values fit easily.
        kept_codes = pl.Enum(kept)
        values = [
            frame.filter(
                pl.col(S.CODE).is_in(kept) & pl.col(S.NUMERIC_VALUE).is_not_null() & ~excluded(config)
            )
            .select(pl.col(S.CODE).cast(kept_codes).to_physical(), S.NUMERIC_VALUE)
            .collect()
            for frame in train_shards()
        ]
        by_index = fit_bins(pl.concat(values).lazy(), config.n_bins, config.min_code_count)
        bins = by_index.with_columns(
            pl.lit(pl.Series(kept, dtype=pl.String)).gather(pl.col(S.CODE)).alias(S.CODE)
        )
        word_frame = (
            per_code.with_columns(
                pl.col(S.CODE).map_elements(word_of, return_dtype=pl.String).alias("_word"),
                token_type_of(pl.col(S.EVENT_TYPE)).alias("_type"),
            )
            .join(bins, on=S.CODE, how="left")
            .sort("_word", S.CODE)
        )
        words: list[str] = []
        types: list[int] = []
        seen: set[str] = set(t.token for t in SpecialTokens) | set(config.extra_task_tokens)
        for word, word_type, breaks in word_frame.select("_word", "_type", BREAKS).iter_rows():
            candidates = [word] + [bin_token(word, k) for k in range(len(breaks) + 1)] if breaks else [word]
            for candidate in candidates:
                if candidate not in seen:
                    seen.add(candidate)
                    words.append(candidate)
                    types.append(word_type)
        settings = config.model_dump(exclude={"max_rows_per_chunk", "workers"})
        return cls(
            words=words,
            word_types=types,
            bins={code: list(b) for code, b in bins.iter_rows()},
            settings=settings,
            extra_task_tokens=config.extra_task_tokens,
        )
