"""The model's GPU path: the mixer hands its strided views to the Triton scan (run by Triton's CPU
interpreter here) and gets the torch backend's outputs and gradients back."""

import pytest
from interpreted import TINY_MODEL_SCRIPT, run_interpreted

SCRIPT = TINY_MODEL_SCRIPT.replace("LAYERS", "2") + r"""
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
    run_interpreted(SCRIPT)
