"""fusedrl's LLM ops against independent peer implementations, in fp32 at odd sizes, forward and gradients.

Peers (each test skips when its peer is not installed; the `test` extra installs them):

- Cut Cross-Entropy (`cut-cross-entropy`, Apple): `linear_cross_entropy(e, c, targets, impl="torch_compile")`
  (cut_cross_entropy/torch_compile.py: drops ignored rows, `logits = e @ c.T`, optional
  `softcap * tanh(logits / softcap)`, `F.cross_entropy(logits.float(), ...)` under
  `torch.compile(fullgraph=True, dynamic=True)`) runs on CPU. Its default `impl="cce"` is Triton: without a GPU it
  fails ("0 active drivers"), and under TRITON_INTERPRET=1 its `tl_logaddexp` fails in the interpreter.
  CCE has no bias and no temperature, so those are checked against Liger instead.
- Liger-Kernel (`liger-kernel`):
  * `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss` (chunked_loss/grpo_loss.py, fused_linear_ppo.py): log-probs
    by a torch sequence x vocab chunked loop (4096-wide vocab chunks), then the loss math, optionally under
    `torch.compile` (`compiled=`). Pure torch: runs on CPU, compiled or not.
  * `liger_kernel.transformers.grpo_loss.triton_grpo_loss` (ops/grpo_loss.py, Triton, from logits [B, T+1, V]) and
    `liger_kernel.transformers.functional.liger_fused_linear_cross_entropy` (ops/fused_linear_cross_entropy.py:
    torch matmuls + a Triton CE kernel) also run on CPU under TRITON_INTERPRET=1, which conftest sets (the CE
    kernel's softcap branch does not: the interpreter fails in it).

Where Liger 0.8.5 differs from TRL 1.16's `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py), which fusedrl
follows; the tests compare only the cases where the two agree:

1. luspo aggregation. TRL 1.16 (grpo_trainer.py:3179): `loss = (per_token_loss * mask).sum(-1).mean()`.
   Liger chunked (chunked_loss/grpo_loss.py, `elif loss_type == "luspo"`):
   `weighted = per_token_loss * attention_mask.sum(1, keepdim=True); loss = weighted.sum() / (B * weighted.shape[1])`,
   and Liger Triton (ops/grpo_loss.py `_reduce_loss`): `(per_token_loss * mask.sum(-1, keepdim=True)).mean()` --
   TRL's older form. They agree with TRL 1.16 only when every mask row is full, or (chunked only) at sequence level
   with beta == 0, where per_token_loss is [B, 1]. Tested: "luspo-full-mask", "gspo-luspo-full-mask", "gspo-luspo".
2. use_bias_correction_kl defaults to False in Liger (LigerFusedLinearGRPOLoss.__init__, triton_grpo_loss), True in
   TRL 1.16 (trl/trainer/grpo_config.py:972). The tests always pass it explicitly.
3. Liger takes only per-sequence advantages [B] (`advantages.unsqueeze(1)`); TRL (grpo_trainer.py:3058) and fusedrl
   also take per-token [B, T]. Not compared.
4. Liger refuses importance_sampling_level="sequence" with cispo/sapo/vespo (ValueError in ppo_loss_fn and
   GrpoLossFunction.forward); TRL 1.16 runs them ([B, 1] weights broadcast). Not compared.
5. Clip metric at sequence level: Liger expands the per-sequence `is_clipped` to tokens and takes a token-weighted
   mean (`is_clipped.expand_as(attention_mask)`); TRL's `global_masked_mean` of a [B, 1] tensor averages over
   sequences (grpo_trainer.py:3260). Metrics are compared at token level only.
6. Clip metrics with `delta`: TRL computes `is_low/high_clipped` from coef_1 after `coef_1 = clamp(coef_1, max=delta)`
   (grpo_trainer.py:3116 then 3274); Liger (both paths) from coef_1 before the delta clamp. Equal whenever
   delta >= 1 + eps_high (TRL's recommendation); the test uses delta = 1.3 > 1.2.
7. dapo/cispo normalizer: TRL divides by `num_items_in_batch / num_processes * grad_accum_steps /
   steps_per_generation` (grpo_trainer.py:3170-3172); Liger by `num_items_in_batch / world_size` (or the all-reduced
   mask sum). Equal on one process with the default steps_per_generation == grad_accum_steps; tested with the batch's
   own mask sum (num_items=None in fusedrl, num_items_in_batch=None in Liger).
8. Liger has no kl_estimator other than k3, no softcap on the GRPO path and no `vespo` parity target in fusedrl
   (fusedrl refuses vespo); only k3 without softcap is compared.
9. Masked positions: Liger scores every position (labels must be valid ids), fusedrl scores masked positions as
   ignored (logp = 0, no gradient); the loss only reads masked-in positions, so both give the same loss.
10. A Liger bug, not a formula choice: Liger's Triton luspo backward at token level (ops/grpo_loss.py,
   `GrpoLossFunction.backward`, `elif loss_type == "luspo"`) builds `dloss = dloss_input * seq_lens_bwd / (B * L)`
   of shape [B, 1] and passes `*dloss.stride()` = (1, 1) to `_grpo_loss_bwd_kernel`, which reads
   `DLOSS + off_b * stride0 + off_l * stride1`: the wrong rows, and past the end of the [B, 1] buffer for
   b + l >= B (garbage such as 4e10 in the gradient under the interpreter). Its forward agrees with fusedrl; its
   token-level luspo gradient is not compared (sequence level masks dloss to [B, L] first and is compared).
"""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import fused_linear_grpo_loss, grpo_loss, logprobs_from_logits, token_logprobs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ("torch", "triton")


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max |want|: the error relative to the scale of the peer's tensor."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max |fusedrl - peer| = {err:.3g}, scale {scale:.3g}, tol {tol:g}"


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy from hidden states: Cut Cross-Entropy (torch_compile path) and Liger's fused linear CE
# ---------------------------------------------------------------------------------------------------------------


def _ce_inputs(N: int, H: int, V: int, *, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)  # logits with std ~2: softcap matters
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3::7] = -100
    labels[-1] = V - 1  # last vocabulary row, in the vocabulary's ragged last tile
    return hidden.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE), labels.to(DEVICE)


def _fusedrl_ce(hidden, weight, labels, *, bias=None, softcap=None):
    """Per-token CE = -logp and the gradients of its mean over the scored tokens, from token_logprobs."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    logp = token_logprobs(h, w, labels, bias=b, softcap=softcap)
    ce = -logp
    mean = ce.sum() / (labels != -100).sum()
    grads = torch.autograd.grad(mean, [t for t in (h, w, b) if t is not None])
    return ce.detach(), mean.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["no-softcap", "softcap"])
def test_cut_cross_entropy(backend, softcap, use_backend):
    """CCE's linear_cross_entropy(impl="torch_compile") per token (reduction="none") == -token_logprobs, ignored
    labels 0 in both; CCE's mean (reduction="mean", over non-ignored tokens) and its gradients w.r.t. hidden and
    weight == those of mean(-token_logprobs)."""
    pytest.importorskip("cut_cross_entropy")
    from cut_cross_entropy import linear_cross_entropy

    # V > 4096 in both: torch.compile's CPU code for CCE is specialized on `4097 <= V`, a smaller V recompiles it.
    N, H, V = (127, 96, 50257) if backend == "torch" or DEVICE == "cuda" else (23, 32, 4099)
    hidden, weight, _, labels = _ce_inputs(N, H, V)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token = linear_cross_entropy(h, w, labels, softcap=softcap, reduction="none", impl="torch_compile")
    if softcap is None and backend == "torch":  # CCE's own mean reduction, and its gradients
        want_mean = linear_cross_entropy(h, w, labels, reduction="mean", impl="torch_compile")
    else:  # the same quantity from the per-token losses (each torch.compile of CCE's graph costs seconds on CPU)
        want_mean = per_token.sum() / (labels != -100).sum()
    want_grads = torch.autograd.grad(want_mean, (h, w))

    use_backend(backend)
    ce, mean, grads = _fusedrl_ce(hidden, weight, labels, softcap=softcap)
    assert torch.all(per_token[labels == -100] == 0) and torch.all(ce[labels == -100] == 0)
    _assert_close(ce, per_token, 2e-6, "per-token CE")
    _assert_close(mean, want_mean, 2e-6, "mean CE")
    for name, got, want in zip(("d hidden", "d weight"), grads, want_grads):
        _assert_close(got, want, 2e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_fused_linear_cross_entropy(backend, use_backend):
    """Liger's fused linear CE (with an LM-head bias): per token == -token_logprobs(bias=...), and the gradients of
    its mean w.r.t. hidden, weight and bias. Its Triton CE kernel runs under TRITON_INTERPRET=1 here; its softcap
    branch does not (the interpreter fails in it), so softcap is checked against CCE only."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Liger's fused linear CE is Triton: needs a GPU or TRITON_INTERPRET=1")
    N, H, V = 37, 48, 1031
    hidden, weight, bias, labels = _ce_inputs(N, H, V, bias=True, seed=1)

    per_token = liger_fused_linear_cross_entropy(hidden, weight, labels, bias, reduction="none")
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want_mean = liger_fused_linear_cross_entropy(h, w, labels, b, reduction="mean")
    want_grads = torch.autograd.grad(want_mean, (h, w, b))

    use_backend(backend)
    ce, mean, grads = _fusedrl_ce(hidden, weight, labels, bias=bias)
    _assert_close(ce, per_token, 2e-6, "per-token CE")
    _assert_close(mean, want_mean, 2e-6, "mean CE")
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, want_grads):
        _assert_close(got, want, 2e-5, name)


# ---------------------------------------------------------------------------------------------------------------
# GRPO loss family: Liger's chunked fused-linear GRPO loss (torch) and its Triton GRPO loss from logits
# ---------------------------------------------------------------------------------------------------------------

# id -> options in fusedrl's names; "old": pass old log-probs (else on-policy), "full_mask": every mask row full,
# "bias"/"temperature": LM-head bias and sampling temperature, "compiled"/"chunk_size": Liger's own options.
GRPO_CASES = {
    "grpo-kl-biascorr": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, eps_high=0.28),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo-kl": dict(loss_type="dr_grpo", beta=0.1, use_bias_correction_kl=False),
    "dapo-kl": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, eps_low=0.15, eps_high=0.28),
    "dapo-delta": dict(loss_type="dapo", delta=1.3),
    "dapo-on-policy": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True, old=False),
    "cispo": dict(loss_type="cispo", eps_high=1.2),
    "sapo-kl": dict(loss_type="sapo", beta=0.04, use_bias_correction_kl=True, sapo_tau=(1.0, 1.05)),
    "gspo-kl": dict(loss_type="grpo", importance_level="sequence", beta=0.04, use_bias_correction_kl=True),
    "gspo-dapo": dict(loss_type="dapo", importance_level="sequence", eps_low=3e-4, eps_high=4e-4),
    "gspo-luspo": dict(loss_type="luspo", importance_level="sequence"),
    "luspo-full-mask": dict(loss_type="luspo", beta=0.04, use_bias_correction_kl=True, full_mask=True),
    "gspo-luspo-full-mask": dict(loss_type="luspo", importance_level="sequence", beta=0.04,
                                 use_bias_correction_kl=True, full_mask=True),
    "grpo-bias-temperature": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, bias=True,
                                  temperature=0.7),
    "bnpo-compiled-chunk2": dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=True, compiled=True,
                                 chunk_size=2),
}
PEER_ONLY = ("old", "full_mask", "bias", "temperature", "compiled", "chunk_size")


def _grpo_inputs(B: int, T: int, H: int, V: int, *, full_mask: bool, bias: bool, temperature: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, 1::5] &= torch.rand(B, len(range(1, T, 5)), generator=g) > 0.5  # holes, as a tool mask makes
    mask[:, 0] = True
    if full_mask:
        mask[:] = True
    advantages = torch.randn(B, generator=g)
    advantages[0], advantages[1] = advantages[0].abs() + 0.1, -advantages[1].abs() - 0.1  # both signs
    with torch.no_grad():
        logits = hidden @ weight.T + (0 if b is None else b)
        logp = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # ratios ~ exp(+-0.3): both clip sides are hit
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(dev(t) for t in (hidden, weight, b, labels, mask, advantages, old, ref))


def _case(case_id: str, T: int):
    opts = dict(GRPO_CASES[case_id])
    peer = {k: opts.pop(k) for k in PEER_ONLY if k in opts}
    opts.setdefault("beta", 0.0)
    opts.setdefault("use_bias_correction_kl", True)
    if opts["loss_type"] == "dr_grpo":
        opts["max_len"] = T + 5
    return opts, peer


def _liger_options(opts: dict) -> dict:
    """fusedrl's grpo_loss options in Liger's names."""
    return dict(beta=opts["beta"], epsilon_low=opts.get("eps_low", 0.2), epsilon_high=opts.get("eps_high", 0.2),
                loss_type=opts["loss_type"], max_completion_length=opts.get("max_len"),
                importance_sampling_level=opts.get("importance_level", "token"),
                sapo_temperature_pos=opts.get("sapo_tau", (1.0, 1.05))[0],
                sapo_temperature_neg=opts.get("sapo_tau", (1.0, 1.05))[1], delta=opts.get("delta"),
                use_bias_correction_kl=opts["use_bias_correction_kl"])


def _compare_metrics(metrics: dict, peer_metrics: list, opts: dict) -> None:
    """Liger returns [kl (beta != 0), clip ratio]; its clip ratio is TRL's clip_ratio/region_mean (clip family) or
    cispo_clip_ratio, compared at token level only (difference 5 in the module docstring); sapo has none."""
    peer_metrics = list(peer_metrics)
    if opts["beta"] != 0.0:
        _assert_close(metrics["kl"], peer_metrics.pop(0), 1e-5, "kl metric")
    if opts.get("importance_level", "token") == "token" and opts["loss_type"] != "sapo":
        name = "cispo_clip_ratio" if opts["loss_type"] == "cispo" else "clip_ratio/region_mean"
        _assert_close(metrics[name], peer_metrics[0], 1e-6, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(GRPO_CASES))
def test_liger_chunked_grpo_loss(case_id, backend, use_backend):
    """LigerFusedLinearGRPOLoss (torch, chunked, on CPU) == fused_linear_grpo_loss: loss, gradients w.r.t. hidden,
    weight (and bias), and the kl / clip-ratio metrics."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # torch: V over Liger's 4096-wide vocab chunk; triton (interpreted on CPU): small.
    B, T, H, V = (4, 37, 64, 5003) if backend == "torch" or DEVICE == "cuda" else (3, 13, 32, 1031)
    opts, peer = _case(case_id, T)
    temperature = peer.get("temperature", 1.0)
    hidden, weight, bias, labels, mask, adv, old, ref = _grpo_inputs(
        B, T, H, V, full_mask=peer.get("full_mask", False), bias=peer.get("bias", False), temperature=temperature)
    old = old if peer.get("old", True) else None
    params = lambda: [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]  # noqa: E731

    # Liger's torch.compile'd loss math is compiled once (torch variant), the triton variant runs it eagerly: it is
    # the same peer either way and each CPU compile costs seconds.
    compiled = peer.get("compiled", False) and backend == "torch"
    liger = LigerFusedLinearGRPOLoss(compiled=compiled, use_ref_model=True,
                                     chunk_size=peer.get("chunk_size", 1), temperature=temperature,
                                     **_liger_options(opts))
    p = params()
    want, want_metrics = liger(p[0], p[1], labels, mask.long(), adv, bias=p[2] if bias is not None else None,
                               ref_per_token_logps=ref, old_per_token_logps=old)
    want_grads = torch.autograd.grad(want, p)

    use_backend(backend)
    q = params()
    got, metrics = fused_linear_grpo_loss(q[0], q[1], labels, adv, mask, old_logp=old, ref_logp=ref,
                                          bias=q[2] if bias is not None else None, temperature=temperature, **opts)
    got_grads = torch.autograd.grad(got, q)

    _assert_close(got, want, 2e-6, "loss")
    for name, g, w in zip(("d hidden", "d weight", "d bias"), got_grads, want_grads):
        _assert_close(g, w, 5e-5, name)
    _compare_metrics(metrics, want_metrics, opts)


TRITON_GRPO_CASES = ("grpo-kl-biascorr", "bnpo", "dr_grpo-kl", "dapo-delta", "dapo-on-policy", "cispo", "sapo-kl",
                     "gspo-kl", "gspo-luspo-full-mask", "grpo-bias-temperature")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", TRITON_GRPO_CASES)
def test_liger_triton_grpo_loss(case_id, backend, use_backend):
    """Liger's Triton GRPO loss from logits [B, T + 1, V] (its last position is dropped) == grpo_loss(
    logprobs_from_logits(logits[:, :-1], ...)): loss and gradient w.r.t. the logits. Runs under TRITON_INTERPRET=1."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Liger's GRPO loss is Triton: needs a GPU or TRITON_INTERPRET=1")
    B, T, H, V = 3, 11, 24, 257
    opts, peer = _case(case_id, T)
    temperature = peer.get("temperature", 1.0)
    hidden, weight, bias, labels, mask, adv, old, ref = _grpo_inputs(
        B, T, H, V, full_mask=peer.get("full_mask", False), bias=peer.get("bias", False), temperature=temperature)
    old = old if peer.get("old", True) else None
    with torch.no_grad():
        logits = hidden @ weight.T + (0 if bias is None else bias)
        extra = torch.randn(B, 1, V, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        logits = torch.cat([logits, extra], dim=1).contiguous()  # [B, T + 1, V]: Liger drops the last position

    lg = logits.clone().requires_grad_()
    lopts = _liger_options(opts)
    lopts["eps_low"], lopts["eps_high"] = lopts.pop("epsilon_low"), lopts.pop("epsilon_high")
    want, want_metrics = triton_grpo_loss(lg, old, ref, labels, adv, mask.long().contiguous(),
                                          temperature=temperature, inplace=False, reduce=True, **lopts)
    (want_grad,) = torch.autograd.grad(want, lg)

    use_backend(backend)
    lf = logits.clone().requires_grad_()
    logp = logprobs_from_logits(lf[:, :-1], labels, temperature=temperature)
    got, metrics = grpo_loss(logp, old, adv, mask, ref_logp=ref, **opts)
    (got_grad,) = torch.autograd.grad(got, lf)

    _assert_close(got, want, 2e-6, "loss")
    _assert_close(got_grad[:, :-1] * mask[..., None], want_grad[:, :-1] * mask[..., None], 5e-5, "d logits")
    assert torch.all(got_grad[:, -1] == 0) and torch.all(got_grad[:, :-1][~mask] == 0)
    _compare_metrics(metrics, want_metrics, opts)
