"""Training: pretraining data (windows, length buckets, collator) and Trainer-based pretraining.

`odyssey.training.pretrain(config)` is the function; its module stays importable as
`from odyssey.training.pretrain import PretrainConfig`.
"""

from .data import (
    LengthBucketSampler,
    SequenceCollator,
    SequenceDataset,
    Vocabulary,
    read_sequences,
    read_vocabulary,
)
from .pretrain import PretrainConfig, PretrainResult, pretrain

__all__ = [
    "LengthBucketSampler",
    "PretrainConfig",
    "PretrainResult",
    "SequenceCollator",
    "SequenceDataset",
    "Vocabulary",
    "pretrain",
    "read_sequences",
    "read_vocabulary",
]
