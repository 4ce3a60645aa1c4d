"""ImageReward (Xu et al. 2023, THUDM/ImageReward): BLIP ViT-L image encoder, BERT text encoder with cross-attention
to the image tokens, MLP head on the text [CLS] state, normalized by the published mean and std.

The original (`ImageReward/ImageReward.py`, `score` / `score_gard`), per image:

    image_embeds = blip.visual_encoder(preprocess(image))                       # [1, 197, 1024], all tokens normed
    out = blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=ones, return_dict=True)     # BERT in encoder mode, cross-attn
    reward = (mlp(out.last_hidden_state[:, 0, :].float()) - 0.16717362830052426) / 1.0333394966054072

with `ids, mask = blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35)` (bert-base-uncased
plus the added [DEC] bos and [ENC] tokens: vocabulary 30524) and `preprocess` = Resize(224, BICUBIC), CenterCrop(224),
ToTensor, Normalize(CLIP mean, CLIP std). The MLP is Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) (no activations; the same module as the LAION
aesthetic head, `AestheticMLP`).

Here it is built from transformers' BLIP parts, as `BlipForImageTextRetrieval` builds its ITM branch:
`BlipVisionModel` (its last_hidden_state is post_layernorm of every token, as BLIP's ViT applies `norm` to every
token) and `BlipTextModel(add_pooling_layer=False)` with `is_decoder=True` in the config (which is what gives each
layer its cross-attention) called with `is_decoder=False` (bidirectional self-attention: med.py's encoder mode).
BLIP's ViT uses LayerNorm eps 1e-6 (transformers' BlipVisionConfig default is 1e-5: set explicitly) and exact GELU;
BLIP's text embeddings have no token-type embeddings, nor do transformers'. The mean and std are stored in the
config (`reward_mean`, `reward_std`) and saved with it.

The published checkpoint (`ImageReward.pt` in THUDM/ImageReward, a plain state dict of the module above) is
converted by key (`convert_imagereward_state_dict`):

    blip.visual_encoder.cls_token                  -> vision_model.embeddings.class_embedding
    blip.visual_encoder.pos_embed                  -> vision_model.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*         -> vision_model.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.i.norm1/norm2.*     -> vision_model.encoder.layers.i.layer_norm1/layer_norm2.*
    blip.visual_encoder.blocks.i.attn.qkv.*        -> vision_model.encoder.layers.i.self_attn.qkv.*  (same q|k|v layout)
    blip.visual_encoder.blocks.i.attn.proj.*       -> vision_model.encoder.layers.i.self_attn.projection.*
    blip.visual_encoder.blocks.i.mlp.fc1/fc2.*     -> vision_model.encoder.layers.i.mlp.fc1/fc2.*
    blip.visual_encoder.norm.*                     -> vision_model.post_layernorm.*
    blip.text_encoder.*                            -> text_encoder.*   (med.py's names are BlipTextModel's names)
    mlp.layers.N.*                                 -> mlp.layers.N.*
    dropped: blip.vision_proj.*, blip.text_proj.* (ITC projections, unused by the score), *.position_ids buffers.

Attention heads are not in the state dict: ViT width // 64 (16 for ViT-L) and med_config.json's
num_attention_heads (12) unless given. Vision attention runs through SDPA by default (`attn_implementation`:
"sdpa", "fusedrl" = fusedrl's flash_attention, "eager" = transformers' BlipAttention as is); the text tower's
attention (35 queries) stays transformers' eager code.
"""

from __future__ import annotations

import json
import math
import os
import re
import types

import torch
import torch.nn.functional as F

from .aesthetic import AestheticMLP
from .base import ImageReward
from .clip import vit_activation_bytes
from .loading import from_pretrained, load_state_dict_file, looks_local, resolve_device
from .preprocess import ClipPreprocess
from .registry import register_reward

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean
IMAGEREWARD_STD = 1.0333394966054072  # ImageReward.py: self.std
IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # BLIP's init_tokenizer, plus [DEC] and [ENC]
MAX_LENGTH = 35  # ImageReward.score: padding="max_length", max_length=35

# med_config.json of THUDM/ImageReward (BLIP's), and BLIP's create_vit("large")
MED_CONFIG = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
BLIP_VIT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
ATTN_IMPLEMENTATIONS = ("sdpa", "fusedrl", "eager")

_VIS = "blip.visual_encoder."
_VIS_FLAT = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIS_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VIS_BLOCK_MAP = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                  "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_DROPPED = re.compile(r"^blip\.(vision_proj|text_proj|itm_head)\.|^blip\.temp$|(^|\.)position_ids$")


# -- the model ----------------------------------------------------------------------------------------------------

_MODEL_CLASS = None


def imagereward_model_class():
    """`ImageRewardModel`, a transformers `BlipPreTrainedModel` (defined on first use so that importing fusedrl does
    not import transformers): vision_model (BlipVisionModel), text_encoder (BlipTextModel, cross-attention), mlp."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    from transformers import BlipConfig, BlipTextModel, BlipVisionModel
    from transformers.models.blip.modeling_blip import BlipPreTrainedModel

    class ImageRewardModel(BlipPreTrainedModel):
        """ImageReward: `forward(pixel_values [b, 3, S, S], input_ids [b, L], attention_mask [b, L]) -> [b]`
        normalized scores (fp32)."""

        config_class = BlipConfig
        _no_split_modules = ["BlipEncoderLayer", "BlipTextLayer"]

        def __init__(self, config) -> None:
            super().__init__(config)
            self.vision_model = BlipVisionModel(config.vision_config)
            self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
            self.mlp = AestheticMLP(config.text_config.hidden_size)
            self.post_init()

        def text_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
            """[b, hidden] last hidden state of the text [CLS] token, cross-attending to the image tokens."""
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                    return_dict=True)
            return out.last_hidden_state[:, 0, :]

        def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
            feats = self.text_features(pixel_values, input_ids, attention_mask).float()
            head_dtype = self.mlp.layers[0].weight.dtype
            raw = self.mlp(feats.to(head_dtype)).float().squeeze(-1)
            mean = getattr(self.config, "reward_mean", IMAGEREWARD_MEAN)
            std = getattr(self.config, "reward_std", IMAGEREWARD_STD)
            return (raw - mean) / std

    _MODEL_CLASS = ImageRewardModel
    return ImageRewardModel


def imagereward_config(vision: dict | None = None, text: dict | None = None, *, mean: float = IMAGEREWARD_MEAN,
                       std: float = IMAGEREWARD_STD):
    """The BlipConfig of ImageReward: `vision` overrides BLIP ViT-L's sizes, `text` overrides med_config.json's; the
    text tower gets cross-attention (is_decoder=True) to the vision width."""
    from transformers import BlipConfig

    v = {**BLIP_VIT_LARGE, **(vision or {})}
    t = {**MED_CONFIG, **(text or {})}
    t.update(encoder_hidden_size=v["hidden_size"], is_decoder=True, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, pad_token_id=t.get("pad_token_id", 0),
             bos_token_id=None, eos_token_id=None, sep_token_id=None)
    return BlipConfig(text_config=t, vision_config=v, reward_mean=float(mean), reward_std=float(std),
                      architectures=["ImageRewardModel"])


# -- attention ----------------------------------------------------------------------------------------------------


def _fused_blip_attention_forward(self, hidden_states: torch.Tensor, **kwargs):
    """BlipAttention.forward with the softmax(q k^T * scale) v part fused (SDPA or fusedrl's flash_attention); same
    qkv layout, same scale, no dropout (eval). Returns (output, None)."""
    b, n, d = hidden_states.shape
    q, k, v = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    if self._fusedrl_impl == "fusedrl":
        from fusedrl.kernels import flash_attention

        out = flash_attention(q, k, v, scale=self.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.projection(out.transpose(1, 2).reshape(b, n, d)), None


def set_vision_attention(model, impl: str) -> None:
    """Routes the BLIP vision tower's attention through `impl` ("sdpa", "fusedrl" or "eager")."""
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}; got {impl!r}")
    for layer in model.vision_model.encoder.layers:
        attn = layer.self_attn
        if impl == "eager":
            attn.__dict__.pop("forward", None)
        else:
            attn._fusedrl_impl = impl
            attn.forward = types.MethodType(_fused_blip_attention_forward, attn)


# -- the checkpoint converter -------------------------------------------------------------------------------------


def convert_imagereward_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ImageReward state dict (keys `blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`) ->
    ImageRewardModel state dict (module docstring). Tensors are shared, not copied. Raises ValueError listing the
    keys that have no mapping."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        if key.startswith(_VIS):
            rest = key[len(_VIS):]
            if rest in _VIS_FLAT:
                out["vision_model." + _VIS_FLAT[rest]] = value
                continue
            m = _VIS_BLOCK.match(rest)
            if m:
                out[f"vision_model.encoder.layers.{m.group(1)}.{_VIS_BLOCK_MAP[m.group(2)]}.{m.group(3)}"] = value
                continue
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key[len("blip.text_encoder."):]] = value
            continue
        elif key.startswith("mlp.layers."):
            out[key] = value
            continue
        unmapped.append(key)
    if unmapped:
        raise ValueError(f"ImageReward state dict has {len(unmapped)} keys with no counterpart in ImageRewardModel "
                         f"(not the BLIP ViT + BERT + MLP layout of ImageReward.pt): {unmapped[:10]}")
    return out


def _count(state_dict: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in state_dict if (m := rx.match(k))}
    return max(ids) + 1 if ids else 0


def imagereward_config_from_state_dict(state_dict: dict[str, torch.Tensor], med_config: dict | None = None, *,
                                       vision_heads: int | None = None, mean: float = IMAGEREWARD_MEAN,
                                       std: float = IMAGEREWARD_STD):
    """The BlipConfig of an original ImageReward state dict: sizes from the tensors' shapes; text attention heads,
    layer-norm eps and activation from `med_config` (med_config.json's content; default BLIP's); vision heads
    `vision_heads` (default width // 64, BLIP's ViT-B and ViT-L)."""
    required = [_VIS + "patch_embed.proj.weight", _VIS + "pos_embed",
                "blip.text_encoder.embeddings.word_embeddings.weight",
                "blip.text_encoder.embeddings.position_embeddings.weight", "mlp.layers.0.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not an ImageReward state dict: missing {missing} (keys start with {sorted(state_dict)[:5]})")
    conv = state_dict[_VIS + "patch_embed.proj.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = state_dict[_VIS + "pos_embed"].shape[1] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise ValueError(f"{_VIS}pos_embed has {grid} + 1 positions, not a square grid + class token")
    heads = vision_heads or width // 64
    if not heads or width % heads:
        raise ValueError(f"vision width {width} is not divisible into {heads} heads; pass vision_heads")
    vision = {"hidden_size": width, "patch_size": patch, "image_size": side * patch,
              "num_hidden_layers": _count(state_dict, r"^blip\.visual_encoder\.blocks\.(\d+)\."),
              "intermediate_size": state_dict[_VIS + "blocks.0.mlp.fc1.weight"].shape[0],
              "num_attention_heads": heads}
    med = {**MED_CONFIG, **(med_config or {})}
    vocab, hidden = state_dict["blip.text_encoder.embeddings.word_embeddings.weight"].shape
    text = {"vocab_size": vocab, "hidden_size": hidden,
            "max_position_embeddings": state_dict["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0],
            "num_hidden_layers": _count(state_dict, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\."),
            "intermediate_size": state_dict["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "num_attention_heads": med["num_attention_heads"], "layer_norm_eps": med["layer_norm_eps"],
            "hidden_act": med["hidden_act"], "pad_token_id": med.get("pad_token_id", 0)}
    if hidden % text["num_attention_heads"]:
        raise ValueError(f"text width {hidden} is not divisible by med_config num_attention_heads "
                         f"{text['num_attention_heads']}")
    if state_dict["mlp.layers.0.weight"].shape[1] != hidden:
        raise ValueError(f"mlp.layers.0.weight takes {state_dict['mlp.layers.0.weight'].shape[1]} features but the "
                         f"text encoder is {hidden} wide")
    return imagereward_config(vision, text, mean=mean, std=std)


def _read_med_config(med_config: dict | str | None, near: str | None) -> dict | None:
    if isinstance(med_config, dict):
        return med_config
    file = med_config
    if file is None and near is not None:
        candidate = os.path.join(os.path.dirname(os.path.abspath(near)), MED_CONFIG_FILE)
        file = candidate if os.path.isfile(candidate) else None
    if file is None:
        return None
    if not os.path.isfile(file):
        raise FileNotFoundError(f"imagereward: med_config file {file!r} does not exist")
    with open(file) as f:
        return json.load(f)


def load_imagereward_checkpoint(file_or_state_dict: str | dict[str, torch.Tensor], med_config: dict | str | None = None,
                                *, vision_heads: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                                reward: str = "imagereward"):
    """An ImageRewardModel (eval, frozen) with the weights of an original ImageReward checkpoint (file or state
    dict). `med_config`: med_config.json's content or path; default the med_config.json next to the file, else
    BLIP's."""
    cls = imagereward_model_class()
    if isinstance(file_or_state_dict, str | os.PathLike):
        file = os.fspath(file_or_state_dict)
        sd = load_state_dict_file(file, reward)
    else:
        file, sd = None, dict(file_or_state_dict)
    config = imagereward_config_from_state_dict(sd, _read_med_config(med_config, file), vision_heads=vision_heads)
    converted = convert_imagereward_state_dict(sd)
    model, info = cls.from_pretrained(None, config=config, state_dict=converted, dtype=dtype, output_loading_info=True)
    missing = [k for k in (info.get("missing_keys") or []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{reward}: the ImageReward checkpoint lacks {len(missing)} weights: {missing[:5]}")
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def convert_imagereward_checkpoint(file: str, out_dir: str, med_config: dict | str | None = None, *,
                                   vision_heads: int | None = None, tokenizer: str | None = None) -> str:
    """Converts an original ImageReward.pt once and saves it with save_pretrained into `out_dir` (plus the tokenizer
    `tokenizer`, a directory or hub id, with BLIP's added tokens), so later loads are from_pretrained calls
    (`load_reward("imagereward", out_dir)`). Returns out_dir."""
    load_imagereward_checkpoint(file, med_config, vision_heads=vision_heads).save_pretrained(out_dir)
    if tokenizer is not None:
        load_blip_tokenizer(tokenizer).save_pretrained(out_dir)
    return out_dir


def load_blip_tokenizer(path: str, reward: str = "imagereward", fallback: str | None = None):
    """BLIP's tokenizer: a BERT tokenizer from `path` (else `fallback`) with [DEC] as bos token and [ENC] as an
    additional special token when they are missing (BLIP's init_tokenizer; ids 30522 and 30523 for bert-base)."""
    from .loading import load_tokenizer

    tok = load_tokenizer(path, reward, fallback=fallback)
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# -- the reward ---------------------------------------------------------------------------------------------------


class ImageRewardScore(ImageReward):
    """ImageReward scores (about -2..2, normalized by the published mean/std); differentiable w.r.t. the pixels.

    Args:
        model: an ImageRewardModel (eval, frozen).
        tokenizer: BLIP's BERT tokenizer; prompts are cut at `max_length` tokens and padded to it (as the original).
        preprocess: the torch preprocessing (bicubic resize to 224, center crop, CLIP mean/std).
        max_length: 35, as ImageReward.
        **kw: ImageReward's options (value_range, max_batch_size, memory_budget_mb, autocast_dtype, ...).
    """

    differentiable = True
    needs_prompts = True

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, *, max_length: int = MAX_LENGTH, **kw) -> None:
        super().__init__(**kw)
        self.model, self.tokenizer, self.preprocess, self.max_length = model, tokenizer, preprocess, max_length
        self.device = next(model.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """b strings -> (input_ids, attention_mask), each [b, max_length], on the model's device."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    compile_target = "score_tokens"  # tokenizing stays outside the compiled part

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return self.score_tokens(pixels, ids, mask)

    def score_tokens(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] and the prompts' tokens ([b, max_length]) -> [b] scores."""
        pixel_values = self.preprocess(pixels).to(self.model.dtype)
        return self.model(pixel_values, ids, mask)

    def activation_bytes_per_image(self, grad: bool, height: int, width: int) -> int:
        elem = 2 if self.autocast_dtype is not None else self.model.dtype.itemsize
        vision = vit_activation_bytes(self.model.config.vision_config, self.preprocess.crop, elem, grad, height * width)
        return int(vision * 1.25)  # + the text tower (35 tokens cross-attending to the image tokens)


def find_imagereward_checkpoint(path: str | None) -> str:
    """The original checkpoint file: `path` itself, or ImageReward.pt inside the directory `path`; None downloads
    it from the hub repo THUDM/ImageReward (with med_config.json next to it), as the ImageReward package does."""
    if path is None:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(IMAGEREWARD_REPO, IMAGEREWARD_FILE)
        hf_hub_download(IMAGEREWARD_REPO, MED_CONFIG_FILE)
        return file
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, IMAGEREWARD_FILE)
        if os.path.isfile(file):
            return file
        raise FileNotFoundError(f"imagereward: {path!r} has neither config.json (a converted ImageRewardModel) nor "
                                f"{IMAGEREWARD_FILE} (found: {sorted(os.listdir(path))[:10]})")
    raise FileNotFoundError(f"imagereward: {path!r} does not exist; expected {IMAGEREWARD_FILE} (the original "
                            "checkpoint), a directory holding it, or a directory saved by "
                            "convert_imagereward_checkpoint")


@register_reward("imagereward")
def imagereward(path: str | None = None, *, tokenizer: str | None = None, med_config: dict | str | None = None,
                vision_heads: int | None = None, device=None, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", channels_last: bool = True, **kw) -> ImageRewardScore:
    """ImageReward score (differentiable).

    path: the original checkpoint file (ImageReward.pt), a directory holding it (and optionally med_config.json and
        tokenizer files), or a directory saved by `convert_imagereward_checkpoint` / save_pretrained (loaded with
        from_pretrained, no conversion); None downloads ImageReward.pt from THUDM/ImageReward.
    tokenizer: a directory or hub id (default: path when it holds tokenizer files, else bert-base-uncased), given
        BLIP's [DEC] / [ENC] tokens.
    med_config: the text config of an original checkpoint (dict or file; default med_config.json next to it).
    attn_implementation: vision attention, "sdpa" (default), "fusedrl" or "eager".
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}; got {attn_implementation!r}")
    device = resolve_device(device)
    if path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        model = from_pretrained(imagereward_model_class(), path, "imagereward", "ImageReward model", dtype=dtype,
                                device=device)
        tok_dir = path
    else:
        if path is not None and not looks_local(path) and not os.path.exists(path):
            raise FileNotFoundError(f"imagereward: {path!r} is not a local file or directory (ImageReward is not a "
                                    "from_pretrained hub model; pass ImageReward.pt, or path=None to download it)")
        file = find_imagereward_checkpoint(path)
        model = load_imagereward_checkpoint(file, med_config, vision_heads=vision_heads, dtype=dtype, device=device)
        tok_dir = os.path.dirname(os.path.abspath(file))
    set_vision_attention(model, attn_implementation)
    if tokenizer is None:
        has_tok = any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(tok_dir))
        tokenizer = tok_dir if has_tok else IMAGEREWARD_TOKENIZER
    tok = load_blip_tokenizer(tokenizer)
    size = model.config.vision_config.image_size
    # ImageReward's torchvision Resize + CenterCrop: the crop offset rounds where transformers' floors
    pre = ClipPreprocess(size=size, crop=size, channels_last=channels_last, crop_offset="round")
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return ImageRewardScore(model, tok, pre, **kw)
