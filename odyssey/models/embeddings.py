"""EHRMamba input embeddings: concept, time and age through a tanh projection, plus type, visit order, segment.

Following EHRMamba (Fallahpour et al. 2024): the concept embedding is concatenated with learned-sinusoid
embeddings of the time since the previous token and of the patient's age, projected back to the hidden
size through a tanh, then token-type, visit-order and visit-segment embeddings are added. There is no
position table, so nothing caps the context length; order comes from the recurrence itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configuration_ehrmamba import EHRMambaConfig

# Periods (in the input's unit) that the learned sinusoids start from, log-spaced between these bounds.
# Time deltas are in days: from about 2 hours (events within a visit) to about 30 years.
TIME_DELTA_PERIOD_DAYS = (0.1, 10_000.0)
# Ages are in years: from a year to well past a lifetime, so the slowest sine is nearly linear in age.
AGE_PERIOD_YEARS = (1.0, 400.0)


class LearnedSinusoid(nn.Module):
    """sin(value * frequency + phase) with learned frequencies and phases (EHRMamba's time embedding).

    Frequencies start log-spaced over `periods`; half the phases start at pi/2 so that the layer begins
    as a sine/cosine pair per frequency.
    """

    def __init__(self, size: int, periods: tuple[float, float]):
        super().__init__()
        self.size = size
        self.periods = periods
        self.frequency = nn.Parameter(torch.empty(size))
        self.phase = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        half = self.size // 2
        low, high = self.periods
        periods = torch.logspace(math.log10(low), math.log10(high), half, dtype=torch.float32)
        frequency = 2 * math.pi / periods
        self.frequency.copy_(torch.cat([frequency, frequency]))
        self.phase.copy_(torch.cat([torch.zeros(half), torch.full((half,), math.pi / 2)]))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sin(values.float()[..., None] * self.frequency + self.phase)


def time_deltas(
    times: torch.Tensor, attention_mask: torch.Tensor | None = None, previous_times: torch.Tensor | None = None
) -> torch.Tensor:
    """Days since the previous real token; 0 for a sequence's first token (or after padding).

    `previous_times` (batch,) continues a sequence whose earlier tokens were already seen (decoding);
    NaN there means the row has seen no token yet.
    """
    times = times.float()
    if previous_times is None:
        before = torch.cat([times[:, :1], times[:, :-1]], dim=1)
    else:
        previous = previous_times.float()
        previous = torch.where(torch.isnan(previous), times[:, 0], previous)
        before = torch.cat([previous[:, None], times[:, :-1]], dim=1)
    deltas = times - before
    if attention_mask is not None:
        # A token right after padding (left-padded batches) starts its sequence: no earlier token.
        mask = attention_mask.to(times.dtype)
        if previous_times is None:
            before_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
        else:
            before_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        deltas = deltas * before_mask * mask
    return deltas


class EHRMambaEmbeddings(nn.Module):
    """Sum of the EHRMamba embeddings for each token (see module docstring)."""

    def __init__(self, config: EHRMambaConfig):
        super().__init__()
        hidden, time_size = config.hidden_size, config.time_embedding_size
        self.max_visit_order = config.max_visit_order
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.time_embeddings = LearnedSinusoid(time_size, TIME_DELTA_PERIOD_DAYS)
        self.age_embeddings = LearnedSinusoid(time_size, AGE_PERIOD_YEARS)
        self.scale_back_concat_layer = nn.Linear(hidden + 2 * time_size, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.visit_order_embeddings = nn.Embedding(config.max_visit_order, hidden)
        self.visit_segment_embeddings = nn.Embedding(config.visit_segment_size, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_orders: torch.Tensor | None = None,
        visit_segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        previous_times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, length) inputs -> (batch, length, hidden). Missing side inputs count as zeros."""

        def given(values: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros_like(input_ids, dtype=dtype) if values is None else values

        deltas = time_deltas(given(times, torch.float32), attention_mask, previous_times)
        orders = given(visit_orders, torch.long).long().clamp(0, self.max_visit_order - 1)
        return self.combine(input_ids, given(token_type_ids, torch.long).long(), given(ages, torch.float32), deltas,
                            orders, given(visit_segments, torch.long).long())

    def combine(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, ages: torch.Tensor,
                deltas: torch.Tensor, visit_orders: torch.Tensor, visit_segments: torch.Tensor) -> torch.Tensor:
        """The embedding from time deltas (`time_deltas`) and visit orders already clamped below
        `max_visit_order`: what `forward` computes after those two steps (the scorer packs them on the host)."""
        concept = self.word_embeddings(input_ids)
        time_part = self.time_embeddings(deltas).to(concept.dtype)
        age_part = self.age_embeddings(ages).to(concept.dtype)
        mixed = torch.tanh(self.scale_back_concat_layer(torch.cat([concept, time_part, age_part], dim=-1)))
        embeddings = (
            mixed
            + self.token_type_embeddings(token_type_ids)
            + self.visit_order_embeddings(visit_orders)
            + self.visit_segment_embeddings(visit_segments)
        )
        return self.dropout(self.layer_norm(embeddings))
