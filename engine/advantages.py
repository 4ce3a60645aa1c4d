"""Group-normalized advantages for GRPO-style training (LLM and diffusion policies).

Each reward is centred on the mean of its group (the completions or images drawn for one prompt) and,
optionally, divided by a standard deviation. The numbers are those of TRL 1.16's GRPOTrainer
(`scale_rewards`, DESIGN.md "Group advantages"), so swapping this in leaves the learning curve alone.
"""

from __future__ import annotations

import torch

_STD_MODES = ("group", "batch", None, "none")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    std: str | None = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> torch.Tensor:
    """Advantages `(reward - group mean) / (scale + eps)`, one per reward.

    Args:
        rewards: [N] floating tensor (fp16, bf16, fp32 or fp64), every value finite.
        group_size: G, for groups of G consecutive rewards (GRPO/TRL layout: a prompt's G completions are
            adjacent); N must be a multiple of G.
        group_ids: [N] integer tensor on the rewards' device, one arbitrary label per reward; groups may
            have any sizes and need not be adjacent (DDPO's per-prompt statistics). Give exactly one of
            `group_size` and `group_ids`.
        std: the scale. "group": the unbiased std of the reward's group; "batch": the unbiased std of all
            N rewards (PPO-Lite); None or "none": no scaling and no eps, advantage = reward - group mean
            (Dr. GRPO). These are TRL's `scale_rewards` values "group", "batch" and "none".
        eps: added to the scale (TRL: 1e-4); >= 0.
        clip: if given (> 0), advantages are clamped to [-clip, clip] after normalization.

    Returns:
        [N] advantages, fp32 (fp64 when the rewards are fp64; the statistics are computed in that dtype).

    Equivalent PyTorch for `group_size=G` (TRL 1.16, `GRPOTrainer._generate_and_score_completions`):

        x = rewards.float().view(-1, G)
        adv = (x - x.mean(1, keepdim=True)).flatten()
        if std == "group": adv = adv / (x.std(1).repeat_interleave(G) + eps)
        if std == "batch": adv = adv / (rewards.float().std() + eps)
        if clip is not None: adv = adv.clamp(-clip, clip)

    Stds use Bessel's correction (torch's default, as TRL), computed as TRL's `nanstd` computes them, so that
    with `group_size` on CPU the fp32 result equals TRL's bit for bit (`torch.std` differs in the last bits;
    the `group_ids` path agrees with TRL to a few ulps). A group of one reward (or a batch of one, for
    std="batch") has scale 0, as in TRL when num_generations == 1: its advantage is 0, never NaN. With
    eps=0, a reward whose scale is exactly 0 gets advantage 0 rather than 0/0.

    Cost on a GPU: the finiteness check is one host sync; with `group_ids`, `torch.unique` is another, and
    the group sums use atomic adds, so their last bits may differ run to run unless
    `torch.use_deterministic_algorithms(True)` is set. The `group_size` path is deterministic. For the same
    reason (a value read on the host) it does not trace under `torch.compile(fullgraph=True)`: call it outside
    the compiled region (rewards are scored outside it anyway).

    Example:
        >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2)
        tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    """
    _check_inputs(rewards, group_size, group_ids, std, eps, clip)
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)

    if group_size is not None:
        mean, group_std = _consecutive_group_stats(r, group_size, need_std=std == "group")
    else:
        mean, group_std = _labelled_group_stats(r, group_ids, need_std=std == "group")

    adv = r - mean
    if std == "group":
        scale = group_std
    elif std == "batch":
        scale = _unbiased_std(r)
    else:
        scale = None

    if scale is not None:
        denom = scale + eps
        # Only reachable with eps=0: a zero-spread group carries no signal, so 0 rather than NaN.
        adv = torch.where(denom > 0, adv / denom, torch.zeros_like(adv))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def _unbiased_std(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the last dim, computed as TRL's `nanstd` does (mean squared deviation times
    n / (n - 1)): on CPU this gives TRL's fp32 numbers bit for bit, where `torch.std` differs in the last
    bits. n = 1 gives 0, as TRL uses when num_generations == 1 (torch's unbiased std would be NaN)."""
    n = x.shape[-1]
    if n == 1:
        return x.new_zeros(x.shape[:-1])
    var = (x - x.mean(dim=-1, keepdim=True)).square().mean(dim=-1) * (n / (n - 1))
    return var.sqrt()


def _consecutive_group_stats(r: torch.Tensor, g: int, need_std: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-reward group mean and (if needed) unbiased group std, for groups of g adjacent rewards."""
    x = r.reshape(-1, g)  # reshape, not view: a strided [N] slice is valid input
    mean = x.mean(dim=1).repeat_interleave(g)
    return mean, _unbiased_std(x).repeat_interleave(g) if need_std else None


def _labelled_group_stats(
    r: torch.Tensor, group_ids: torch.Tensor, need_std: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-reward group mean and (if needed) unbiased group std, for groups given by arbitrary labels."""
    # Map labels to 0..K-1 so that per-group sums are index_add_ into K slots (no loop over groups).
    labels, inv = torch.unique(group_ids, return_inverse=True)
    k = labels.numel()
    count = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    mean = mean[inv]
    if not need_std:
        return mean, None
    # Two-pass variance (sum of squared deviations from the mean), as TRL's nanstd computes it: the
    # one-pass sum(x^2) - n mean^2 would cancel catastrophically for rewards far from 0.
    sq = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean).square())
    # A one-reward group has no spread: scale 0, as TRL does for num_generations == 1.
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return mean, var.sqrt()[inv]


def _check_inputs(
    rewards: torch.Tensor,
    group_size: int | None,
    group_ids: torch.Tensor | None,
    std: str | None,
    eps: float,
    clip: float | None,
) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got dtype {rewards.dtype}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards is empty (N = 0)")

    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size and group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if n % group_size != 0:
            raise ValueError(f"rewards has N = {n} values, not a multiple of group_size = {group_size}")
    else:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
        if group_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
        if group_ids.shape != rewards.shape:
            raise ValueError(
                f"group_ids must have the rewards' shape {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
            )
        if group_ids.device != rewards.device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")

    if std not in _STD_MODES:
        raise ValueError(f"std must be 'group', 'batch', None or 'none', got {std!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be None or a number > 0, got {clip!r}")

    # One host sync on a GPU; the tensor is [N], and a NaN here would silently poison a whole group.
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"rewards must be finite: rewards[{bad}] = {rewards[bad].item()}")


class PromptRewardStats:
    """DDPO's per-prompt reward statistics ("per-prompt stat tracking"): each prompt keeps its last
    `buffer_size` rewards across training steps, and a reward's advantage is (r - mean) / (std + eps) over its
    prompt's buffer, this step's rewards included - or over the whole batch while the prompt has fewer than
    `min_count` rewards. Stds are population stds (numpy's default, as DDPO); the statistics are in float64.

        stats = PromptRewardStats(buffer_size=16, min_count=16)     # ddpo-pytorch's defaults
        adv = stats.advantages(prompts, rewards)                    # prompts: one string per reward; [N] fp32

    Equivalent (ddpo-pytorch's `PerPromptStatTracker.update`, with deques of maxlen buffer_size):

        for p in unique(prompts):
            buf[p].extend(rewards[prompts == p])
            mean, std = (mean(buf[p]), std(buf[p])) if len(buf[p]) >= min_count else (mean(rewards), std(rewards))
            adv[prompts == p] = (rewards[prompts == p] - mean) / (std + eps)

    `state_dict()` / `load_state_dict()` carry the buffers (JSON-serializable) through a checkpoint, so that a
    resumed run normalizes as the killed one would have.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6) -> None:
        for name, value in (("buffer_size", buffer_size), ("min_count", min_count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if min_count > buffer_size:
            raise ValueError(f"min_count ({min_count}) > buffer_size ({buffer_size}): the buffers would never fill")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0; got {eps!r}")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, float(eps)
        self.buffers: dict[str, list[float]] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """[N] fp32 advantages of `rewards` ([N] floating, finite), whose prompts are `prompts` (N strings)."""
        if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() != 1:
            raise TypeError(f"rewards must be a floating [N] tensor; got {getattr(rewards, 'shape', rewards)!r}")
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts for {rewards.numel()} rewards; give one per reward")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards must be finite")
        values = rewards.detach().to("cpu", torch.float64)
        batch = values.tolist()
        out = torch.empty_like(values)
        where: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            where.setdefault(p, []).append(i)
        for p, idx in where.items():
            buf = (self.buffers.get(p, []) + [batch[i] for i in idx])[-self.buffer_size:]
            self.buffers[p] = buf
            ref = torch.tensor(buf, dtype=torch.float64) if len(buf) >= self.min_count else values
            mean, std = ref.mean(), ref.std(unbiased=False)
            out[idx] = (values[idx] - mean) / (std + self.eps)
        return out.to(device=rewards.device, dtype=torch.float32)

    def state_dict(self) -> dict[str, list[float]]:
        return {p: list(buf) for p, buf in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {str(p): [float(v) for v in buf][-self.buffer_size:] for p, buf in state.items()}
