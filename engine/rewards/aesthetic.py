"""The LAION aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalized, into an MLP head.

score = head(e / ||e||), e = CLIP's get_image_features(pixels) (vision tower + visual projection; the text
tower is not loaded). The head is the improved-aesthetic-predictor's MLP (christophschuhmann/
improved-aesthetic-predictor, used by DDPO and AlignProp as `sac+logos+ava1-l14-linearMSE.pth`):

    layers = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                        Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

Its state-dict keys are `layers.{0,2,4,6,7}.{weight,bias}`; files whose keys lack the "layers." prefix or carry
a "module."/"model."/"mlp." prefix are accepted too. The input width is read from the file and must equal the
CLIP projection width (768 for ViT-L/14).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import ImageReward
from .clip import clip_image_embeds, vit_activation_bytes
from .loading import from_pretrained, load_state_dict_file, looks_local, resolve_device
from .preprocess import ClipPreprocess
from .registry import register_reward

AESTHETIC_CLIP_DEFAULT = "openai/clip-vit-large-patch14"
HEAD_FILES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "aesthetic_head.pt",
              "sac+logos+ava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: [b, input_size] -> [b, 1]."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def normalize_head_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps the key spellings of published aesthetic heads to `layers.N.{weight,bias}`."""
    out = {}
    for key, value in state_dict.items():
        k = key
        for prefix in ("module.", "model.", "mlp.", "head."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k[:1].isdigit():
            k = "layers." + k
        out[k] = value
    return out


def load_aesthetic_head(file: str, reward: str = "aesthetic") -> AestheticMLP:
    """An AestheticMLP (eval, frozen) with the weights of `file` (.pth/.pt/.safetensors)."""
    sd = normalize_head_keys(load_state_dict_file(file, reward))
    first = sd.get("layers.0.weight")
    if first is None or first.dim() != 2:
        raise ValueError(f"{reward}: {file!r} is not an aesthetic MLP head: no 2-D 'layers.0.weight' "
                         f"(keys: {sorted(sd)[:8]})")
    head = AestheticMLP(first.shape[1])
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{reward}: {file!r} does not match the improved-aesthetic-predictor layout "
                         f"(Linear({first.shape[1]}, 1024) ... Linear(16, 1)): {exc}") from exc
    return head.eval().requires_grad_(False)


def find_head_file(path: str | None, head: str | None, reward: str = "aesthetic") -> str:
    """`head` if given (must exist); else the first of HEAD_FILES inside the local directory `path`."""
    if head is not None:
        if not os.path.isfile(head):
            raise FileNotFoundError(f"{reward}: head file {head!r} does not exist")
        return head
    if path is not None and os.path.isdir(path):
        for name in HEAD_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        where = f"in {path!r}"
    elif path is not None:
        where = f"for the directory {path!r}, which does not exist"
    else:
        where = "nowhere: the CLIP model path is a hub id"
    raise FileNotFoundError(
        f"{reward}: no aesthetic head: pass head=<file> (the LAION improved-aesthetic-predictor "
        f"sac+logos+ava1-l14-linearMSE.pth) or put one of {list(HEAD_FILES)} next to the CLIP model; looked {where}"
    )


class AestheticReward(ImageReward):
    """LAION aesthetic score of images (about 1..10 with the published head); differentiable.

    Args:
        vision: a transformers CLIPVisionModelWithProjection (eval, frozen).
        head: the AestheticMLP, on the same device.
        preprocess: the torch preprocessing.
        **kw: ImageReward's options.
    """

    differentiable = True

    def __init__(self, vision, head: AestheticMLP, preprocess: ClipPreprocess, **kw) -> None:
        super().__init__(**kw)
        proj = vision.config.projection_dim
        if head.input_size != proj:
            raise ValueError(f"the aesthetic head takes {head.input_size}-d embeddings but the CLIP model projects to "
                             f"{proj} (the published head needs CLIP ViT-L/14, 768)")
        self.vision, self.head, self.preprocess = vision, head, preprocess
        self.device = next(vision.parameters()).device

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        pixel_values = self.preprocess(pixels).to(self.vision.dtype)
        embeds = clip_image_embeds(self.vision, pixel_values).float()
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return self.head(embeds.to(self.head.layers[0].weight.dtype)).squeeze(-1)

    def activation_bytes_per_image(self, grad: bool, height: int, width: int) -> int:
        elem = 2 if self.autocast_dtype is not None else self.vision.dtype.itemsize
        return vit_activation_bytes(self.vision.config, self.preprocess.crop, elem, grad, height * width)


@register_reward("aesthetic")
def aesthetic(path: str | None = None, *, head: str | None = None, device=None, dtype: torch.dtype = torch.float32,
              attn_implementation: str | None = "sdpa", channels_last: bool = True, image_size: int | None = None,
              **kw) -> AestheticReward:
    """LAION aesthetic predictor.

    path: a CLIP ViT-L/14 directory or hub id (a full CLIPModel or a CLIPVisionModelWithProjection checkpoint;
        default openai/clip-vit-large-patch14).
    head: the MLP head file; default: the first of HEAD_FILES found in the directory `path`.
    """
    from transformers import CLIPVisionModelWithProjection

    path = path or AESTHETIC_CLIP_DEFAULT
    head_file = find_head_file(path if looks_local(path) else None, head)
    device = resolve_device(device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    vision = from_pretrained(CLIPVisionModelWithProjection, path, "aesthetic", "CLIP model", dtype=dtype,
                             device=device, **extra)
    mlp = load_aesthetic_head(head_file).to(device)
    pre = ClipPreprocess.from_pretrained(path, vision.config.image_size, size=image_size, crop=image_size,
                                         channels_last=channels_last)
    if channels_last and device.type == "cuda":
        vision.to(memory_format=torch.channels_last)
    return AestheticReward(vision, mlp, pre, **kw)
