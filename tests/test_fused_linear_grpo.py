"""fused_linear_grpo_loss = grpo_loss(token_logprobs(...)) without [N, V], against the naive float64 chain:
logits = h W^T -> log_softmax -> gather -> TRL's loss formula."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import fused_linear_grpo_loss
from fusedrl.kernels.grpo_loss import reference as loss_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
B, T, H, V = 2, 9, 32, 300
OPTIONS = dict(beta=0.04, loss_type="grpo", eps_low=0.2, eps_high=0.28, delta=None, importance_level="token",
               use_bias_correction_kl=True, kl_estimator="k3", max_len=None, num_items=None, sapo_tau=(1.0, 1.05))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_matches_naive_chain(loss_type, frozen_head, backend, use_backend):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    labels[1, 6:] = 10**6  # garbage past the completion must not matter
    with torch.no_grad():
        logits = hidden @ weight.T
        base_logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(max=V - 1)[..., None])[..., 0]
    old = base_logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = base_logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([0.7, -1.2], dtype=torch.float64)
    opts = {**OPTIONS, "loss_type": loss_type, "eps_high": 1.2 if loss_type == "cispo" else 0.28}

    h64 = hidden.clone().to(DEVICE).requires_grad_()
    w64 = weight.clone().to(DEVICE).requires_grad_(not frozen_head)
    safe = labels.clamp(max=V - 1).to(DEVICE)
    logp = torch.log_softmax(h64 @ w64.T, -1).gather(-1, safe[..., None])[..., 0]
    want, _ = loss_reference.grpo_loss(logp, old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), ref_logp=ref.to(DEVICE),
                                       entropy=None, **opts)
    want_grads = torch.autograd.grad(want, [t for t in (h64, w64) if t.requires_grad])

    use_backend(backend)
    h = hidden.float().to(DEVICE).requires_grad_()
    w = weight.float().to(DEVICE).requires_grad_(not frozen_head)
    got, metrics = fused_linear_grpo_loss(h, w, labels.to(DEVICE), adv.float().to(DEVICE), mask.to(DEVICE),
                                          old_logp=old.float().to(DEVICE), ref_logp=ref.float().to(DEVICE), **opts)
    got_grads = torch.autograd.grad(got, [t for t in (h, w) if t.requires_grad])
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=2e-5 * max(1e-3, e.abs().max().item()))
    assert "entropy" in metrics and metrics["entropy"] > 0
    if frozen_head:
        assert w.grad is None


def test_mask_must_match_labels():
    with pytest.raises(ValueError, match="mask must be a tensor shaped like labels"):
        fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                               torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\] \(sequences of completion positions\), "
                                         r"got \(6, 4\)"):
        fused_linear_grpo_loss(torch.randn(6, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long),
                               torch.zeros(2), torch.ones(6))
