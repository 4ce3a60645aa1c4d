"""Built-in rewards with no weights, that a tiny model learns in a few CPU minutes (smoke tests, examples, the
diffusion engine's embedded default). Both are differentiable, cheap and need no prompts.

- `brightness`: mean luma of the image, sum_c w_c * mean_{h,w} x_c with Rec. 709 weights (0.2126, 0.7152, 0.0722)
  applied to the [0, 1] values as given (no gamma linearization); in [0, 1].
- `target_color`: minus the Euclidean distance between the image's mean colour and a target RGB in [0, 1]:
  -|| mean_{h,w} x - target ||_2, in [-sqrt(3), 0], whose gradient has unit norm away from the target
  (`squared=True`: minus the squared distance, in [-3, 0], smooth everywhere, gradient shrinking near the target).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import ImageReward
from .registry import register_reward

REC709 = (0.2126, 0.7152, 0.0722)


class Brightness(ImageReward):
    """Mean luma: [B, 3, H, W] in the declared range -> [B] in [0, 1]; `weights` are the RGB luma weights."""

    differentiable = True

    def __init__(self, *, weights: Sequence[float] = REC709, **kw) -> None:
        kw.setdefault("max_batch_size", 4096)
        super().__init__(**kw)
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers with a positive sum; got {weights!r}")
        self.weights = weights

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        w = torch.tensor(self.weights, device=pixels.device, dtype=torch.float32)
        return pixels.float().mean(dim=(2, 3)) @ w


class TargetColor(ImageReward):
    """-|| mean colour - target ||_2 (or its square): [B, 3, H, W] -> [B], 0 at the target."""

    differentiable = True

    def __init__(self, *, target: Sequence[float] = (1.0, 0.0, 0.0), squared: bool = False, **kw) -> None:
        kw.setdefault("max_batch_size", 4096)
        super().__init__(**kw)
        try:
            target = tuple(float(t) for t in target)
        except (TypeError, ValueError):
            raise TypeError(f"target must be 3 numbers (RGB in [0, 1]); got {target!r}") from None
        if len(target) != 3 or not all(0.0 <= t <= 1.0 for t in target):
            raise ValueError(f"target must be 3 numbers in [0, 1] (RGB; divide 0..255 colours by 255); got {target!r}")
        self.target, self.squared = target, bool(squared)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        t = torch.tensor(self.target, device=pixels.device, dtype=torch.float32)
        diff = pixels.float().mean(dim=(2, 3)) - t
        sq = diff.square().sum(-1)
        # sqrt has an infinite derivative at 0: at the target exactly, the gradient is taken as 0
        return -sq if self.squared else -torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), sq)


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise ValueError(f"the {name} reward has no weights; path must be None, got {path!r}")


@register_reward("brightness")
def brightness(path: str | None = None, *, weights: Sequence[float] = REC709, **kw) -> Brightness:
    """Mean Rec. 709 luma in [0, 1] (differentiable)."""
    _no_path("brightness", path)
    kw.pop("device", None)  # runs wherever the images are
    return Brightness(weights=weights, **kw)


@register_reward("target_color")
def target_color(path: str | None = None, *, target: Sequence[float] = (1.0, 0.0, 0.0), squared: bool = False,
                 **kw) -> TargetColor:
    """-|| mean RGB - target || (differentiable); target in [0, 1], default pure red."""
    _no_path("target_color", path)
    kw.pop("device", None)
    return TargetColor(target=target, squared=squared, **kw)
