"""The typed config of `odyssey tokenize` (`configs/tokenize.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from odyssey.config import StageConfig
from odyssey.pipelines import schema as S


class TokenizeConfig(StageConfig):
    """How MEDS events become tokens. Every field can be overridden from the command line."""

    n_bins: int = Field(5, ge=1, description="quantile bins per numeric code, fitted on the train split")
    min_code_count: int = Field(
        3, ge=1, description="codes seen fewer times than this in the train split become [UNK]"
    )
    availability: Literal["issued", "time"] = Field(
        "issued", description="when an event counts as known: when its result was issued, or at its time"
    )
    exclude_codes: list[str] = Field(
        default_factory=lambda: [S.DEATH_CODE, S.BIRTH_CODE],
        description="codes that never become tokens (death is an outcome; birth only sets ages)",
    )
    exclude_prefixes: list[str] = Field(
        default_factory=lambda: [S.ENCOUNTER_END_PREFIX],
        description="code vocabularies that never become tokens (ENCOUNTER_END carries the discharge "
        "disposition, which reveals in-hospital death; [VE] already marks the end of a visit)",
    )
    encounter_class_tokens: bool = Field(
        True, description="keep ENCOUNTER_START//<class> as a token after [VS] (inpatient, emergency, ...)"
    )
    static_tokens: bool = Field(True, description="static rows (GENDER//...) become tokens right after [CLS]")
    extra_task_tokens: list[str] = Field(
        default_factory=list, description="task tokens of user-defined tasks, e.g. [SEPSIS_7D]"
    )
    train_split: str = Field(
        S.TRAIN_SPLIT, description="the split whose subjects fit the vocabulary and bins"
    )
    max_rows_per_chunk: int = Field(
        2_000_000, ge=1, description="events tokenized at once per worker (bounds memory); whole subjects"
    )
    workers: int = Field(
        1, ge=1, description="processes building chunks in parallel (peak memory grows with each worker)"
    )
