"""EHRMamba models: save/load, loss, padding, recurrent decoding, gradient checkpointing, sizes."""

import math

import pytest
import torch

from odyssey.models import (
    MODEL_SIZES,
    EHRMambaConfig,
    EHRMambaForPretraining,
    EHRMambaModel,
    EHRMambaPretrainingOutput,
    count_parameters,
)
from odyssey.models.embeddings import time_deltas
from odyssey.models.modeling_ehrmamba import IGNORE_INDEX

VOCAB = 40


def tiny_model(seed: int = 0, **overrides) -> EHRMambaForPretraining:
    torch.manual_seed(seed)
    config = EHRMambaConfig.from_size("tiny", vocab_size=VOCAB, embedding_dropout=0.0, **overrides)
    return EHRMambaForPretraining(config).eval()


def ehr_batch(batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(batch, length, generator=generator) * 30, dim=1)
    return {
        "input_ids": torch.randint(1, VOCAB, (batch, length), generator=generator),
        "token_type_ids": torch.randint(1, 8, (batch, length), generator=generator),
        "ages": 40 + times / 365.25,
        "times": times,
        "visit_orders": torch.arange(length).repeat(batch, 1) // 4,
        "visit_segments": 1 + (torch.arange(length).repeat(batch, 1) // 4) % 2,
    }


def test_save_and_load_round_trip_uses_safetensors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = EHRMambaForPretraining.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embeddings.word_embeddings.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    batch = ehr_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    backbone = EHRMambaModel.from_pretrained(tmp_path)
    assert torch.equal(backbone.norm_f.weight, model.backbone.norm_f.weight)


def test_loss_is_next_token_cross_entropy_ignoring_padding():
    model = tiny_model()
    batch = ehr_batch()
    labels = batch["input_ids"].clone()
    labels[0, 8:] = IGNORE_INDEX
    output = model(**batch, labels=labels)
    assert isinstance(output, EHRMambaPretrainingOutput)
    logits = output.logits
    terms = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
        for b in range(2) for t in range(11) if labels[b, t + 1] != IGNORE_INDEX
    ]
    assert len(terms) == 11 + 7
    torch.testing.assert_close(output.loss, torch.stack(terms).mean())
    # What sits at ignored positions cannot change the loss.
    changed = labels.clone()
    changed[0, 8:] = IGNORE_INDEX
    batch2 = dict(batch)
    assert model(**batch2, labels=changed).loss.item() == pytest.approx(output.loss.item())


def test_left_padding_leaves_real_tokens_unchanged():
    model = tiny_model(seed=2)
    batch = ehr_batch(batch=1, length=9)
    pad = 5
    padded = {k: torch.cat([torch.zeros(1, pad, dtype=v.dtype), v], dim=1) for k, v in batch.items()}
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(**batch).logits
        shifted = model(**padded, attention_mask=mask).logits[:, pad:]
    torch.testing.assert_close(shifted, plain, rtol=1e-5, atol=1e-5)


def test_right_padding_does_not_change_earlier_positions():
    model = tiny_model(seed=3)
    batch = ehr_batch(batch=1, length=9)
    padded = {k: torch.cat([v, torch.zeros(1, 4, dtype=v.dtype)], dim=1) for k, v in batch.items()}
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded, attention_mask=mask).logits[:, :9], model(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_cached_decoding_matches_one_pass():
    model = tiny_model(seed=4)
    batch = ehr_batch(length=10)
    with torch.no_grad():
        full = model(**batch).logits
        head = {k: v[:, :3] for k, v in batch.items()}
        prefill = model(**head, use_cache=True)
        assert prefill.cache is not None and prefill.cache.seen_tokens == 3
        logits = [prefill.logits]
        for t in range(3, 10):
            step = model(**{k: v[:, t : t + 1] for k, v in batch.items()}, cache=prefill.cache)
            logits.append(step.logits)
        from_scratch_cache = model.backbone.empty_cache(2)
        scratch = model(**batch, cache=from_scratch_cache).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scratch, full, rtol=1e-4, atol=1e-5)
    assert from_scratch_cache.seen_tokens == 10


def test_inputs_embeds_replace_the_embedding_layer():
    model = tiny_model(seed=6)
    batch = ehr_batch()
    with torch.no_grad():
        embeds = model.backbone.embeddings(*(batch[k] for k in ("input_ids", "token_type_ids", "ages", "times",
                                                                   "visit_orders", "visit_segments")))
        torch.testing.assert_close(model(**batch, inputs_embeds=embeds).logits, model(**batch).logits)
        shifted = model(**batch, inputs_embeds=embeds + 1.0).logits
    assert not torch.allclose(shifted, model(**batch).logits)
    with pytest.raises(ValueError, match="not supported with a cache"):
        model(**batch, inputs_embeds=embeds, cache=model.backbone.empty_cache(2))
    with pytest.raises(ValueError, match="does not match input_ids"):
        model(**batch, inputs_embeds=embeds[:, :3])


def test_time_deltas_start_at_zero_and_skip_padding():
    times = torch.tensor([[0.0, 0.0, 5.0, 7.5], [3.0, 4.0, 10.0, 10.0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(time_deltas(times, mask), torch.tensor([[0.0, 0.0, 0.0, 2.5], [0.0, 1.0, 6.0, 0.0]]))
    torch.testing.assert_close(
        time_deltas(times[:, 2:], previous_times=torch.tensor([1.0, 4.0])), torch.tensor([[4.0, 2.5], [6.0, 0.0]])
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = ehr_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=5).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_no_position_table_and_visit_orders_past_the_table_are_clamped():
    model = tiny_model(max_visit_order=4)
    assert not any("position" in name for name in model.state_dict())
    batch = ehr_batch(length=20)
    batch["visit_orders"] = torch.arange(20).repeat(2, 1) * 1000
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def expected_parameter_count(hidden: int, layers: int, vocab: int, state: int = 16, kernel: int = 4) -> int:
    """Written out by hand from the architecture (docs/model.md), independent of the module tree."""
    H, E, N, R, k, T = hidden, 2 * hidden, state, math.ceil(hidden / 16), kernel, 32
    # in_proj, conv (weight + bias), x_proj, dt_proj (weight + bias), A_log, D, out_proj, block norm
    block = 2 * E * H + E * (k + 1) + E * (R + 2 * N) + R * E + E + E * N + E + E * H + H
    # concept table, two sinusoids (frequency + phase), tanh projection, type/visit/segment tables, LayerNorm
    embeddings = vocab * H + 2 * (2 * T) + (H + 2 * T) * H + H + 16 * H + 1024 * H + 3 * H + 2 * H
    return embeddings + layers * block + H  # + final norm; the head is tied to the concept table


def test_named_sizes_and_parameter_counts():
    tiny = EHRMambaForPretraining(EHRMambaConfig.from_size("tiny", vocab_size=1000))
    assert count_parameters(tiny) == expected_parameter_count(64, 2, 1000) == 204_736
    assert MODEL_SIZES["base"]["hidden_size"] == 768 and MODEL_SIZES["base"]["num_hidden_layers"] == 32
    with torch.device("meta"):
        base = EHRMambaForPretraining(EHRMambaConfig.from_size("base", vocab_size=1000))
    assert count_parameters(base) == expected_parameter_count(768, 32, 1000)
    assert count_parameters(base, exclude_embeddings=True) == expected_parameter_count(768, 32, 0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown model size"):
        EHRMambaConfig.from_size("huge")
    with pytest.raises(ValueError, match="time_embedding_size"):
        EHRMambaConfig(time_embedding_size=7)
