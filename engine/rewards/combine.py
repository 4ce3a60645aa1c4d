"""Several rewards as one: weighted sums with weights that change during training, per-reward z-scoring within
prompt groups (MixGRPO / DanceGRPO advantage aggregation), batch-wise Pareto selection (Parrot), penalty hooks,
and every reward's raw value kept on its own for logging.

    combo = CombinedReward({"hps": hps, "aesthetic": aes},
                           weights={"hps": 1.0, "aesthetic": LinearSchedule(0.0, 0.5, steps=1000)},
                           penalties={"artifacts": artifact_model}, penalty_weights={"artifacts": 2.0}, pareto="batch")
    out = combo.score_all(images, prompts, group_size=8, step=step)
    out.total        # [B]  sum_k w_k(step) r_k  -  sum_p v_p(step) pen_p          (the combined reward)
    out.advantages   # [B]  sum_k w_k z_k  -  sum_p v_p z_p, z = group-normalized  (normalize="per_reward")
    out.raw          # {"hps": [B], "aesthetic": [B], "artifacts": [B]}           (each term's raw value)
    out.pareto       # [B] bool, the non-dominated samples                        (pareto="batch" / "group")
    logger.log(out.log())                                                        # means and stds, one host sync

Rules, exactly:
- Weights: a number or a schedule `step -> number` (any callable, e.g. `LinearSchedule`, or a Lagrange multiplier
  that a constrained-RLHF loop updates with `set_weight`); evaluated at `step` (argument, else `self.step`, which
  `set_step` moves). Penalties are subtracted with their (positive) weight.
- Advantages (when group_size or group_ids is given; fusedrl.engine.advantages.group_advantages, TRL's numbers):
  normalize="per_reward" (MixGRPO): each reward and each penalty is normalized within its group,
  z = (r - group mean) / (group std + eps) (std="group"; "batch" or None as in group_advantages), then
  A = sum_k w_k z_k - sum_p v_p z_p; normalize="total": A = group_advantages(total); None: no advantages.
  Advantages and the Pareto mask carry no gradient; `total` is differentiable where the rewards are.
- Pareto (Parrot's batch-wise Pareto-optimal selection): the objectives are the rewards with a non-zero weight,
  each multiplied by the sign of its weight (a negative weight means "lower is better"); penalties are not
  objectives. Sample j dominates sample i when o_j >= o_i in every objective and o_j > o_i in at least one; the
  mask is True for the samples no other sample dominates, over the whole batch ("batch") or within each prompt
  group ("group"). Identical reward vectors do not dominate each other (all copies are kept); with one objective
  the mask holds every sample that attains the maximum. Use it to keep only those samples in the policy update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .base import Reward

Weight = float | int | Callable[[int], float]
NORMALIZE = ("per_reward", "total", None)
PARETO = ("batch", "group", None)


@dataclass(frozen=True)
class LinearSchedule:
    """A weight going linearly from `start` (at step `begin`) to `end` (at step begin + steps), constant outside."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1; got {self.steps!r}")

    def __call__(self, step: int) -> float:
        frac = min(max((step - self.begin) / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * frac


@dataclass
class CombinedScores:
    """What `CombinedReward.score_all` returns. All tensors are [B] on the device of the first reward's output.

    total: sum_k w_k r_k - sum_p v_p pen_p (float32; differentiable where the rewards are).
    raw: each reward's and each penalty's own [B] value, by name (rewards first, in the order given).
    weights: the weights used at this step, by name (penalty weights as given, i.e. positive = subtracted).
    advantages: the aggregated advantages (see the module docstring), or None without groups / normalize=None.
    pareto: [B] bool, True for non-dominated samples, or None when pareto is off.
    """

    total: torch.Tensor
    raw: dict[str, torch.Tensor]
    weights: dict[str, float]
    advantages: torch.Tensor | None = None
    pareto: torch.Tensor | None = None
    penalties: tuple[str, ...] = field(default_factory=tuple)

    def log(self, prefix: str = "reward/") -> dict[str, float]:
        """Means and stds of every raw term and of the total, plus the weights and the Pareto fraction, as floats
        (one host sync): {"reward/hps/mean": ..., "reward/hps/std": ..., "reward/hps/weight": ..., ...}."""
        names = list(self.raw) + ["total"]
        values = list(self.raw.values()) + [self.total]
        stats = torch.stack([torch.stack([v.detach().float().mean(), v.detach().float().std(unbiased=False)])
                             for v in values])
        if self.pareto is not None:
            frac = self.pareto.float().mean().to(stats.device)
            stats = torch.cat([stats.flatten(), frac.view(1)])
        else:
            stats = stats.flatten()
        flat = stats.tolist()
        out = {}
        for i, name in enumerate(names):
            out[f"{prefix}{name}/mean"], out[f"{prefix}{name}/std"] = flat[2 * i], flat[2 * i + 1]
        for name, w in self.weights.items():
            out[f"{prefix}{name}/weight"] = float(w)
        if self.pareto is not None:
            out[f"{prefix}pareto_fraction"] = flat[-1]
        return out


def pareto_mask(objectives: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Non-dominated samples (higher is better in every objective).

    Args:
        objectives: [B, K] floating, finite; row i is sample i's objective vector.
        group_ids: optional [B] integer labels; dominance is then only checked within each group.

    Returns:
        [B] bool: True where no sample j (of the same group) has o_j >= o_i everywhere and o_j > o_i somewhere.

    Equivalent PyTorch (O(B^2 K) memory, fine for batches of a few thousand):
        ge = (o[:, None, :] >= o[None, :, :]).all(-1); gt = (o[:, None, :] > o[None, :, :]).any(-1)
        dominated = (ge & gt).any(0)    # [j, i]: j dominates i
        mask = ~dominated
    """
    if not isinstance(objectives, torch.Tensor) or not objectives.is_floating_point() or objectives.dim() != 2:
        raise ValueError("objectives must be a floating [B, K] tensor; got "
                         f"{getattr(objectives, 'shape', type(objectives).__name__)}")
    if not bool(torch.isfinite(objectives).all()):
        raise ValueError("objectives must be finite (a NaN would make dominance undefined)")
    o = objectives.detach()
    ge = (o[:, None, :] >= o[None, :, :]).all(-1)
    gt = (o[:, None, :] > o[None, :, :]).any(-1)
    dom = ge & gt
    if group_ids is not None:
        if group_ids.shape != (o.shape[0],):
            raise ValueError(f"group_ids must have shape ({o.shape[0]},); got {tuple(group_ids.shape)}")
        gid = group_ids.to(o.device)
        dom = dom & (gid[:, None] == gid[None, :])
    return ~dom.any(0)


class CombinedReward(Reward):
    """Several rewards (and penalties) scored on the same inputs and combined (module docstring).

    Args:
        rewards: name -> Reward (or any callable returning a [B] tensor), scored with the same arguments.
        weights: name -> number or schedule; default 1.0 for each reward; names must be rewards.
        penalties: name -> callable (a Reward, e.g. an artifact detector, or `fn(*args, **kwargs) -> [B]`) whose value
            is subtracted; the artifact/penalty hook. More can be added with `add_penalty`.
        penalty_weights: name -> number or schedule (default 1.0).
        normalize: "per_reward" (MixGRPO, default), "total" or None: how `advantages` are formed when groups are given.
        std, eps: the group_advantages scale and eps (TRL's defaults: "group", 1e-4).
        pareto: "batch", "group" or None: compute Parrot's non-dominated mask.
    """

    name = "combined"

    def __init__(self, rewards: Mapping[str, Callable], weights: Mapping[str, Weight] | None = None, *,
                 penalties: Mapping[str, Callable] | None = None, penalty_weights: Mapping[str, Weight] | None = None,
                 normalize: str | None = "per_reward", std: str | None = "group", eps: float = 1e-4,
                 pareto: str | None = None) -> None:
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("rewards must be a non-empty mapping name -> reward")
        for name, r in rewards.items():
            if not isinstance(name, str) or not callable(r):
                raise TypeError(f"rewards[{name!r}] must be a callable reward under a str name; got {type(r).__name__}")
        modalities = {r.modality for r in rewards.values() if isinstance(r, Reward) and r.modality}
        if len(modalities) > 1:
            raise ValueError(f"rewards mix modalities {sorted(modalities)}; combine image rewards or text rewards")
        self.modality = modalities.pop() if modalities else ""
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
        if pareto not in PARETO:
            raise ValueError(f"pareto must be one of {PARETO}; got {pareto!r}")
        self.rewards: dict[str, Callable] = dict(rewards)
        self.penalties: dict[str, Callable] = {}
        self._weights: dict[str, Weight] = {name: 1.0 for name in self.rewards}
        for name, w in (weights or {}).items():
            self.set_weight(name, w)
        for name, fn in (penalties or {}).items():
            self.add_penalty(name, fn, (penalty_weights or {}).get(name, 1.0))
        unknown = set(penalty_weights or {}) - set(self.penalties)
        if unknown:
            raise ValueError(f"penalty_weights names {sorted(unknown)}, which are not penalties "
                             f"({sorted(self.penalties)})")
        self.normalize, self.std, self.eps, self.pareto = normalize, std, eps, pareto
        self.step = 0

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        terms = list(self.rewards.values()) + list(self.penalties.values())
        return all(getattr(t, "differentiable", False) for t in terms)

    # -- weights ------------------------------------------------------------------------------------------------

    def set_weight(self, name: str, weight: Weight) -> None:
        """Sets the weight (number or schedule) of a reward or a penalty; takes effect at the next call."""
        if name not in self.rewards and name not in self.penalties:
            known = sorted(self.rewards) + sorted(self.penalties)
            raise KeyError(f"no reward or penalty named {name!r}; known: {known}")
        if not callable(weight):
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight != weight:
                raise TypeError(f"weight of {name!r} must be a number or a callable step -> number; got {weight!r}")
            weight = float(weight)
        self._weights[name] = weight

    def set_step(self, step: int) -> None:
        """The training step at which schedules are evaluated when `score` gets no `step`."""
        self.step = int(step)

    def weights_at(self, step: int | None = None) -> dict[str, float]:
        """Every weight evaluated at `step` (default self.step)."""
        step = self.step if step is None else step
        out = {}
        for name, w in self._weights.items():
            value = w(step) if callable(w) else w
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"weight of {name!r} at step {step} is {value}; weights must be finite")
            out[name] = value
        return out

    def add_penalty(self, name: str, fn: Callable, weight: Weight = 1.0) -> None:
        """Adds a penalty term: `fn` is called like the rewards and its [B] value, times weight, is subtracted."""
        if not isinstance(name, str) or not callable(fn):
            raise TypeError(f"penalty {name!r} must be a callable under a str name; got {type(fn).__name__}")
        if name in self.rewards or name in self.penalties:
            raise ValueError(f"a reward or penalty named {name!r} already exists")
        self.penalties[name] = fn
        self._weights[name] = 1.0
        self.set_weight(name, weight)

    # -- scoring ------------------------------------------------------------------------------------------------

    def score(self, *args, group_size: int | None = None, group_ids: torch.Tensor | None = None,
              step: int | None = None, **kwargs) -> torch.Tensor:
        """The combined reward `total` [B] (see score_all)."""
        return self.score_all(*args, group_size=group_size, group_ids=group_ids, step=step, **kwargs).total

    def score_all(self, *args, group_size: int | None = None, group_ids: torch.Tensor | None = None,
                  step: int | None = None, **kwargs) -> CombinedScores:
        """Scores every reward and penalty on `*args, **kwargs` (e.g. images [B, 3, H, W], prompts) and combines them.

        group_size / group_ids: the prompt groups (as in group_advantages) for advantages and pareto="group".
        step: evaluates the weight schedules at this step (default self.step).
        """
        weights = self.weights_at(step)
        raw: dict[str, torch.Tensor] = {}
        for name, fn in list(self.rewards.items()) + list(self.penalties.items()):
            value = fn(*args, **kwargs)
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value, dtype=torch.float32)
            if value.dim() != 1:
                raise ValueError(f"{name} returned shape {tuple(value.shape)}; expected [B]")
            raw[name] = value
        sizes = {name: v.shape[0] for name, v in raw.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the rewards returned different batch sizes: {sizes}")
        device = next(iter(raw.values())).device
        raw = {name: v.to(device=device, dtype=torch.float32) for name, v in raw.items()}
        total = torch.zeros_like(next(iter(raw.values())))
        for name, v in raw.items():
            sign = -1.0 if name in self.penalties else 1.0
            if weights[name] != 0:
                total = total + sign * weights[name] * v
        grouped = group_size is not None or group_ids is not None
        advantages = None
        if grouped and self.normalize is not None:
            advantages = self._advantages(raw, total, weights, group_size, group_ids)
        pareto = None
        if self.pareto is not None:
            pareto = self._pareto(raw, weights, group_size, group_ids)
        return CombinedScores(total=total, raw=raw, weights=weights, advantages=advantages, pareto=pareto,
                              penalties=tuple(self.penalties))

    def _advantages(self, raw, total, weights, group_size, group_ids) -> torch.Tensor:
        from ..advantages import group_advantages

        def adv(v: torch.Tensor, name: str) -> torch.Tensor:
            try:
                return group_advantages(v.detach(), group_size, group_ids=group_ids, std=self.std, eps=self.eps)
            except ValueError as exc:  # a NaN reward: say which one
                raise ValueError(f"{name}: {exc}") from exc

        if self.normalize == "total":
            return adv(total, "the weighted total of " + ", ".join(raw))
        out = torch.zeros_like(total.detach())
        for name, v in raw.items():
            if weights[name] != 0:
                out = out + (-1.0 if name in self.penalties else 1.0) * weights[name] * adv(v, f"reward {name!r}")
        return out

    def _pareto(self, raw, weights, group_size, group_ids) -> torch.Tensor:
        names = [n for n in self.rewards if weights[n] != 0]
        if not names:
            raise ValueError("pareto selection needs at least one reward with a non-zero weight")
        objectives = torch.stack([raw[n].detach() * (1.0 if weights[n] > 0 else -1.0) for n in names], dim=1)
        ids = None
        if self.pareto == "group":
            if group_ids is not None:
                ids = group_ids
            elif group_size is not None:
                b = objectives.shape[0]
                if b % group_size:
                    raise ValueError(f"batch of {b} is not a multiple of group_size {group_size}")
                ids = torch.arange(b, device=objectives.device) // group_size
            else:
                raise ValueError("pareto='group' needs group_size or group_ids")
        return pareto_mask(objectives, ids)

    def __repr__(self) -> str:
        return (f"CombinedReward(rewards={list(self.rewards)}, penalties={list(self.penalties)}, "
                f"normalize={self.normalize!r}, pareto={self.pareto!r})")
