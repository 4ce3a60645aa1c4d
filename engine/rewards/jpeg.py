"""JPEG (in)compressibility, as DDPO defines them (`ddpo_pytorch/rewards.py`).

incompressibility = size in kB (bytes / 1000) of the image saved by PIL as JPEG at quality 95, after
quantizing to uint8 with (x * 255).round().clamp(0, 255); compressibility = -incompressibility.
Not differentiable: the scores carry no gradient even when the images require one.

The uint8 conversion and the device-to-host copy are one batched operation; the encoding itself is PIL's,
one call per image (there is no batched JPEG encoder in PIL). PIL releases the GIL while encoding, so
`num_threads` > 1 encodes images in parallel threads.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import torch

from .base import ImageReward, ValueRange
from .registry import register_reward


def _jpeg_kilobytes(image_hwc, quality: int) -> float:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegSize(ImageReward):
    """sign * JPEG size in kB at `quality`; sign = -1 for compressibility, +1 for incompressibility."""

    differentiable = False

    def __init__(self, *, sign: float, quality: int = 95, num_threads: int = 1, **kw) -> None:
        kw.setdefault("max_batch_size", 1024)
        super().__init__(**kw)
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in [1, 100]; got {quality!r}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1; got {num_threads!r}")
        self.sign = float(sign)
        self.quality = quality
        self.num_threads = num_threads

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        arrays = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if self.num_threads > 1 and len(arrays) > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(arrays))) as pool:
                sizes = list(pool.map(lambda a: _jpeg_kilobytes(a, self.quality), arrays))
        else:
            sizes = [_jpeg_kilobytes(a, self.quality) for a in arrays]
        return torch.tensor(sizes, dtype=torch.float32, device=pixels.device) * self.sign


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise ValueError(f"the {name} reward has no weights; path must be None, got {path!r}")


@register_reward("jpeg_compressibility")
def jpeg_compressibility(path: str | None = None, *, quality: int = 95, num_threads: int = 1,
                         value_range: ValueRange = (0.0, 1.0), **kw) -> JpegSize:
    """-(JPEG size in kB at `quality`): higher for images that compress better (DDPO)."""
    _no_path("jpeg_compressibility", path)
    return JpegSize(sign=-1.0, quality=quality, num_threads=num_threads, value_range=value_range, **kw)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(path: str | None = None, *, quality: int = 95, num_threads: int = 1,
                           value_range: ValueRange = (0.0, 1.0), **kw) -> JpegSize:
    """JPEG size in kB at `quality`: higher for images that compress worse (DDPO)."""
    _no_path("jpeg_incompressibility", path)
    return JpegSize(sign=1.0, quality=quality, num_threads=num_threads, value_range=value_range, **kw)
