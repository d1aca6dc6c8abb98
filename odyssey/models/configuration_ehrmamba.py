"""`EHRMambaConfig`: the size and embedding settings of an EHRMamba model (a transformers config)."""

from __future__ import annotations

import math

from transformers import MambaConfig, PretrainedConfig

# Named model sizes. Parameter counts are in docs/model.md (they depend on the vocabulary size).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "conv_kernel": 4},
    "small": {"hidden_size": 256, "num_hidden_layers": 8, "state_size": 16, "expand": 2, "conv_kernel": 4},
    # About the paper's backbone: 768 hidden, 32 layers (Fallahpour et al. 2024).
    "base": {"hidden_size": 768, "num_hidden_layers": 32, "state_size": 16, "expand": 2, "conv_kernel": 4},
}

# Token types and visit segments are small enums from the tokenizer; these bound their embedding tables.
DEFAULT_TYPE_VOCAB_SIZE = 16
DEFAULT_VISIT_SEGMENT_SIZE = 3
# Visit orders beyond this share the last row (a cap on visit count, not on context length).
DEFAULT_MAX_VISIT_ORDER = 1024


class EHRMambaConfig(PretrainedConfig):
    r"""Configuration of `EHRMambaModel` / `EHRMambaForPretraining`.

    Mamba-1 sizes follow transformers' `MambaConfig` names (`hidden_size`, `state_size`, `expand`,
    `conv_kernel`, `time_step_rank`, ...) so a mixer's weights load into transformers' `MambaMixer`.
    EHR embedding sizes: `type_vocab_size` (token types), `visit_segment_size`, `max_visit_order`
    (orders past it are clamped, never an error), `time_embedding_size` (learned-sinusoid width for
    time stamps and ages). There is no position table: context length is unbounded by the model.
    `scan_backend` is passed to `odyssey.kernels.selective_scan` ("auto" picks the fastest).
    """

    model_type = "ehrmamba"

    vocab_size: int = 1024
    hidden_size: int = 64
    state_size: int = 16
    num_hidden_layers: int = 2
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: str | int = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    type_vocab_size: int = DEFAULT_TYPE_VOCAB_SIZE
    visit_segment_size: int = DEFAULT_VISIT_SEGMENT_SIZE
    max_visit_order: int = DEFAULT_MAX_VISIT_ORDER
    time_embedding_size: int = 32
    embedding_dropout: float = 0.1
    scan_backend: str = "auto"
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                     "type_vocab_size", "visit_segment_size", "max_visit_order", "time_embedding_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EHRMambaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_embedding_size % 2:
            raise ValueError("EHRMambaConfig.time_embedding_size must be even (sine and cosine halves)")
        super().__post_init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        return int(self.expand * self.hidden_size)

    @classmethod
    def from_size(cls, size: str, **overrides) -> EHRMambaConfig:
        """A config of a named size (`tiny`, `small`, `base`), with any field overridden."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[size], **overrides})

    def to_mamba_config(self) -> MambaConfig:
        """The transformers `MambaConfig` whose `MambaMixer` has exactly our mixer's parameters."""
        return MambaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            state_size=self.state_size,
            num_hidden_layers=self.num_hidden_layers,
            expand=self.expand,
            conv_kernel=self.conv_kernel,
            time_step_rank=self.time_step_rank,
            use_bias=self.use_bias,
            use_conv_bias=self.use_conv_bias,
            layer_norm_epsilon=self.layer_norm_epsilon,
            residual_in_fp32=self.residual_in_fp32,
            hidden_act="silu",
            use_mambapy=False,
            use_associative_scan=False,
        )


__all__ = ["EHRMambaConfig", "MODEL_SIZES"]
