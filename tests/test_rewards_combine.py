"""CombinedReward on handmade numbers: weighted sums and penalties, weights changing over training, per-reward
z-scoring within prompt groups (MixGRPO) vs normalizing the sum, Parrot's non-dominated set on a small example with
a known answer, logging, and with real rewards (gradients flow through the weighted sum)."""

from __future__ import annotations

import math

import pytest
import torch

from fusedrl.engine.rewards import CombinedReward, LinearSchedule, load_reward, pareto_mask

S = 1 / math.sqrt(2)  # |z| of each member of a two-sample group, with Bessel's correction


def const(values):
    """A 'reward' that ignores its input and returns fixed numbers."""
    t = torch.tensor(values, dtype=torch.float32)
    return lambda *args, **kwargs: t.clone()


R1, R2, PEN = [1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 10.0, 0.0], [0.0, 1.0, 0.0, 2.0]
X = torch.zeros(4, 3, 2, 2)


def combo(**kw):
    return CombinedReward({"r1": const(R1), "r2": const(R2)}, {"r1": 1.0, "r2": 0.5}, penalties={"pen": const(PEN)},
                          penalty_weights={"pen": 2.0}, eps=0.0, **kw)


def test_weighted_sum_penalty_and_raw_values():
    out = combo().score_all(X)
    # total = r1 + 0.5 r2 - 2 pen
    torch.testing.assert_close(out.total, torch.tensor([6.0, 0.0, 8.0, 0.0]))
    assert list(out.raw) == ["r1", "r2", "pen"]
    torch.testing.assert_close(out.raw["r2"], torch.tensor(R2))
    torch.testing.assert_close(out.raw["pen"], torch.tensor(PEN))
    assert out.weights == {"r1": 1.0, "r2": 0.5, "pen": 2.0}
    assert out.advantages is None and out.pareto is None  # no groups given, pareto off
    torch.testing.assert_close(combo()(X), out.total)  # score() is the total


def test_per_reward_z_scores_within_groups():
    """MixGRPO: z-score each term within its group, then weight and sum (eps=0 for round numbers)."""
    out = combo().score_all(X, group_size=2)
    z1 = torch.tensor([-S, S, -S, S])  # r1 groups [1, 2], [3, 4]
    z2 = -z1  # r2 groups [10, 0], [10, 0]
    zp = z1  # pen groups [0, 1], [0, 2]
    expected = z1 + 0.5 * z2 - 2.0 * zp  # = [1.0607, -1.0607, ...]
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.advantages, torch.tensor([1.5 * S, -1.5 * S, 1.5 * S, -1.5 * S]))
    # the same groups given as labels, not adjacent: [r_0, r_2] and [r_1, r_3]
    labelled = combo().score_all(X, group_ids=torch.tensor([0, 1, 0, 1]))
    za = torch.tensor([-S, -S, S, S])  # r1 groups [1, 3], [2, 4]
    zb = torch.tensor([0.0, 0.0, 0.0, 0.0])  # r2 groups [10, 10], [0, 0]: no spread -> 0
    zc = torch.tensor([0.0, -S, 0.0, S])  # pen groups [0, 0], [1, 2]
    torch.testing.assert_close(labelled.advantages, za + 0.5 * zb - 2.0 * zc)
    nan = CombinedReward({"r1": const(R1), "bad": const(torch.tensor([1.0, float("nan"), 2.0, 3.0]))}, eps=0.0)
    with pytest.raises(ValueError, match=r"reward 'bad': rewards must be finite"):  # says which reward was NaN
        nan.score_all(X, group_size=2)


def test_per_reward_vs_total_normalization():
    """Normalizing each reward first keeps a small-scale reward from being drowned by a large-scale one."""
    c = CombinedReward({"small": const([0.0, 1.0]), "large": const([100.0, 0.0])}, eps=0.0)
    torch.testing.assert_close(c.score_all(X[:2], group_size=2).advantages, torch.tensor([0.0, 0.0]))
    c_total = CombinedReward({"small": const([0.0, 1.0]), "large": const([100.0, 0.0])}, eps=0.0, normalize="total")
    torch.testing.assert_close(c_total.score_all(X[:2], group_size=2).advantages, torch.tensor([S, -S]))
    # the default eps (TRL's 1e-4) only shrinks the scale slightly
    c_eps = CombinedReward({"r": const([1.0, 2.0])})
    torch.testing.assert_close(c_eps.score_all(X[:2], group_size=2).advantages,
                               torch.tensor([-0.5, 0.5]) / (S + 1e-4))


# r1, r2 of seven samples and which are non-dominated (higher is better in both)
POINTS = torch.tensor([[1.0, 5.0], [2.0, 4.0], [1.0, 4.0], [3.0, 1.0], [2.0, 1.0], [3.0, 1.0], [0.0, 0.0]])


def test_pareto_mask_known_answer():
    # 2 is dominated by 0 and 1; 4 by 3 (and 1); 6 by all; 3 and 5 are equal and both kept
    assert pareto_mask(POINTS).tolist() == [True, True, False, True, False, True, False]
    # "lower is better" for r2: the front becomes 3, 5 (highest r1, lowest r2 among them) and 6 (lowest r2)
    flipped = POINTS * torch.tensor([1.0, -1.0])
    assert pareto_mask(flipped).tolist() == [False, False, False, True, False, True, True]
    # within groups: sample 4 only competes with sample 6 in its group, and beats it
    groups = torch.tensor([0, 0, 0, 0, 1, 0, 1])
    assert pareto_mask(POINTS, groups).tolist() == [True, True, False, True, True, True, False]
    # one objective: every sample attaining the maximum
    assert pareto_mask(torch.tensor([[1.0], [3.0], [3.0], [2.0]])).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="finite"):
        pareto_mask(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        pareto_mask(torch.tensor([1.0, 2.0]))


def test_pareto_in_combined_reward_uses_weight_signs_and_skips_zero_weights():
    x = torch.zeros(7, 3, 2, 2)
    r1, r2 = POINTS[:, 0].tolist(), POINTS[:, 1].tolist()
    c = CombinedReward({"r1": const(r1), "r2": const(r2), "ignored": const([7.0, 0, 0, 0, 0, 0, 9.0])},
                       {"ignored": 0.0}, pareto="batch")
    assert c.score_all(x).pareto.tolist() == [True, True, False, True, False, True, False]
    c.set_weight("r2", -1.0)  # minimize r2
    assert c.score_all(x).pareto.tolist() == [False, False, False, True, False, True, True]
    g = CombinedReward({"r1": const(r1), "r2": const(r2)}, pareto="group")
    assert g.score_all(x, group_ids=torch.tensor([0, 0, 0, 0, 1, 0, 1])).pareto.tolist() == \
        [True, True, False, True, True, True, False]
    with pytest.raises(ValueError, match="needs group_size or group_ids"):
        g.score_all(x)


def test_weights_change_during_training():
    c = CombinedReward({"a": const([1.0, 3.0]), "b": const([10.0, 20.0])},
                       {"a": 1.0, "b": LinearSchedule(0.0, 1.0, steps=10)})
    torch.testing.assert_close(c.score(X[:2], step=0), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(c.score(X[:2], step=5), torch.tensor([6.0, 13.0]))
    torch.testing.assert_close(c.score(X[:2], step=50), torch.tensor([11.0, 23.0]))  # constant after the ramp
    c.set_step(5)
    torch.testing.assert_close(c.score(X[:2]), torch.tensor([6.0, 13.0]))
    c.set_weight("a", -2.0)  # e.g. a Lagrange multiplier updated by the trainer
    torch.testing.assert_close(c.score(X[:2]), torch.tensor([3.0, 4.0]))
    c.set_weight("b", lambda step: 0.1 * step)
    assert c.weights_at(3) == {"a": -2.0, "b": pytest.approx(0.3)}
    with pytest.raises(KeyError, match="no reward or penalty named 'c'"):
        c.set_weight("c", 1.0)
    with pytest.raises(TypeError, match="must be a number or a callable"):
        c.set_weight("a", "1")
    c.set_weight("b", lambda step: float("nan"))
    with pytest.raises(ValueError, match="weights must be finite"):
        c.score(X[:2])


def test_log_and_add_penalty_hook():
    c = CombinedReward({"r1": const(R1)}, pareto="batch")
    c.add_penalty("artifacts", const([0.0, 0.0, 1.0, 0.0]), weight=0.5)
    out = c.score_all(X)
    torch.testing.assert_close(out.total, torch.tensor([1.0, 2.0, 2.5, 4.0]))
    log = out.log()
    assert log["reward/r1/mean"] == pytest.approx(2.5) and log["reward/artifacts/mean"] == pytest.approx(0.25)
    assert log["reward/total/mean"] == pytest.approx(2.375) and log["reward/artifacts/weight"] == 0.5
    assert log["reward/pareto_fraction"] == pytest.approx(0.25)  # only the best r1 is non-dominated
    with pytest.raises(ValueError, match="already exists"):
        c.add_penalty("r1", const(R1))


def test_with_real_rewards_gradients_and_errors():
    bright, red = load_reward("brightness"), load_reward("target_color")
    c = CombinedReward({"bright": bright, "red": red}, {"red": 2.0})
    assert c.differentiable and c.modality == "image"
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = c.score_all(x, group_size=2)
    torch.testing.assert_close(out.total, bright(x) + 2.0 * red(x))
    (g,) = torch.autograd.grad(out.total.sum(), x)
    assert g.abs().sum() > 0
    assert not out.advantages.requires_grad
    with pytest.raises(ValueError, match="mix modalities"):
        CombinedReward({"bright": bright, "answer": load_reward("numeric_answer")})
    bad = CombinedReward({"a": const([1.0, 2.0]), "b": const([1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="different batch sizes"):
        bad.score(X)
    with pytest.raises(ValueError, match="normalize must be one of"):
        CombinedReward({"a": const([1.0])}, normalize="zscore")
