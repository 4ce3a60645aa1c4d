"""CLIP image-text rewards: `clip_score`, `pickscore` (and the model behind `hpsv2`, see hpsv2.py).

All compute the cosine between CLIP's projected image and text embeddings (transformers' `CLIPModel`),
from pixels preprocessed in torch (preprocess.py), and scale it:
- "cosine": cos (HPSv2's score; the default of `clip_score`);
- "logit_scale": logit_scale.exp() * cos (PickScore's score; CLIP's own logits);
- "clipscore": 2.5 * max(cos, 0) (CLIP-S of Hessel et al. 2021, "CLIPScore");
- "x100": 100 * max(cos, 0) (torchmetrics' CLIPScore, the number most papers report as "CLIP score").
The two clamped modes have no gradient where cos < 0.

Each prompt's text embedding is computed once per micro-batch (a GRPO group of G images per prompt costs one
text forward, not G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageReward
from .loading import from_pretrained, load_tokenizer, resolve_device
from .preprocess import ClipPreprocess
from .registry import register_reward

MODES = ("cosine", "logit_scale", "clipscore", "x100")

CLIP_SCORE_DEFAULT = "openai/clip-vit-large-patch14"
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's authors load the processor from here


def vit_activation_bytes(vision_config, crop: int, elem: int, grad: bool, input_pixels: int = 0) -> int:
    """Rough peak activation bytes per image of a CLIP ViT: without grad one layer's live tensors (qkv, MLP
    hidden, attention scores when not fused); with grad ~10 D + 2 I values per token per layer saved."""
    c = vision_config
    tokens = (crop // c.patch_size) ** 2 + 1
    d, inter, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    layer = elem * tokens * (4 * d + inter) + elem * heads * tokens * tokens
    if grad:
        layer = c.num_hidden_layers * (elem * tokens * (10 * d + 2 * inter) + elem * heads * tokens * tokens)
    return layer + 3 * 4 * (input_pixels + crop * crop) * 3  # fp32 copies made by the range map and preprocessing


def clip_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[b, 3, S, S] normalized pixel values -> [b, P] projected image embeddings (unnormalized), for a CLIPModel
    or a CLIPVisionModelWithProjection (both have vision_model + visual_projection): CLIP's get_image_features."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


class ClipReward(ImageReward):
    """Scaled cosine of CLIP image and text embeddings; differentiable w.r.t. the pixels.

    Args:
        model: a transformers `CLIPModel` (eval, frozen).
        tokenizer: its tokenizer (CLIPTokenizer); prompts longer than the text tower's positions are cut.
        preprocess: the torch preprocessing.
        mode: one of MODES (module docstring).
        **kw: ImageReward's options (value_range, max_batch_size, memory_budget_mb, autocast_dtype, ...).
    """

    differentiable = True
    needs_prompts = True
    compile_target = "image_embeds"  # the image tower; prompts are tokenized and encoded eagerly

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, *, mode: str = "cosine", **kw) -> None:
        super().__init__(**kw)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.model, self.tokenizer, self.preprocess, self.mode = model, tokenizer, preprocess, mode
        self.device = next(model.parameters()).device
        self.max_length = model.config.text_config.max_position_embeddings

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> [b, P] projected (unnormalized) image embeddings."""
        pixel_values = self.preprocess(pixels).to(self.model.dtype)
        return clip_image_embeds(self.model, pixel_values)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """b strings -> [b, P] projected (unnormalized) text embeddings; each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        embeds = self.model.text_projection(out.pooler_output)
        if len(unique) == len(prompts):
            return embeds
        index = {p: i for i, p in enumerate(unique)}
        return embeds[torch.tensor([index[p] for p in prompts], device=embeds.device)]

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        img = F.normalize(self.image_embeds(pixels).float(), dim=-1)
        txt = F.normalize(self.text_embeds(prompts).float(), dim=-1)
        cos = (img * txt).sum(-1)
        if self.mode == "cosine":
            return cos
        if self.mode == "logit_scale":
            return self.model.logit_scale.float().exp() * cos
        return (2.5 if self.mode == "clipscore" else 100.0) * cos.clamp(min=0)

    def activation_bytes_per_image(self, grad: bool, height: int, width: int) -> int:
        elem = 2 if self.autocast_dtype is not None else self.model.dtype.itemsize
        return vit_activation_bytes(self.model.config.vision_config, self.preprocess.crop, elem, grad, height * width)


def build_clip_reward(path: str, reward: str, *, tokenizer: str | None = None, fallback_tokenizer: str | None = None,
                      mode: str = "cosine", device=None, dtype: torch.dtype = torch.float32,
                      attn_implementation: str | None = "sdpa", channels_last: bool = True,
                      image_size: int | None = None, fit: str | None = None, **kw) -> ClipReward:
    """A ClipReward from a CLIPModel directory or hub id (tokenizer from `tokenizer`, else `path`, else the
    fallback; preprocessing from path's preprocessor_config.json, else CLIP's defaults; `fit`: ClipPreprocess's)."""
    from transformers import CLIPModel

    device = resolve_device(device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = from_pretrained(CLIPModel, path, reward, "CLIP model", dtype=dtype, device=device, **extra)
    tok = load_tokenizer(tokenizer or path, reward, fallback=None if tokenizer else fallback_tokenizer)
    pre = ClipPreprocess.from_pretrained(path, model.config.vision_config.image_size, size=image_size,
                                         crop=image_size, channels_last=channels_last, fit=fit)
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # the patch-embedding convolution
    return ClipReward(model, tok, pre, mode=mode, **kw)


@register_reward("clip_score")
def clip_score(path: str | None = None, *, mode: str = "cosine", tokenizer: str | None = None, **kw) -> ClipReward:
    """CLIP image-text similarity (mode: see the module docstring; default "cosine").

    path: a CLIPModel directory or hub id (default openai/clip-vit-large-patch14).
    """
    return build_clip_reward(path or CLIP_SCORE_DEFAULT, "clip_score", tokenizer=tokenizer, mode=mode, **kw)


@register_reward("pickscore")
def pickscore(path: str | None = None, *, tokenizer: str | None = None, **kw) -> ClipReward:
    """PickScore: logit_scale.exp() * cos of a CLIP-H fine-tuned on Pick-a-Pic (scores around 20-23).

    path: the PickScore CLIPModel (default yuvalkirstain/PickScore_v1); its tokenizer comes from `tokenizer`, or
    from path, or from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (where PickScore's authors load it) when path is a
    directory without one.
    """
    return build_clip_reward(path or PICKSCORE_DEFAULT, "pickscore", tokenizer=tokenizer,
                             fallback_tokenizer=PICKSCORE_PROCESSOR, mode="logit_scale", **kw)
