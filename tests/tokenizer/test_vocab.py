"""Special ids are fixed and named; the time-gap rule at every boundary."""

import numpy as np
import polars as pl
import pytest

from odyssey.tokenizer.build import gap_token_id
from odyssey.tokenizer.vocab import (
    TASK_TOKENS,
    TIME_GAP_TOKENS,
    SpecialTokens,
    TokenType,
    gap_token,
    gap_token_ids,
    special_token_type,
)


def test_special_ids_are_fixed_and_contiguous():
    assert SpecialTokens.PAD == 0
    assert [t.token for t in SpecialTokens][:7] == ["[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[REG]", "[MASK]"]
    assert [int(t) for t in SpecialTokens] == list(range(len(SpecialTokens)))
    names = [t.token for t in TIME_GAP_TOKENS]
    assert names == ["[W_0]", "[W_1]", "[W_2]", "[W_3]", *[f"[M_{k}]" for k in range(1, 13)], "[LT]"]
    assert [t.token for t in TASK_TOKENS] == ["[MOR_1M]", "[LOS_1W]", "[REA_1M]", *[f"[C{k}]" for k in range(6)]]


def test_special_token_types():
    assert special_token_type(SpecialTokens.PAD) is TokenType.PAD
    assert special_token_type(SpecialTokens.CLS) is TokenType.SPECIAL
    assert special_token_type(SpecialTokens.M_7) is TokenType.TIME_GAP
    assert special_token_type(SpecialTokens.C3) is TokenType.TASK


@pytest.mark.parametrize(
    ("days", "token"),
    [
        (0, "[W_0]"),
        (6, "[W_0]"),
        (7, "[W_1]"),
        (13, "[W_1]"),
        (14, "[W_2]"),
        (27, "[W_3]"),
        (28, "[M_1]"),
        (29, "[M_1]"),
        (30, "[M_1]"),
        (59, "[M_1]"),
        (60, "[M_2]"),
        (359, "[M_11]"),
        (360, "[M_12]"),
        (364, "[M_12]"),
        (365, "[M_12]"),
        (366, "[LT]"),
        (5000, "[LT]"),
    ],
)
def test_gap_token_boundaries(days, token):
    assert gap_token(days).token == token


def test_numpy_and_polars_gap_rules_agree_with_the_reference():
    days = np.arange(0, 900)
    expected = np.array([int(gap_token(int(d))) for d in days])
    np.testing.assert_array_equal(gap_token_ids(days), expected)
    from_polars = pl.DataFrame({"d": days}).select(gap_token_id(pl.col("d")).alias("gap"))["gap"].to_numpy()
    np.testing.assert_array_equal(from_polars, expected)


def test_negative_gap_is_an_error():
    with pytest.raises(ValueError):
        gap_token(-1)


def test_row_and_code_exclusion_rules_agree():
    from odyssey.tokenizer.build import excluded, excluded_code
    from odyssey.tokenizer.config import TokenizeConfig

    codes = ["MEDS_DEATH", "MEDS_BIRTH", "ENCOUNTER_END//IMP", "ENCOUNTER_END", "ENCOUNTER_ENDX//1",
             "ENCOUNTER_START//IMP", "ICD10CM//I50.9", "LOINC//1"]  # fmt: skip
    for config in (TokenizeConfig(), TokenizeConfig(encounter_class_tokens=False, exclude_codes=["LOINC//1"])):
        frame = pl.DataFrame({"code": codes, "time": [1] * len(codes)}).select(excluded(config))
        assert frame.to_series().to_list() == [excluded_code(c, config) for c in codes]
    assert [excluded_code(c, TokenizeConfig()) for c in codes] == [True, True, True, True, False, False, False, False]
