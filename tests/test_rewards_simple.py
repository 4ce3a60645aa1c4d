"""The built-in weightless rewards `brightness` and `target_color`: formulas on handmade images, value ranges,
gradients, errors, and that a tiny generator learns them in a few CPU seconds by reward backpropagation."""

from __future__ import annotations

import math

import pytest
import torch

from fusedrl.engine.rewards import available_rewards, load_reward


def test_registered_and_formulas():
    assert {"brightness", "target_color"} <= set(available_rewards())
    x = torch.zeros(3, 3, 4, 5)
    x[1] = 1.0
    x[2, 0] = 1.0  # pure red
    b = load_reward("brightness")
    torch.testing.assert_close(b(x), torch.tensor([0.0, 1.0, 0.2126]))
    torch.testing.assert_close(b(x * 2 - 1, value_range=(-1, 1)), torch.tensor([0.0, 1.0, 0.2126]))
    red = load_reward("target_color")  # default target (1, 0, 0)
    torch.testing.assert_close(red(x), torch.tensor([-1.0, -math.sqrt(2.0), 0.0]))
    sq = load_reward("target_color", target=(0.5, 0.5, 0.5), squared=True)
    torch.testing.assert_close(sq(x), torch.tensor([-0.75, -0.75, -0.75]))
    assert b.differentiable and red.differentiable and not b.needs_prompts


def test_gradients_and_zero_distance():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (g,) = torch.autograd.grad(load_reward("brightness")(x).sum(), x)
    torch.testing.assert_close(g[0, :, 0, 0], torch.tensor([0.2126, 0.7152, 0.0722]) / 36)
    at_target = torch.full((1, 3, 2, 2), 0.25, requires_grad=True)
    out = load_reward("target_color", target=(0.25, 0.25, 0.25))(at_target)
    (g,) = torch.autograd.grad(out.sum(), at_target)
    assert out.item() == 0.0 and torch.equal(g, torch.zeros_like(g))  # no NaN from sqrt at 0


def test_errors():
    with pytest.raises(ValueError, match="target must be 3 numbers in \\[0, 1\\]"):
        load_reward("target_color", target=(255, 0, 0))
    with pytest.raises(TypeError, match="target must be 3 numbers"):
        load_reward("target_color", target="red")
    with pytest.raises(ValueError, match="has no weights"):
        load_reward("brightness", "/some/path")
    with pytest.raises(ValueError, match="weights must be 3"):
        load_reward("brightness", weights=(1, 1))


@pytest.mark.parametrize("name,kw", [("brightness", {}), ("target_color", {"target": (0.9, 0.2, 0.1)})])
def test_tiny_generator_learns_it(name, kw):
    """A 2-layer conv generator from noise, trained by backpropagating the reward (AlignProp-style): the mean reward
    rises well within 60 Adam steps on 8 x 16 x 16 images."""
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(16, 3, 3, padding=1))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-2)
    reward = load_reward(name, **kw)
    noise = torch.randn(8, 4, 16, 16)

    def sample():
        return torch.sigmoid(gen(noise))

    with torch.no_grad():
        start = reward(sample()).mean().item()
    for _ in range(60):
        loss = -reward(sample()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = reward(sample()).mean().item()
    best = 1.0 if name == "brightness" else 0.0
    assert best - end < 0.25 * (best - start)
