"""Group-normalized advantages against a float64 per-group loop and against TRL 1.16's formula."""

import json
import math

import pytest
import torch

from fusedrl.engine.advantages import group_advantages

STD_MODES = ["group", "batch", None]


def reference(rewards, ids, std="group", eps=1e-4, clip=None):
    """Float64, one group at a time: (r - group mean) / (scale + eps); one-value groups have std 0."""
    r = [float(v) for v in rewards.double()]
    ids = [int(i) for i in ids]
    members = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)

    def mean_std(values):
        m = math.fsum(values) / len(values)
        if len(values) == 1:
            return m, 0.0
        return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))

    batch_std = mean_std(r)[1]
    out = [0.0] * len(r)
    for idx in members.values():
        m, s = mean_std([r[i] for i in idx])
        scale = {"group": s, "batch": batch_std, None: None}[std]
        for i in idx:
            a = r[i] - m
            if scale is not None:
                a = a / (scale + eps) if scale + eps > 0 else 0.0
            if clip is not None:
                a = min(max(a, -clip), clip)
            out[i] = a
    return torch.tensor(out, dtype=torch.float64)


def trl_advantages(rewards, num_generations, scale_rewards="group"):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions (sum_then_normalize, trl/trainer/grpo_trainer.py
    lines 2765-2787, with trl.trainer.utils.nanstd, lines 1021-1048), restated for finite fp32 rewards."""

    def nanstd(t, dim=None):
        mean = torch.nanmean(t, dim=dim, keepdim=True)
        var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
        std = torch.sqrt(var * torch.where(count > 1, count / (count - 1), float("nan")))  # Bessel's correction
        return std.squeeze() if dim is None else std.squeeze(dim)

    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def consecutive_ids(n, g):
    return torch.arange(n) // g


def tol(dtype):
    # The statistics are computed in fp32 (fp64 for fp64 input) from the input values, so the error is
    # that of fp32 (or fp64) arithmetic whatever the input precision.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("std", STD_MODES)
@pytest.mark.parametrize("g", [1, 2, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_group_size_matches_reference(std, g, dtype):
    gen = torch.Generator().manual_seed(g)
    rewards = (torch.randn(g * 13, generator=gen) * 3 + 1).to(dtype)
    out = group_advantages(rewards, g, std=std)
    assert out.shape == rewards.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = reference(rewards, consecutive_ids(rewards.numel(), g), std=std)
    torch.testing.assert_close(out.double(), expected, **tol(dtype))


@pytest.mark.parametrize("std", STD_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_group_ids_unequal_shuffled_groups(std, dtype):
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 5, 8, 13, 1, 4]
    labels = [-7, 0, 3, 42, 1000, 5, 11, 2]  # arbitrary, negative and sparse labels
    ids = torch.cat([torch.full((s,), lab, dtype=torch.int64) for s, lab in zip(sizes, labels)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    rewards = (torch.rand(ids.numel(), generator=gen) * 10 - 2).to(dtype)
    out = group_advantages(rewards, group_ids=ids, std=std)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), reference(rewards, ids, std=std), **tol(dtype))


@pytest.mark.parametrize("id_dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_group_ids_integer_dtypes(id_dtype):
    ids = torch.tensor([3, 1, 3, 1, 2, 2, 2], dtype=id_dtype)
    rewards = torch.tensor([1.0, 5.0, 2.0, -1.0, 0.5, 0.25, 4.0])
    torch.testing.assert_close(
        group_advantages(rewards, group_ids=ids).double(), reference(rewards, ids), **tol(torch.float32)
    )


@pytest.mark.parametrize("std", STD_MODES)
def test_group_size_equals_equivalent_group_ids(std):
    rewards = torch.randn(6 * 11, generator=torch.Generator().manual_seed(1))
    a = group_advantages(rewards, 6, std=std)
    b = group_advantages(rewards, group_ids=consecutive_ids(rewards.numel(), 6), std=std)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Relabelling and permuting the rewards permutes the advantages.
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(2))
    ids = consecutive_ids(rewards.numel(), 6) * 17 + 5
    c = group_advantages(rewards[perm], group_ids=ids[perm], std=std)
    torch.testing.assert_close(c, a[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("std", STD_MODES)
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_eps(std, eps):
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 2.5, -1.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = reference(rewards, ids, std=std, eps=eps)
    torch.testing.assert_close(group_advantages(rewards, 2, std=std, eps=eps), expected, **tol(torch.float64))
    torch.testing.assert_close(group_advantages(rewards, group_ids=ids, std=std, eps=eps), expected)


def test_std_none_is_centring_only():
    rewards = torch.tensor([1.0, 2.0, 6.0, 10.0])
    expected = torch.tensor([-0.5, 0.5, -2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 2, std=None), expected)
    torch.testing.assert_close(group_advantages(rewards, 2, std="none", eps=123.0), expected)


@pytest.mark.parametrize("std", STD_MODES)
@pytest.mark.parametrize("clip", [0.1, 0.8, 100.0])
def test_clip(std, clip):
    rewards = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 4
    for out in (
        group_advantages(rewards, 5, std=std, clip=clip),
        group_advantages(rewards, group_ids=consecutive_ids(40, 5), std=std, clip=clip),
    ):
        assert out.abs().max() <= clip
        torch.testing.assert_close(
            out.double(), reference(rewards, consecutive_ids(40, 5), std=std, clip=clip), **tol(torch.float32)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_constant_group_gives_zero_not_nan(dtype):
    # Exactly representable constants: the group mean is exact, so the advantage is exactly 0.
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -3.5, -3.5], dtype=dtype)
    for eps in (1e-4, 0.0):
        for out in (
            group_advantages(rewards, 2, eps=eps),
            group_advantages(rewards, group_ids=torch.tensor([4, 4, 4, 4, 1, 1, 0, 0]), eps=eps),
        ):
            assert torch.isfinite(out).all()
            assert (out[[0, 1, 2, 3, 6, 7]] == 0).all()


def test_batch_std_with_zero_spread_and_eps_zero():
    out = group_advantages(torch.full((6,), 0.5), 3, std="batch", eps=0.0)
    assert (out == 0).all()


def test_singleton_groups_match_trl():
    # TRL: num_generations == 1 gives std 0, so every advantage is 0 (torch's unbiased std would be NaN).
    rewards = torch.tensor([0.3, -2.0, 7.0])
    for std in STD_MODES:
        assert (group_advantages(rewards, 1, std=std) == 0).all()
        assert (group_advantages(rewards, group_ids=torch.tensor([0, 1, 2]), std=std) == 0).all()
    assert (group_advantages(torch.tensor([4.0]), 1, std="batch") == 0).all()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 2, 7, 8, 16])
def test_matches_trl_formula(scale_rewards, g):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        n = g * int(torch.randint(1, 130, (1,), generator=gen))
        # Mostly 0/1 rewards with noise: a typical verifiable-reward batch, some groups nearly constant.
        rewards = torch.rand(n, generator=gen).round() + 0.1 * torch.randn(n, generator=gen)
        expected = trl_advantages(rewards, g, scale_rewards)
        # Same fp32 operations as TRL: equal bit for bit (on CPU; a GPU may order the sums differently).
        assert torch.equal(group_advantages(rewards, g, std=scale_rewards), expected)
        out = group_advantages(rewards, group_ids=consecutive_ids(n, g), std=scale_rewards)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_strided_rewards():
    base = torch.randn(2 * 24, generator=torch.Generator().manual_seed(5))
    rewards, ids = base[::2], consecutive_ids(24, 4)
    assert not rewards.is_contiguous()
    for std in STD_MODES:
        torch.testing.assert_close(
            group_advantages(rewards, 4, std=std), group_advantages(rewards.contiguous(), 4, std=std)
        )
        torch.testing.assert_close(
            group_advantages(rewards, group_ids=ids, std=std).double(),
            reference(rewards, ids, std=std),
            **tol(torch.float32),
        )


def test_does_not_modify_inputs():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0])
    ids = torch.tensor([1, 0, 1, 0])
    before = rewards.clone(), ids.clone()
    group_advantages(rewards, group_ids=ids)
    group_advantages(rewards, 2, clip=0.1)
    assert torch.equal(rewards, before[0]) and torch.equal(ids, before[1])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rewards=[1.0, 2.0], group_size=2), TypeError, "rewards must be a torch.Tensor"),
        (dict(rewards=torch.tensor([1, 2]), group_size=2), TypeError, "rewards must be a floating"),
        (dict(rewards=torch.zeros(2, 2), group_size=2), ValueError, r"rewards must be 1-D.*\(2, 2\)"),
        (dict(rewards=torch.zeros(0), group_size=2), ValueError, "rewards is empty"),
        (dict(rewards=torch.zeros(6), group_size=4), ValueError, "N = 6.*group_size = 4"),
        (dict(rewards=torch.zeros(6), group_size=0), ValueError, "group_size must be >= 1"),
        (dict(rewards=torch.zeros(6), group_size=-2), ValueError, "group_size must be >= 1"),
        (dict(rewards=torch.zeros(6), group_size=2.0), TypeError, "group_size must be an int"),
        (dict(rewards=torch.zeros(6), group_size=True), TypeError, "group_size must be an int"),
        (dict(rewards=torch.zeros(6)), ValueError, "exactly one of group_size and group_ids"),
        (
            dict(rewards=torch.zeros(6), group_size=2, group_ids=torch.zeros(6, dtype=torch.long)),
            ValueError,
            "exactly one of group_size and group_ids",
        ),
        (dict(rewards=torch.zeros(6), group_ids=[0] * 6), TypeError, "group_ids must be a torch.Tensor"),
        (dict(rewards=torch.zeros(6), group_ids=torch.zeros(6)), TypeError, "group_ids must be an integer.*float32"),
        (
            dict(rewards=torch.zeros(6), group_ids=torch.zeros(6, dtype=torch.bool)),
            TypeError,
            "group_ids must be an integer",
        ),
        (
            dict(rewards=torch.zeros(6), group_ids=torch.zeros(5, dtype=torch.long)),
            ValueError,
            r"group_ids must have the rewards' shape \(6,\), got \(5,\)",
        ),
        (
            dict(rewards=torch.zeros(6), group_ids=torch.zeros(6, 1, dtype=torch.long)),
            ValueError,
            "group_ids must have the rewards' shape",
        ),
        (
            dict(rewards=torch.zeros(6), group_ids=torch.zeros(6, dtype=torch.long, device="meta")),
            ValueError,
            "group_ids is on meta but rewards is on cpu",
        ),
        (dict(rewards=torch.zeros(6), group_size=2, std="mean"), ValueError, "std must be 'group', 'batch'"),
        (dict(rewards=torch.zeros(6), group_size=2, std=True), ValueError, "std must be"),
        (dict(rewards=torch.zeros(6), group_size=2, eps=-1e-4), ValueError, "eps must be a number >= 0"),
        (dict(rewards=torch.zeros(6), group_size=2, eps=float("nan")), ValueError, "eps must be"),
        (dict(rewards=torch.zeros(6), group_size=2, clip=0.0), ValueError, "clip must be None or a number > 0"),
        (dict(rewards=torch.zeros(6), group_size=2, clip=-1.0), ValueError, "clip must be"),
        (dict(rewards=torch.zeros(6), group_size=2, clip=float("nan")), ValueError, "clip must be"),
        (
            dict(rewards=torch.tensor([0.0, 1.0, float("nan"), 2.0]), group_size=2),
            ValueError,
            r"rewards must be finite: rewards\[2\] = nan",
        ),
        (
            dict(rewards=torch.tensor([0.0, float("-inf"), 1.0, 2.0]), group_ids=torch.tensor([0, 0, 1, 1])),
            ValueError,
            r"rewards\[1\] = -inf",
        ),
        (
            dict(rewards=torch.tensor([0.0, 1.0, 2.0, float("inf")], dtype=torch.float16), group_size=4),
            ValueError,
            r"rewards\[3\] = inf",
        ),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("std", STD_MODES)
def test_cuda_matches_cpu(std):
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(8 * 33, generator=gen)
    ids = torch.randint(0, 20, (rewards.numel(),), generator=gen)
    for kw in (dict(group_size=8), dict(group_ids=ids)):
        cpu = group_advantages(rewards, **kw, std=std)
        cuda_kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        torch.testing.assert_close(group_advantages(rewards.cuda(), **cuda_kw, std=std).cpu(), cpu)


# ------------------------------------------------------------------------------------- per-prompt statistics (DDPO)


class _DDPOTracker:
    """ddpo-pytorch's PerPromptStatTracker written out with numpy and deques (the behaviour being matched)."""

    def __init__(self, buffer_size, min_count):
        from collections import deque

        self.deque, self.buffer_size, self.min_count, self.stats = deque, buffer_size, min_count, {}

    def update(self, prompts, rewards):
        import numpy as np

        prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            self.stats.setdefault(prompt, self.deque(maxlen=self.buffer_size)).extend(mine)
            ref = self.stats[prompt] if len(self.stats[prompt]) >= self.min_count else rewards
            advantages[prompts == prompt] = (mine - np.mean(ref)) / (np.std(ref) + 1e-6)
        return advantages


def test_prompt_reward_stats_match_ddpo_over_steps_and_survive_a_checkpoint():
    from fusedrl.engine.advantages import PromptRewardStats

    g = torch.Generator().manual_seed(0)
    ours, ddpo = PromptRewardStats(buffer_size=5, min_count=3), _DDPOTracker(5, 3)
    for step in range(6):
        prompts = [["cat", "dog", "cat", "owl"], ["dog", "dog", "cat", "cat"], ["owl", "cat", "cat", "fox"]][step % 3]
        rewards = torch.randn(4, generator=g) * 3 + step
        got = ours.advantages(prompts, rewards)
        assert got.dtype == torch.float32 and got.shape == (4,)
        torch.testing.assert_close(got, torch.from_numpy(ddpo.update(prompts, rewards.double().numpy())).float())
        if step == 2:  # a resumed tracker continues exactly
            restored = PromptRewardStats(buffer_size=5, min_count=3)
            restored.load_state_dict(json.loads(json.dumps(ours.state_dict())))
            ours = restored
    assert all(len(buf) <= 5 for buf in ours.state_dict().values())


def test_prompt_reward_stats_errors():
    from fusedrl.engine.advantages import PromptRewardStats

    with pytest.raises(ValueError, match="min_count .* > buffer_size"):
        PromptRewardStats(buffer_size=4, min_count=8)
    with pytest.raises(ValueError, match="buffer_size must be an int >= 1"):
        PromptRewardStats(buffer_size=0)
    stats = PromptRewardStats(4, 2)
    with pytest.raises(ValueError, match="3 prompts for 2 rewards"):
        stats.advantages(["a", "b", "c"], torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        stats.advantages(["a", "b"], torch.tensor([0.0, float("nan")]))
    assert stats.state_dict() == {}  # a refused call changes nothing
