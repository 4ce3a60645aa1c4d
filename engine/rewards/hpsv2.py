"""HPSv2 (Human Preference Score v2): cosine of CLIP-H image and text embeddings, with HPSv2's weights.

score = <e_img / ||e_img||, e_txt / ||e_txt||>, as HPSv2's `img_score.py` computes it
(`diagonal(image_features @ text_features.T)` of normalized features, no logit scale); about 0.2-0.3.
HPSv2 publishes an open_clip ViT-H-14 checkpoint (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt, a
{"state_dict": ...} file); convert_open_clip.py maps it into transformers' CLIPModel. Its preprocessing is
the one HPSv2's `img_score.py` gets from its open_clip (`light_augmentation=True`: ResizeMaxSize): the longer side
resized to 224 (bicubic), the shorter padded with black to a square, OpenAI mean/std; not the shorter-side resize
and center crop of open_clip's usual eval transform, which scores a non-square image differently. Its tokenizer is
open_clip's CLIP BPE, which laion/CLIP-ViT-H-14-laion2B-s32B-b79K's CLIPTokenizer reproduces.
"""

from __future__ import annotations

import os

import torch

from .clip import PICKSCORE_PROCESSOR, ClipReward, build_clip_reward
from .convert_open_clip import load_open_clip_checkpoint
from .loading import load_tokenizer, looks_local, resolve_device
from .preprocess import ClipPreprocess
from .registry import register_reward

HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPSV2_TOKENIZER = PICKSCORE_PROCESSOR  # the ViT-H-14 laion2B tokenizer (open_clip's CLIP BPE)


def find_hpsv2_checkpoint(path: str | None, version: str) -> str:
    """The checkpoint file: `path` itself, or HPSV2_FILES[version] (then any HPSV2_FILES) inside the directory
    `path`; None downloads HPSV2_FILES[version] from the hub repo xswu/HPSv2 (as the hpsv2 package does)."""
    if version not in HPSV2_FILES:
        raise ValueError(f"version must be one of {sorted(HPSV2_FILES)}; got {version!r}")
    if path is None:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HPSV2_REPO, HPSV2_FILES[version])
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        names = [HPSV2_FILES[version]] + [f for f in HPSV2_FILES.values() if f != HPSV2_FILES[version]]
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"hpsv2: {path!r} has neither config.json (a converted CLIPModel) nor any of {names}")
    raise FileNotFoundError(f"hpsv2: {path!r} does not exist; expected an HPSv2 checkpoint file "
                            f"({' or '.join(HPSV2_FILES.values())}), a directory holding one, or a converted CLIPModel "
                            "directory (convert_open_clip_checkpoint)")


@register_reward("hpsv2")
def hpsv2(path: str | None = None, *, version: str = "v2.1", tokenizer: str | None = None,
          model_cfg: dict | None = None, device=None, dtype: torch.dtype = torch.float32,
          attn_implementation: str | None = "sdpa", channels_last: bool = True, **kw) -> ClipReward:
    """HPSv2 score (cosine, differentiable).

    path: an HPSv2 open_clip checkpoint file, a directory holding one (HPSV2_FILES), or a directory with the
        CLIPModel that `convert_open_clip_checkpoint` saved (loaded with from_pretrained, no conversion); None
        downloads HPSV2_FILES[version] from xswu/HPSv2.
    version: "v2.1" (default; what Flow-GRPO and DanceGRPO use) or "v2.0".
    tokenizer: a directory or hub id (default: path when it holds one, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    model_cfg: the open_clip model config of the checkpoint (default ViT-H-14).
    """
    if path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return build_clip_reward(path, "hpsv2", tokenizer=tokenizer, fallback_tokenizer=HPSV2_TOKENIZER,
                                 mode="cosine", device=device, dtype=dtype, attn_implementation=attn_implementation,
                                 channels_last=channels_last, fit="pad", **kw)
    if path is not None and not looks_local(path) and not os.path.exists(path):
        raise FileNotFoundError(f"hpsv2: {path!r} is not a local file or directory (HPSv2 is not a from_pretrained "
                                "hub model; pass the checkpoint file, or path=None to download it)")
    file = find_hpsv2_checkpoint(path, version)
    device = resolve_device(device)
    model = load_open_clip_checkpoint(file, model_cfg, dtype=dtype, device=device,
                                      attn_implementation=attn_implementation, reward="hpsv2")
    if tokenizer is None:
        local = os.path.dirname(os.path.abspath(file))
        has_tok = any(f.startswith("tokenizer") for f in os.listdir(local))
        tokenizer = local if has_tok else HPSV2_TOKENIZER
    tok = load_tokenizer(tokenizer, "hpsv2")
    pre = ClipPreprocess.from_pretrained(None, model.config.vision_config.image_size, channels_last=channels_last,
                                         fit="pad")
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return ClipReward(model, tok, pre, mode="cosine", **kw)
