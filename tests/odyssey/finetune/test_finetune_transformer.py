"""The GPT-style baseline: same head on a transformer backbone, trained and compared like EHRMamba."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import TINY_MODEL

from odyssey.finetune import evaluate, finetune, load_finetuned
from odyssey.finetune.transformer import EHRGPTForTaskClassification
from odyssey.models import EHRMambaConfig

VOCAB = 60


def test_gpt_head_reads_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    config = EHRMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, time_embedding_size=8,
                            embedding_dropout=0.0, task_names=["t"], task_outputs=[1], task_prompt_ids=[[24]],
                            architecture="gpt", gpt_layers=2, gpt_heads=2, gpt_positions=64)
    model = EHRGPTForTaskClassification(config).eval()
    ids = torch.randint(33, VOCAB, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    changed_future = padded.clone()
    changed_future[0, 9:] = 40  # tokens after the last real one are padding: they must not matter
    with torch.no_grad():
        alone = model(ids, task_index=torch.tensor([0])).logits
        with_padding = model(padded, task_index=torch.tensor([0]), attention_mask=mask).logits
        other_padding = model(changed_future, task_index=torch.tensor([0]), attention_mask=mask).logits
    torch.testing.assert_close(with_padding, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other_padding, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the transformer's 64 positions"):
        model(torch.randint(33, VOCAB, (1, 65)), task_index=torch.tensor([0]))


def test_gpt_baseline_trains_saves_and_joins_the_comparison(cohort, tmp_path):
    fields = dict(data=cohort.seq, labels=cohort.labels, tasks=["mortality_30d", "los_7d"], context_length=32,
                  batch_size=16, max_steps=3, model=TINY_MODEL, scan_backend="torch", progress_bar=False)
    gpt = finetune(out=tmp_path / "gpt", architecture="gpt", **fields)
    assert isinstance(gpt.model, EHRGPTForTaskClassification)
    loaded, specs = load_finetuned(tmp_path / "gpt")
    assert isinstance(loaded, EHRGPTForTaskClassification) and [s.name for s in specs] == fields["tasks"]
    finetune(out=tmp_path / "mamba", **fields)
    report = evaluate(model=tmp_path / "mamba", data=cohort.seq, labels=cohort.labels, out=tmp_path / "eval",
                      compare={"gpt_32": tmp_path / "gpt"}, baselines=[], resamples=20, progress_bar=False)
    assert report["models"] == ["ehrmamba_mtf", "gpt_32"]
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["outputs"]["los_7d"]["models"]["gpt_32"]["auroc"]["value"] is not None
    with pytest.raises(ValueError, match="trains from scratch"):
        finetune(out=tmp_path / "bad", architecture="gpt", pretrained=tmp_path / "mamba", **fields)
