"""The model's GPU path: the mixer hands its strided views to the Triton scan (run by Triton's CPU
interpreter here) and gets the torch backend's outputs and gradients back."""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from odyssey.models import EHRMambaConfig, EHRMambaForPretraining

torch.manual_seed(0)
config = EHRMambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, embedding_dropout=0.0)
model = EHRMambaForPretraining(config)
ids = torch.randint(1, 50, (2, 19))
mask = torch.ones_like(ids)
mask[1, :5] = 0
results = {}
for backend in ("torch", "triton"):
    for layer in model.backbone.layers:
        layer.mixer.scan_backend = backend
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    results[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
(logits_t, grads_t), (logits_x, grads_x) = results["torch"], results["triton"]
torch.testing.assert_close(logits_x, logits_t, rtol=1e-5, atol=1e-6)
for name, grad in grads_t.items():
    torch.testing.assert_close(grads_x[name], grad, rtol=1e-4, atol=1e-7, msg=name)
print("ok")
"""


@pytest.mark.slow
def test_model_on_the_triton_backend_matches_the_torch_backend():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
