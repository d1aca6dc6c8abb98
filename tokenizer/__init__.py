"""Vocabulary, special and time tokens, value binning, MEDS → token sequences.

Public API: `tokenize` (the stage), `EHRTokenizer`, `TokenizeConfig`, `TokenizeReport`, `SpecialTokens`,
`TokenType`, `load_sequences`, `cut_at`, `truncate`, `append_task_token`, `prepare_input`.
"""

from odyssey.tokenizer.config import TokenizeConfig
from odyssey.tokenizer.ehr_tokenizer import EHRTokenizer
from odyssey.tokenizer.sequences import (
    SEQUENCE_SCHEMA,
    append_task_token,
    as_row,
    cut_at,
    load_sequences,
    prepare_input,
    truncate,
)
from odyssey.tokenizer.tokenize import TokenizeReport
from odyssey.tokenizer.tokenize import tokenize as tokenize
from odyssey.tokenizer.vocab import SpecialTokens, TokenType, gap_token

__all__ = [
    "SEQUENCE_SCHEMA",
    "EHRTokenizer",
    "SpecialTokens",
    "TokenType",
    "TokenizeConfig",
    "TokenizeReport",
    "append_task_token",
    "as_row",
    "cut_at",
    "gap_token",
    "load_sequences",
    "prepare_input",
    "tokenize",
    "truncate",
]
