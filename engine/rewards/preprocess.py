"""CLIP image preprocessing in torch, on the images' device, differentiable.

It does what `CLIPImageProcessor` does to a PIL image (resize the shorter side to `size` with bicubic
filtering, center-crop `crop` x `crop`, normalize with the CLIP mean/std), but on a [B, 3, H, W] float
tensor in [0, 1], batched, so gradients reach the pixels. Resizing uses `F.interpolate(mode="bicubic",
antialias=True)`, torch's port of PIL's antialiased resampling, in fp32; unlike PIL on uint8 it does not
clip the bicubic overshoot (outputs may leave [0, 1] slightly near edges), which keeps gradients.
Images already `size` on their shorter side are not resampled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes used in preprocessor_config.json


@dataclass(frozen=True)
class ClipPreprocess:
    """[B, 3, H, W] in [0, 1] -> [B, 3, crop, crop] normalized pixel values, fp32.

    Equivalent to, per image: PIL resize (shorter side -> size, bicubic), center crop, (x - mean) / std.
    crop_offset: where the center crop starts when the excess is odd: "floor" ((h - crop) // 2, transformers'
        CLIPImageProcessor) or "round" (Python's round((h - crop) / 2), torchvision's CenterCrop, e.g. ImageReward).
    fit: "crop" (the above) or "pad": open_clip's ResizeMaxSize, which HPSv2 scores with: the longer side ->
        size, then zero pixels (black, before normalizing) pad the shorter side to a square, half on each side.
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    channels_last: bool = False
    crop_offset: str = "floor"
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.crop > self.size:
            raise ValueError(f"crop ({self.crop}) must be <= size ({self.size})")
        if self.mode not in ("bicubic", "bilinear"):
            raise ValueError(f"mode must be 'bicubic' or 'bilinear'; got {self.mode!r}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round'; got {self.crop_offset!r}")
        if self.fit not in ("crop", "pad") or (self.fit == "pad" and self.crop != self.size):
            raise ValueError(f"fit must be 'crop' or 'pad' (with crop == size); got {self.fit!r}")

    def _letterbox(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x, size=(nh, nw), mode=self.mode, antialias=True, align_corners=False)
            h, w = nh, nw
        pad_h, pad_w = self.size - h, self.size - w
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        if self.fit == "pad":
            return self._normalize(self._letterbox(x))
        h, w = x.shape[-2:]
        if min(h, w) != self.size:
            # the shorter side lands exactly on `size`, as in transformers' get_resize_output_image_size
            short = min(h, w)
            nh = self.size if h == short else int(self.size * h / short)
            nw = self.size if w == short else int(self.size * w / short)
            x = F.interpolate(x, size=(nh, nw), mode=self.mode, antialias=True, align_corners=False)
            h, w = nh, nw
        if self.crop_offset == "floor":
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
        else:
            top, left = int(round((h - self.crop) / 2)), int(round((w - self.crop) / 2))
        return self._normalize(x[..., top:top + self.crop, left:left + self.crop])

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @classmethod
    def from_pretrained(cls, path: str | None, image_size: int, **overrides) -> ClipPreprocess:
        """Reads `preprocessor_config.json` when `path` is a local directory holding one (size, crop_size,
        image_mean, image_std, resample); otherwise CLIP's defaults at the model's `image_size`."""
        cfg: dict = {"size": image_size, "crop": image_size}
        file = os.path.join(path, "preprocessor_config.json") if path and os.path.isdir(path) else None
        if file and os.path.isfile(file):
            with open(file) as f:
                raw = json.load(f)
            size = raw.get("size")
            if isinstance(size, dict):
                size = size.get("shortest_edge", size.get("height"))
            crop = raw.get("crop_size")
            if isinstance(crop, dict):
                crop = crop.get("height")
            if isinstance(size, int):
                cfg["size"] = size
            if raw.get("do_center_crop", True) is False:
                cfg["crop"] = cfg["size"]
            elif isinstance(crop, int):
                cfg["crop"] = crop
            if raw.get("image_mean"):
                cfg["mean"] = tuple(float(v) for v in raw["image_mean"])
            if raw.get("image_std"):
                cfg["std"] = tuple(float(v) for v in raw["image_std"])
            if raw.get("resample") in _RESAMPLE:
                cfg["mode"] = _RESAMPLE[raw["resample"]]
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**cfg)
