"""GPT-style transformer baseline with EHRMamba's embeddings and task head.

`EHRGPTForTaskClassification` is `EHRMambaForTaskClassification` with the Mamba blocks replaced by a
transformers `GPT2Model` (causal self-attention, learned positions up to the context length) fed the same
EHR embeddings (concept, type, age, time, visit). Data, prompts, head, loss, training and evaluation are
shared, so the comparison isolates the sequence model. Selected with `architecture: gpt` in
`configs/finetune.yaml`; `context_length` sets how far back it sees (the issue compares 512 and 2,048).
"""

from __future__ import annotations

from torch import nn
from transformers import GPT2Config, GPT2Model

from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification
from odyssey.models.embeddings import EHRMambaEmbeddings
from odyssey.models.modeling_ehrmamba import EHRMambaOutput

ARCHITECTURE_FIELD = "architecture"
GPT = "gpt"
HEAD_WIDTH = 64  # hidden units per attention head by default


class EHRGPTBackbone(nn.Module):
    """EHR embeddings -> GPT-2 blocks -> final LayerNorm; the backbone interface the task head expects."""

    def __init__(self, config: EHRMambaConfig):
        super().__init__()
        self.embeddings = EHRMambaEmbeddings(config)
        heads = int(getattr(config, "gpt_heads", None) or max(1, config.hidden_size // HEAD_WIDTH))
        if config.hidden_size % heads:
            raise ValueError(f"gpt_heads {heads} must divide hidden_size {config.hidden_size}")
        self.transformer = GPT2Model(GPT2Config(
            vocab_size=1,  # token embeddings come from EHRMambaEmbeddings; GPT-2's own table is unused
            n_embd=config.hidden_size, n_layer=int(config.gpt_layers), n_head=heads,
            n_positions=int(config.gpt_positions), embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
            bos_token_id=None, eos_token_id=None,
        ))

    def forward(self, input_ids, token_type_ids=None, ages=None, times=None, visit_orders=None,
                visit_segments=None, attention_mask=None, output_hidden_states=None, return_dict=True,
                inputs_embeds=None, **kwargs) -> EHRMambaOutput:
        if input_ids.shape[1] > self.transformer.config.n_positions:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the transformer's "
                             f"{self.transformer.config.n_positions} positions")
        hidden = inputs_embeds if inputs_embeds is not None else self.embeddings(
            input_ids, token_type_ids, ages, times, visit_orders, visit_segments, attention_mask)
        out = self.transformer(inputs_embeds=hidden, attention_mask=attention_mask,
                               output_hidden_states=bool(output_hidden_states))
        return EHRMambaOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)


class EHRGPTForTaskClassification(EHRMambaForTaskClassification):
    """The MTF task model on a GPT-2 backbone (config fields `gpt_layers`, `gpt_heads`, `gpt_positions`)."""

    def __init__(self, config: EHRMambaConfig):
        missing = [f for f in ("gpt_layers", "gpt_positions") if getattr(config, f, None) is None]
        if missing:
            raise ValueError(f"EHRMambaConfig lacks {missing} for a GPT backbone")
        super().__init__(config)
        self.backbone = EHRGPTBackbone(config)
        self.post_init()


def task_model_class(config: EHRMambaConfig) -> type[EHRMambaForTaskClassification]:
    """The task model class a saved config asks for (EHRMamba unless `architecture: gpt`)."""
    return EHRGPTForTaskClassification if getattr(config, ARCHITECTURE_FIELD, None) == GPT \
        else EHRMambaForTaskClassification
