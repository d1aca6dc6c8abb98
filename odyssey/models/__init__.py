"""EHRMamba: configuration, embeddings, Mamba mixer and models (transformers classes)."""

from .configuration_ehrmamba import MODEL_SIZES, EHRMambaConfig
from .modeling_ehrmamba import (
    EHRMambaCache,
    EHRMambaForPretraining,
    EHRMambaModel,
    EHRMambaOutput,
    EHRMambaPreTrainedModel,
    EHRMambaPretrainingOutput,
    count_parameters,
)
from .modeling_ehrmamba_tasks import EHRMambaForTaskClassification
from .scorer import EHRMambaScorer

__all__ = [
    "MODEL_SIZES",
    "EHRMambaCache",
    "EHRMambaConfig",
    "EHRMambaForPretraining",
    "EHRMambaForTaskClassification",
    "EHRMambaModel",
    "EHRMambaOutput",
    "EHRMambaPreTrainedModel",
    "EHRMambaPretrainingOutput",
    "EHRMambaScorer",
    "count_parameters",
]
