"""EHRMamba backbone and pretraining head as transformers `PreTrainedModel`s (safetensors save/load)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from odyssey.kernels.cross_entropy import cross_entropy
from odyssey.kernels.rms_norm import rms_norm

from .configuration_ehrmamba import EHRMambaConfig
from .embeddings import EHRMambaEmbeddings, LearnedSinusoid
from .mixer import EHRMambaMixer, MixerState

IGNORE_INDEX = -100  # label value the loss skips (padding)


@dataclass
class EHRMambaCache:
    """Recurrent state of the whole model: one `MixerState` per layer plus each row's last time stamp.

    Lets a caller feed events one at a time (or a few at a time) at O(1) cost per token.
    """

    layers: list[MixerState]
    last_times: torch.Tensor  # (batch,) days, the time of each row's last token; NaN before any token
    seen_tokens: int = 0


@dataclass
class EHRMambaOutput(ModelOutput):
    """Backbone output: final hidden states (after the last norm), optional cache and per-layer states."""

    last_hidden_state: torch.Tensor | None = None
    cache: EHRMambaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class EHRMambaPretrainingOutput(ModelOutput):
    """Next-token prediction output: mean loss over non-padding targets, logits, optional cache."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: EHRMambaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = field(default=None)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Mamba's).

    `autocast_output`: on CUDA under autocast, return the autocast dtype (what the next matrix product
    reads) from the fused kernel, instead of float32 rows that autocast then copies (the blocks' norms)."""

    def __init__(self, hidden_size: int, eps: float, autocast_output: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.autocast_output = autocast_output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        if hidden_states.is_cuda and dtype == torch.float32 and self.weight.dtype == torch.float32:
            out_dtype = dtype
            if self.autocast_output and torch.is_autocast_enabled("cuda"):
                out_dtype = torch.get_autocast_dtype("cuda")
            # one fused kernel each way instead of ~6 elementwise passes (the same function in float32)
            return rms_norm(hidden_states, self.weight, self.eps, out_dtype)
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class EHRMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block around the mixer (residual kept in float32 when configured)."""

    def __init__(self, config: EHRMambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, autocast_output=True)
        self.mixer = EHRMambaMixer(config, layer_idx=layer_idx)

    def forward(self, hidden_states, attention_mask=None, return_state: bool = False):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        if return_state:
            mixed, state = self.mixer(normed, attention_mask=attention_mask, return_state=True)
            return (residual + mixed).to(hidden_states.dtype), state
        return (residual + self.mixer(normed, attention_mask=attention_mask)).to(hidden_states.dtype)

    def step(self, hidden_states, state: MixerState, active=None):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        mixed = self.mixer.step(self.norm(hidden_states.to(self.norm.weight.dtype)), state, active)
        return (residual + mixed).to(hidden_states.dtype)

    def step_tokens(self, hidden_states, conv_states, ssm_states, slots, active, save_after: int, backend="auto"):
        """`EHRMambaMixer.step_tokens` inside the residual block: (rows, count, hidden) over pooled states."""
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        mixed = self.mixer.step_tokens(self.norm(hidden_states.to(self.norm.weight.dtype)), conv_states, ssm_states,
                                       slots, active, save_after, backend, residual=residual)
        return mixed.to(hidden_states.dtype)


class EHRMambaPreTrainedModel(PreTrainedModel):
    config_class = EHRMambaConfig
    config: EHRMambaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EHRMambaBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EHRMambaMixer):
            module.reset_ssm_parameters(self.config)
            nn.init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                nn.init.zeros_(module.conv1d.bias)
            # PyTorch's default Linear init, as mamba_ssm keeps it: with the generic normal(0.02) the input
            # and B/C projections start so small that the scan carries almost nothing from earlier tokens,
            # and a task head spends hundreds of steps on a plateau before it can read the history.
            for projection in (module.in_proj, module.x_proj, module.out_proj):
                nn.init.kaiming_uniform_(projection.weight, a=math.sqrt(5))
            if self.config.rescale_prenorm_residual:
                # GPT-2 style: shrink residual-branch outputs by 1/sqrt(depth).
                module.out_proj.weight /= math.sqrt(self.config.num_hidden_layers)
        elif isinstance(module, LearnedSinusoid):
            module.reset_parameters()


class EHRMambaModel(EHRMambaPreTrainedModel):
    """EHR embeddings -> N Mamba blocks -> final RMSNorm."""

    def __init__(self, config: EHRMambaConfig):
        super().__init__(config)
        self.embeddings = EHRMambaEmbeddings(config)
        self.layers = nn.ModuleList([EHRMambaBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings.word_embeddings = new_embeddings

    def empty_cache(self, batch_size: int, device=None) -> EHRMambaCache:
        """A cache for decoding from the first token."""
        device = device or self.norm_f.weight.device
        return EHRMambaCache(
            layers=[layer.mixer.empty_state(batch_size, device=device) for layer in self.layers],
            last_times=torch.full((batch_size,), float("nan"), device=device),
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        token_type_ids: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_orders: torch.Tensor | None = None,
        visit_segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EHRMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> EHRMambaOutput | tuple:
        """Run a (batch, length) sequence.

        Without `cache`: the parallel scan; `use_cache=True` also returns the final state (prefill).
        With `cache`: the tokens continue the cached sequences, one recurrent step per token (O(1) each);
        the cache is updated in place and returned.
        `inputs_embeds` (batch, length, hidden) replaces the embedding layer's output (parallel path only),
        for attribution methods that perturb embeddings.
        """
        use_cache = bool(use_cache) or cache is not None
        output_hidden_states = bool(output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if times is None:
            times = torch.zeros_like(input_ids, dtype=torch.float32)
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if cache is not None:
            if inputs_embeds is not None:
                raise ValueError("inputs_embeds is not supported with a cache (recurrent steps embed their tokens)")
            hidden, all_hidden = self._continue(
                input_ids, token_type_ids, ages, times, visit_orders, visit_segments, attention_mask, cache,
                output_hidden_states,
            )
        else:
            hidden, all_hidden, cache = self._parallel(
                input_ids, token_type_ids, ages, times, visit_orders, visit_segments, attention_mask,
                use_cache and not (self.gradient_checkpointing and self.training), output_hidden_states, inputs_embeds,
            )
        hidden = self.norm_f(hidden)
        if output_hidden_states:
            all_hidden = (*all_hidden, hidden)
        output = EHRMambaOutput(last_hidden_state=hidden, cache=cache if use_cache else None, hidden_states=all_hidden)
        return output if return_dict else output.to_tuple()

    def _parallel(self, input_ids, token_type_ids, ages, times, visit_orders, visit_segments, attention_mask,
                  use_cache, output_hidden_states, inputs_embeds=None):
        hidden = inputs_embeds
        if hidden is None:
            hidden = self.embeddings(input_ids, token_type_ids, ages, times, visit_orders, visit_segments,
                                     attention_mask)
        all_hidden: tuple[torch.Tensor, ...] = ()
        states = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden = (*all_hidden, hidden)
            if use_cache:
                hidden, state = layer(hidden, attention_mask, return_state=True)
                states.append(state)
            else:
                hidden = layer(hidden, attention_mask)
        cache = None
        if use_cache:
            cache = EHRMambaCache(layers=states, last_times=_last_real(times, attention_mask).float(),
                                  seen_tokens=input_ids.shape[1])
        return hidden, (all_hidden if output_hidden_states else None), cache

    def _continue(self, input_ids, token_type_ids, ages, times, visit_orders, visit_segments, attention_mask,
                  cache: EHRMambaCache, output_hidden_states):
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        # Time deltas continue from each row's last seen time; padded rows do not advance it.
        hidden_all = self.embeddings(
            input_ids, token_type_ids, ages, times, visit_orders, visit_segments, mask,
            previous_times=cache.last_times,
        )
        outputs, per_layer = [], [[] for _ in self.layers] if output_hidden_states else None
        for t in range(input_ids.shape[1]):
            hidden = hidden_all[:, t]
            active = mask[:, t].bool()
            for i, layer in enumerate(self.layers):
                if per_layer is not None:
                    per_layer[i].append(hidden)
                hidden = layer.step(hidden, cache.layers[i], active)
            outputs.append(hidden)
            cache.last_times = torch.where(active, times[:, t].float(), cache.last_times)
        cache.seen_tokens += input_ids.shape[1]
        all_hidden = tuple(torch.stack(h, dim=1) for h in per_layer) if per_layer is not None else None
        return torch.stack(outputs, dim=1), all_hidden


def _last_real(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's value at its last non-padding position."""
    if attention_mask is None:
        return values[:, -1]
    positions = torch.arange(values.shape[1], device=values.device)
    last = (attention_mask.bool() * positions).amax(dim=1)
    return values.gather(1, last[:, None])[:, 0]


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t; targets equal to -100 are skipped.

    The mean over this batch's targets, or, when the Trainer passes `num_items_in_batch` (the target
    count over all gradient-accumulation micro-batches and devices), the sum divided by it, so that
    accumulated gradients weight every token equally.
    """
    # every position's logits against the next label, the last position's target ignored: the logits stay one view
    # (no copy of the shifted slice); `odyssey.kernels.cross_entropy` (torch's, or a fused Triton kernel)
    rows = logits.reshape(-1, logits.shape[-1])
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(rows.device)
    if num_items_in_batch is None:
        return cross_entropy(rows, targets, ignore_index=IGNORE_INDEX)
    total = cross_entropy(rows, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class EHRMambaForPretraining(EHRMambaPreTrainedModel):
    """Backbone + next-token head tied to the concept embeddings."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.word_embeddings.weight"}

    def __init__(self, config: EHRMambaConfig):
        super().__init__(config)
        self.backbone = EHRMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        token_type_ids: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_orders: torch.Tensor | None = None,
        visit_segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: EHRMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> EHRMambaPretrainingOutput | tuple:
        """Logits for the next token at every position; `labels` (input ids with -100 at padding) give the loss.

        `num_items_in_batch` (passed by the Trainer in `kwargs`) normalises the summed loss; see `next_token_loss`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.backbone(
            input_ids, token_type_ids=token_type_ids, ages=ages, times=times, visit_orders=visit_orders,
            visit_segments=visit_segments, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True, inputs_embeds=inputs_embeds,
        )
        logits = self.lm_head(out.last_hidden_state.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, kwargs.get("num_items_in_batch"))
        output = EHRMambaPretrainingOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        return output if return_dict else output.to_tuple()


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct trainable parameters (tied weights counted once); optionally without the concept table."""
    seen, total = set(), 0
    skip = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        skip.add(id(model.get_input_embeddings().weight))
    for parameter in model.parameters():
        if id(parameter) in seen or id(parameter) in skip:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total
