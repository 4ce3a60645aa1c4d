"""Sample-image grids with captions (PIL)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write


def _to_uint8_hwc(images: Any):
    import numpy as np

    if hasattr(images, "detach"):
        images = images.detach().to("cpu").float().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3, H, W] (or [B, 1, H, W]) in [0, 1]; got shape {tuple(arr.shape)}")
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def _wrap(text: str, chars: int, max_lines: int) -> list[str]:
    lines = textwrap.wrap(text, chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 3].rstrip() + "..."
    return lines


def make_image_grid(images: Any, captions: Sequence[str] | None = None, nrow: int | None = None,
                    pad: int = 2, max_caption_lines: int = 3, min_width: int = 128):
    """A PIL image: `images` ([B, 3, H, W] tensor or array, values in [0, 1]) tiled `nrow` per row
    (default ceil(sqrt(B))), each with its caption (wrapped, at most `max_caption_lines` lines) below.
    Images narrower than `min_width` are enlarged by an integer factor (nearest), so that the samples of tiny
    test models stay visible and their captions readable."""
    from PIL import Image, ImageDraw, ImageFont

    arr = _to_uint8_hwc(images)
    scale = max(1, math.ceil(min_width / arr.shape[2]))
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, _ = arr.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"captions has {len(captions)} entries for {b} images")
    ncol = nrow or max(1, math.ceil(math.sqrt(b)))
    nrows = math.ceil(b / ncol)
    font = ImageFont.load_default()
    line_h = 12
    chars = max(4, (w - 4) // 6)
    wrapped = [_wrap(str(c), chars, max_caption_lines) for c in captions] if captions else None
    cap_h = (max((len(c) for c in wrapped), default=0) * line_h + 4) if wrapped else 0
    cell_w, cell_h = w + pad, h + cap_h + pad
    grid = Image.new("RGB", (ncol * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        x, y = pad + (i % ncol) * cell_w, pad + (i // ncol) * cell_h
        grid.paste(Image.fromarray(arr[i]), (x, y))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text((x + 2, y + h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def save_image_grid(path: str | Path, images: Any, captions: Sequence[str] | None = None,
                    nrow: int | None = None, min_width: int = 128) -> Path:
    """Save `make_image_grid(images, captions, nrow)` as a PNG at `path` (atomically); return the path."""
    grid = make_image_grid(images, captions, nrow, min_width=min_width)
    return atomic_write(path, lambda p: grid.save(p, format="PNG"))
