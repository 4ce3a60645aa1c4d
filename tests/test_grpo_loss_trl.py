"""GRPO loss parity with TRL 1.16 itself: TRL's real `GRPOTrainer._compute_loss`, called unbound on a stand-in
`self` that holds exactly what the method reads, against fusedrl's reference (and the public op on each backend
that runs here). Compared: the loss, its gradient w.r.t. the policy log-probs, and every metric both sides log.

TRL only logs metrics; fusedrl returns them. TRL's `clip_ratio/low_min` and `clip_ratio/high_max` (min/max over
sequences) have no fusedrl counterpart, and fusedrl's `ratio_mean` has no TRL counterpart.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fusedrl.kernels import grpo_loss
from fusedrl.kernels.grpo_loss import reference

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", exc_type=ImportError,
                                   reason="parity with TRL needs `pip install trl` (with its datasets)")
TRL_COMPUTE_LOSS = grpo_trainer.GRPOTrainer._compute_loss

B, T = 5, 17
LENGTHS = (17, 9, 0, 13, 4)  # ragged, and row 2 fully masked
MAX_LEN = 20  # TRL's max_completion_length: dr_grpo divides by it, not by T
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIP_FAMILY + ("cispo", "sapo")
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO's), so a swapped bound shows
CISPO_EPS_HIGH = 1.25  # CISPO's cap on the ratio; low enough that the drift below reaches it
DELTA = 1.5  # above 1 + EPS_HIGH, as TRL recommends
SAPO_TAU = (0.8, 1.3)  # (positive, negative advantage); unequal so a swap shows
NUM_ITEMS = 41.0  # dapo/cispo: tokens in the whole generation batch (more than this micro-batch holds)
TRL_ONLY_METRICS = {"clip_ratio/low_min", "clip_ratio/high_max"}
FUSEDRL_ONLY_METRICS = {"ratio_mean"}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6)}
# TRL counts clipped tokens in float32 whatever the input dtype (`is_low_clipped.float()`, `mask.sum().float()`), so
# its clip fractions are the exact fraction rounded to float32: compared at float32's resolution.
COUNT_METRICS = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"}
COUNT_TOL = dict(rtol=2 * torch.finfo(torch.float32).eps, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------
# implementations under test
# ---------------------------------------------------------------------------------------------------------------


IMPLS = ["reference", "torch", "triton"]  # the reference itself, and the public op with FUSEDRL_BACKEND forced
DTYPES = [torch.float64, torch.float32]


def _dtype_for(impl):
    """float64 where the implementation takes it (the tight comparison); the Triton kernels refuse float64."""
    return torch.float32 if impl == "triton" else torch.float64


def _run_impl(impl, use_backend, logp, old_logp, advantages, mask, **kw):
    if impl == "reference":
        return reference.grpo_loss(logp, old_logp, advantages, mask, **kw)
    use_backend(impl)
    loss, metrics = grpo_loss(logp, old_logp, advantages, mask, **kw)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


def _inputs(dtype, adv_per_token, lengths=LENGTHS, seed=0):
    """Realistic log-probs with drift between the old and current policy: row 0 (advantage > 0) drifts up, row 1
    (advantage < 0) down, so the ratios straddle both clip bounds, also as sequence means (GSPO); rows 3 and 4 drift
    little, so at sequence level some sequences stay unclipped and the gradient is not all zero; token (1, 2) gets
    r = e^0.6 > DELTA with a negative advantage, so two-sided clipping acts. Row 4 has advantage exactly 0 (a group
    whose rewards were all equal), with ratios beyond both bounds: TRL counts it as clipped on neither side."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int32)  # TRL's completion_mask dtype
    logp = -1.0 - 4.0 * torch.rand(B, T, **f64)
    drift = 0.3 * torch.randn(B, T, **f64) + torch.tensor([0.35, -0.5, 0.0, 0.05, -0.1], dtype=torch.float64)[:, None]
    drift[1, 2], drift[0, 3], drift[4, 0], drift[4, 1] = 0.6, -0.6, 0.4, -0.4
    old_logp = (logp - drift).clamp(max=-1e-3)  # log_ratio = logp - old_logp ~ drift
    ref_logp = (logp + 0.25 * torch.randn(B, T, **f64)).clamp(max=-1e-3)
    entropy = 2.0 * torch.rand(B, T, **f64)
    advantages = torch.tensor([1.3, -0.7, 0.45, -0.2, 0.0], dtype=torch.float64)
    if adv_per_token:
        advantages = advantages[:, None] + 0.3 * torch.randn(B, T, **f64)
        advantages[1, 2] = -0.9
        advantages[4] = 0.0
    cast = lambda t: t.to(dtype)
    return dict(logp=cast(logp), old_logp=cast(old_logp), ref_logp=cast(ref_logp), entropy=cast(entropy),
                advantages=cast(advantages), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# TRL's own code on a stand-in trainer
# ---------------------------------------------------------------------------------------------------------------


class _SingleProcessAccelerator:
    """What `_compute_loss` asks of `accelerate.Accelerator` on one process: collectives are identities."""

    num_processes = 1

    def reduce(self, x, reduction="sum"):
        assert reduction == "sum"
        return x

    def gather(self, x):
        return x


def _trl_self(cfg, logp, entropy):
    """A stand-in `self` for `GRPOTrainer._compute_loss` (TRL 1.16): exactly what the method reads on every path
    this file runs (recorded), including the flags that switch off the paths fusedrl does not cover (entropy mask,
    off-policy mask, vLLM importance sampling, aux loss, entropy bonus). SimpleNamespace raises AttributeError on
    anything else, so a TRL that reads more fails loudly here rather than silently."""

    def get_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False,
                                compute_aux_loss=False, **multimodal):
        assert input_ids.shape == (B, cfg["prompt_len"] + T) and attention_mask.shape == input_ids.shape
        assert logits_to_keep == T and compute_entropy and not compute_aux_loss
        assert all(v is None for v in multimodal.values())
        return logp, entropy, None

    args = SimpleNamespace(
        delta=cfg["delta"],
        use_bias_correction_kl=cfg["use_bias_correction_kl"],
        sapo_temperature_pos=SAPO_TAU[0],
        sapo_temperature_neg=SAPO_TAU[1],
        steps_per_generation=1,
    )
    return SimpleNamespace(
        loss_type=cfg["loss_type"],
        beta=cfg["beta"],
        epsilon_low=cfg["eps_low"],
        epsilon_high=cfg["eps_high"],
        importance_sampling_level=cfg["importance_level"],
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,  # `use_vllm and vllm_importance_sampling_correction`: the second is then never read
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        max_completion_length=MAX_LEN,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=_SingleProcessAccelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=args,
        _get_per_token_logps_and_entropies=get_logps_and_entropies,
    )


def _trl(cfg, data, old_present, num_items):
    """TRL's loss, d loss / d logp, and its logged metrics (mode "train", one step)."""
    logp = data["logp"].detach().clone().requires_grad_()
    trainer = _trl_self(cfg, logp, data["entropy"])
    prompt_len = cfg["prompt_len"]
    inputs = {
        "prompt_ids": torch.randint(0, 100, (B, prompt_len)),
        "prompt_mask": torch.ones(B, prompt_len, dtype=torch.int32),
        "completion_ids": torch.randint(0, 100, (B, T)),
        "completion_mask": data["mask"],
        "advantages": data["advantages"],
    }
    if old_present:
        inputs["old_per_token_logps"] = data["old_logp"]
    if cfg["beta"] != 0.0:
        inputs["ref_per_token_logps"] = data["ref_logp"]
    if cfg["loss_type"] in ("dapo", "cispo"):
        inputs["num_items_in_batch"] = torch.tensor(num_items)
    loss = TRL_COMPUTE_LOSS(trainer, model=object(), inputs=inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert all(len(v) == 1 for v in trainer._metrics["train"].values())
    assert set(trainer._metrics) == {"train"}
    return loss.detach(), logp.grad, metrics


def _fused(impl, use_backend, cfg, data, old_present, num_items):
    logp = data["logp"].detach().clone().requires_grad_()
    loss, metrics = _run_impl(
        impl, use_backend, logp, data["old_logp"] if old_present else None, data["advantages"], data["mask"],
        ref_logp=data["ref_logp"] if cfg["beta"] != 0.0 else None, beta=cfg["beta"], loss_type=cfg["loss_type"],
        eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], delta=cfg["delta"], importance_level=cfg["importance_level"],
        use_bias_correction_kl=cfg["use_bias_correction_kl"], kl_estimator="k3", max_len=MAX_LEN,
        num_items=num_items, sapo_tau=SAPO_TAU, entropy=data["entropy"])
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, {k: float(v) for k, v in metrics.items()}


def _cfg(loss_type, importance_level="token", beta=0.0, use_bias_correction_kl=True, delta=None):
    return dict(loss_type=loss_type, importance_level=importance_level, beta=beta,
                use_bias_correction_kl=use_bias_correction_kl, delta=delta, eps_low=EPS_LOW,
                eps_high=CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH, prompt_len=2)


def _compare(impl, use_backend, cfg, dtype, adv_per_token, old_present, num_items=NUM_ITEMS, trl_num_items=None,
             lengths=LENGTHS):
    data = _inputs(dtype, adv_per_token, lengths)
    trl_loss, trl_grad, trl_metrics = _trl(cfg, data, old_present, NUM_ITEMS if trl_num_items is None
                                           else trl_num_items)
    loss, grad, metrics = _fused(impl, use_backend, cfg, data, old_present, num_items)
    tol = TOL[dtype]

    assert loss.shape == () and loss.dtype == trl_loss.dtype
    torch.testing.assert_close(loss, trl_loss, **tol, msg=lambda m: f"loss vs TRL: {m}")
    assert grad.dtype == trl_grad.dtype
    if data["mask"].any():
        assert trl_grad[data["mask"].bool()].abs().max() > 0  # the gradient is not trivially zero
    torch.testing.assert_close(grad, trl_grad, **tol, msg=lambda m: f"d loss / d logp vs TRL: {m}")

    assert set(metrics) - FUSEDRL_ONLY_METRICS == set(trl_metrics) - TRL_ONLY_METRICS
    for key in set(trl_metrics) - TRL_ONLY_METRICS:
        torch.testing.assert_close(torch.tensor(metrics[key], dtype=torch.float64),
                                   torch.tensor(trl_metrics[key], dtype=torch.float64),
                                   **(COUNT_TOL if key in COUNT_METRICS else tol),
                                   msg=lambda m, key=key: f"metric {key!r} vs TRL: {m}")
    return data, trl_metrics


# ---------------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------------


def _grid():
    kl_settings = [(0.0, True), (0.04, True), (0.04, False)]  # (beta, use_bias_correction_kl)
    for loss_type, level, (beta, bias), adv_pt, old in itertools.product(
            LOSS_TYPES, ["token", "sequence"], kl_settings, [False, True], [False, True]):
        for delta in ([None, DELTA] if loss_type in CLIP_FAMILY else [None]):
            kl_id = f"beta{beta}" + ("" if beta == 0 else f"-biascorr{bias}")
            delta_id = "" if delta is None else f"-delta{delta}"
            yield pytest.param(_cfg(loss_type, level, beta, bias, delta), adv_pt, old,
                               id=f"{loss_type}-{level}-{kl_id}-adv{'BT' if adv_pt else 'B'}-"
                                  f"{'old' if old else 'noold'}{delta_id}")


@pytest.mark.parametrize(("impl", "dtype"), [pytest.param(i, d, id=f"{i}-{str(d)[6:]}") for i in IMPLS for d in DTYPES
                                             if not (i == "triton" and d == torch.float64)])
@pytest.mark.parametrize(("cfg", "adv_per_token", "old_present"), list(_grid()))
def test_matches_trl(impl, dtype, cfg, adv_per_token, old_present, use_backend):
    data, trl_metrics = _compare(impl, use_backend, cfg, dtype, adv_per_token, old_present)

    # The case must exercise what it names, or it proves nothing.
    if not old_present:
        return
    m = data["mask"].bool()
    log_ratio = (data["logp"] - data["old_logp"]).double()
    adv = data["advantages"].double()
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    if cfg["importance_level"] == "sequence":
        mf = m.double()
        log_ratio = ((log_ratio * mf).sum(-1) / mf.sum(-1).clamp(min=1))[:, None].expand(B, T)
    ratio = log_ratio.exp()
    if cfg["loss_type"] in CLIP_FAMILY:
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
        if cfg["delta"] is not None and cfg["importance_level"] == "token":
            assert ((ratio > cfg["delta"]) & (adv < 0) & m).any()  # two-sided clipping acts on some token
    elif cfg["loss_type"] == "cispo":
        assert trl_metrics["cispo_clip_ratio"] > 0
        if cfg["importance_level"] == "token":
            assert ((ratio < cfg["eps_high"]) & (adv > 0) & m).any()  # and some are not capped
    else:  # sapo: soft gate on both sides of r = 1, for both advantage signs
        assert ((ratio > 1) & m).any() and ((ratio < 1) & m).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_num_items_default_is_tokens_in_batch(impl, loss_type, use_backend):
    """num_items=None normalizes by this batch's tokens: TRL with num_items_in_batch = mask.sum()."""
    n_tokens = float(sum(LENGTHS))
    _compare(impl, use_backend, _cfg(loss_type, beta=0.04), _dtype_for(impl), True, True, num_items=None,
             trl_num_items=n_tokens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_rows_masked(impl, loss_type, use_backend):
    """No completion token at all: TRL's clamps keep every normalizer >= 1 and nothing is NaN; same here."""
    _, trl_metrics = _compare(impl, use_backend, _cfg(loss_type, beta=0.04), _dtype_for(impl), False, True,
                              lengths=(0,) * B)
    assert all(v == v for k, v in trl_metrics.items() if k not in TRL_ONLY_METRICS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [1.1, 1 + EPS_HIGH, 0.7])
def test_delta_at_or_below_upper_clip_bound(impl, level, delta, use_backend):
    """TRL computes its clip_ratio metrics from coef_1 AFTER `coef_1 = clamp(coef_1, max=delta)`: with delta <=
    1 + eps_high (TRL recommends, but does not require, delta > 1 + eps_high) it never counts a token as
    high-clipped, and with delta < 1 - eps_low it counts every ratio above delta (A < 0) as low-clipped. fusedrl
    counts the same way (an earlier reference counted on the unclamped ratio; loss and gradient never differed)."""
    _compare(impl, use_backend, _cfg("grpo", level, delta=delta), _dtype_for(impl), False, True)
