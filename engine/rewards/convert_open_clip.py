"""open_clip CLIP checkpoints (ViT image tower + standard text transformer) -> transformers' `CLIPModel`.

HPSv2 is published as an open_clip ViT-H-14 state dict. This converts such a state dict into CLIPModel's
layout, so the model runs through transformers (SDPA, bf16 autocast, from_pretrained/save_pretrained).

Key mapping (open_clip -> transformers; i = layer index, tower = vision_model / text_model):
    visual.conv1.weight                         -> vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                      -> vision_model.embeddings.class_embedding
    visual.positional_embedding                 -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                             -> vision_model.pre_layrnorm.*   (sic: transformers' spelling)
    visual.ln_post.*                            -> vision_model.post_layernorm.*
    visual.proj [width, embed]                  -> visual_projection.weight = proj.T
    token_embedding.weight                      -> text_model.embeddings.token_embedding.weight
    positional_embedding                        -> text_model.embeddings.position_embedding.weight
    ln_final.*                                  -> text_model.final_layer_norm.*
    text_projection [width, embed]              -> text_projection.weight = text_projection.T
    logit_scale                                 -> logit_scale
    {visual.,}transformer.resblocks.i.ln_1.*    -> tower.encoder.layers.i.layer_norm1.*   (ln_2 -> layer_norm2)
      .attn.in_proj_{weight,bias} [3D, ...]     -> .self_attn.{q,k,v}_proj.{weight,bias} (split in thirds, q k v)
      .attn.out_proj.*                          -> .self_attn.out_proj.*
      .mlp.c_fc.* / .mlp.c_proj.*               -> .mlp.fc1.* / .mlp.fc2.*

Equivalences the conversion relies on (checked by tests/test_rewards_convert.py against a random open_clip
model of the same layout): open_clip applies ln_post to all tokens and pools token 0, transformers pools token
0 and applies post_layernorm (the same for a per-token LayerNorm); open_clip pools the text at argmax(input_ids)
(pool_type "argmax"), transformers at the first `eos_token_id`, which is the same position when the EOT token has
the largest id, as in CLIP's tokenizer (eos_token_id is set to vocab_size - 1); both text towers are causal.
Activation: GELU (open_clip's default; ViT-H-14 and HPSv2), or quick_gelu when the model config says so
(OpenAI's models). Layouts outside this (layer scale `ls_*`, attentional pooling, timm or HF text towers,
projection biases, SigLIP's logit_bias) raise ValueError naming the keys that have no mapping.
The number of attention heads is not in the state dict: it comes from the open_clip model config
(vision: width // head_width, head_width default 64; text: heads, default 8).
"""

from __future__ import annotations

import math
import os
import re

import torch

# open_clip's src/open_clip/model_configs/ViT-H-14.json (HPSv2's architecture)
OPEN_CLIP_VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
}
_FLAT_MAP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask", "visual.attn_mask"}  # buffers of old open_clip versions, rebuilt by transformers


def convert_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict -> transformers CLIPModel state dict (module docstring); tensors are shared
    or sliced, not copied. Raises ValueError listing the keys that have no mapping."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _FLAT_MAP:
            out[_FLAT_MAP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t()
            continue
        m = _BLOCK.match(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                if value.shape[0] % 3:
                    raise ValueError(f"{key}: first dim {value.shape[0]} is not 3 x width")
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
                continue
            target = next((v for k, v in _BLOCK_MAP.items() if rest.startswith(k)), None)
            if target is not None:
                out[prefix + target + rest[len(next(k for k in _BLOCK_MAP if rest.startswith(k))):]] = value
                continue
        unmapped.append(key)
    if unmapped:
        raise ValueError(f"open_clip state dict has {len(unmapped)} keys with no transformers CLIPModel counterpart "
                         f"(unsupported layout): {unmapped[:10]}")
    return out


def _layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def clip_config_from_open_clip(state_dict: dict[str, torch.Tensor], model_cfg: dict | None = None, *,
                               quick_gelu: bool | None = None):
    """The transformers CLIPConfig of an open_clip state dict: sizes from the tensors' shapes, attention heads and
    the activation from the open_clip model config `model_cfg` (its JSON layout; default ViT-H-14). Widths that
    the config states and the tensors contradict raise ValueError."""
    from transformers import CLIPConfig

    model_cfg = OPEN_CLIP_VIT_H_14 if model_cfg is None else model_cfg
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict with a ViT image tower: missing {missing} "
                         f"(keys start with {sorted(state_dict)[:5]})")
    v_cfg, t_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    conv = state_dict["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = state_dict["visual.positional_embedding"].shape[0] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise ValueError(f"visual.positional_embedding has {grid} + 1 positions, not a square grid + class token")
    embed_dim = state_dict["visual.proj"].shape[1]
    vocab, t_width = state_dict["token_embedding.weight"].shape
    checks = [("vision_cfg.width", v_cfg.get("width"), v_width),
              ("vision_cfg.patch_size", v_cfg.get("patch_size"), patch),
              ("text_cfg.width", t_cfg.get("width"), t_width),
              ("text_cfg.vocab_size", t_cfg.get("vocab_size"), vocab),
              ("embed_dim", model_cfg.get("embed_dim"), embed_dim),
              ("text_projection width", embed_dim, state_dict["text_projection"].shape[1])]
    bad = [f"{name}: config {want}, checkpoint {got}" for name, want, got in checks if want is not None and want != got]
    if bad:
        raise ValueError("the open_clip model config does not match the checkpoint: " + "; ".join(bad))
    head_width = v_cfg.get("head_width", 64)
    if v_width % head_width:
        raise ValueError(f"vision width {v_width} is not a multiple of head_width {head_width}")
    t_heads = t_cfg.get("heads", 8)
    act = "quick_gelu" if (model_cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu) else "gelu"
    vision = {
        "hidden_size": v_width, "num_attention_heads": v_width // head_width, "patch_size": patch,
        "image_size": patch * side, "num_hidden_layers": _layers(state_dict, "visual."),
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "hidden_act": act, "projection_dim": embed_dim, "layer_norm_eps": 1e-5,
    }
    text = {
        "hidden_size": t_width, "num_attention_heads": t_heads, "vocab_size": vocab,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "num_hidden_layers": _layers(state_dict, ""),
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "hidden_act": act, "projection_dim": embed_dim, "layer_norm_eps": 1e-5,
        # open_clip pools at argmax(ids) = the EOT token, the largest id of CLIP's tokenizer
        "eos_token_id": vocab - 1, "bos_token_id": vocab - 2, "pad_token_id": 0,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def load_open_clip_checkpoint(file_or_state_dict: str | dict[str, torch.Tensor], model_cfg: dict | None = None, *,
                              quick_gelu: bool | None = None, dtype: torch.dtype = torch.float32, device=None,
                              attn_implementation: str | None = "sdpa", reward: str = "open_clip"):
    """A transformers CLIPModel (eval, frozen) with the weights of an open_clip checkpoint file (a state dict, or
    {"state_dict": ...} as HPSv2 saves it; a DDP "module." prefix is stripped) or of a state dict."""
    from transformers import CLIPModel

    from .loading import load_state_dict_file

    if isinstance(file_or_state_dict, str | os.PathLike):
        sd = load_state_dict_file(os.fspath(file_or_state_dict), reward)
    else:
        sd = dict(file_or_state_dict)
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
    config = clip_config_from_open_clip(sd, model_cfg, quick_gelu=quick_gelu)
    converted = convert_open_clip_state_dict(sd)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=converted, dtype=dtype,
                                            output_loading_info=True, **extra)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{reward}: the open_clip checkpoint lacks {len(missing)} CLIPModel weights: {missing[:5]}")
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def convert_open_clip_checkpoint(file: str, out_dir: str, model_cfg: dict | None = None, *,
                                 quick_gelu: bool | None = None, tokenizer: str | None = None) -> str:
    """Converts an open_clip checkpoint file once and saves it with save_pretrained into `out_dir` (plus the
    tokenizer `tokenizer`, a directory or hub id, when given), so later loads are plain from_pretrained calls
    (`load_reward("hpsv2", out_dir)`). Returns out_dir."""
    model = load_open_clip_checkpoint(file, model_cfg, quick_gelu=quick_gelu)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out_dir)
    return out_dir
