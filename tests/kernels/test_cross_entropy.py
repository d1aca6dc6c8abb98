"""The Triton cross-entropy against torch's, on CPU under the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from interpreter_guard import make_guard, reload_for_interpreter  # noqa: E402

from odyssey.kernels import cross_entropy, cross_entropy_kernels  # noqa: E402

reload_for_interpreter(cross_entropy_kernels)

_interpreted_only, test_module_in_fresh_process = make_guard(__file__)


def loss_and_grad(backend, logits, targets, reduction, upstream=1.0):
    logits = logits.detach().clone().requires_grad_()
    loss = cross_entropy.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction, backend=backend)
    (loss * upstream).backward()
    return loss, logits.grad


@pytest.mark.parametrize(("rows", "vocab", "block"), [(37, 13, None), (9, 300, 64), (1, 1, None), (20, 4096, 1024)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_matches_torch_in_float64(rows, vocab, block, reduction, monkeypatch):
    """Vocabularies inside one block, across several (300 in blocks of 64: the running maximum and sum), of one
    class; some targets ignored; an upstream gradient other than 1; large logits (exp would overflow unshifted)."""
    if block:
        monkeypatch.setattr(cross_entropy, "MAX_BLOCK", block)
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = 20 * torch.randn(rows, vocab, generator=gen)
    logits[0, 0] = 90.0
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[1::3] = -100
    ours = loss_and_grad("triton", logits, targets, reduction, upstream=0.37)
    torch32 = loss_and_grad("torch", logits, targets, reduction, upstream=0.37)
    ref = loss_and_grad("torch", logits.double(), targets, reduction, upstream=0.37)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-6, atol=1e-6)
    # float32 logits near 90 lose ~5e-6 in x - lse, for torch as for us: no worse than torch's own float32 error
    ours_err = (ours[1].double() - ref[1]).abs().max().item()
    torch_err = (torch32[1].double() - ref[1]).abs().max().item()
    assert ours_err <= 4 * torch_err + 1e-7, (ours_err, torch_err)


def test_bfloat16_logits_give_a_bfloat16_gradient_within_its_rounding():
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(16, 100, generator=gen)).bfloat16()
    targets = torch.randint(0, 100, (16,), generator=gen)
    loss, grad = loss_and_grad("triton", logits, targets, "mean")
    ref_loss, ref_grad = loss_and_grad("torch", logits.double(), targets, "mean")
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-4)


def test_all_targets_ignored_gives_torchs_nan_mean_and_zero_gradient():
    logits = torch.randn(4, 7)
    targets = torch.full((4,), -100)
    loss, grad = loss_and_grad("triton", logits, targets, "mean")
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_a_target_outside_the_vocabulary_gives_a_nan_loss_not_a_stray_read():
    logits = torch.randn(3, 5)
    loss = cross_entropy.cross_entropy(logits, torch.tensor([1, 7, -100]), backend="triton")
    assert torch.isnan(loss)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rows, vocab"):
        cross_entropy.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="loss backend"):
        cross_entropy.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="fast")


@pytest.mark.parametrize("num_items", [None, 29])
def test_the_pretraining_loss_is_the_same_on_either_backend(num_items, monkeypatch):
    """`next_token_loss` (every position against the next label, the last one ignored, no shifted copy) gives the
    same loss and logits gradient through the Triton kernels as through torch."""
    from odyssey.models.modeling_ehrmamba import IGNORE_INDEX, next_token_loss

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, 17, generator=gen)
    labels = torch.randint(0, 17, (3, 10), generator=gen)
    labels[0, 6:] = IGNORE_INDEX
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv(cross_entropy.BACKEND_ENV, backend)
        leaf = logits.clone().requires_grad_()
        loss = next_token_loss(leaf, labels, num_items)
        loss.backward()
        results.append((loss, leaf.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))  # the last position predicts nothing
