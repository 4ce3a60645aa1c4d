"""The embedded default model and the tiny test models: diffusers pipelines built from small configs.

Nothing is downloaded: weights are random (seeded), tokenizers are built from a character-level vocab
written here. Each pipeline is saved with the real `save_pretrained` to a folder, so that the policy
loads it with the same `from_pretrained` code as a real checkpoint.

    path = tiny_model_dir("sd3")        # built once into the cache folder, then reused
    policy = load_policy(path)

Families (all at 32x32 px by default, a VAE with 4 latent channels and a 4x downsampling, so the
latents are 4 x 8 x 8):
- "sd3": SD3Transformer2DModel (2 layers, width 16, patch 2: 16 image tokens), two tiny CLIP text
  encoders with projection, no T5 (the pipeline feeds zeros of `max_sequence_length` tokens),
  FlowMatchEulerDiscreteScheduler(shift=3). The embedded default of `fusedrl train`.
- "sd": UNet2DConditionModel (2 blocks, 16/32 channels), one tiny CLIP, DDIMScheduler with SD1.5's
  betas: the SD1.5 family (DDPO).
- "flux": FluxTransformer2DModel (1 double + 1 single block, guidance embedding), tiny CLIP (pooled)
  and tiny T5 (sequence), FlowMatchEulerDiscreteScheduler with dynamic shifting.

A `fusedrl_policy.json` next to `model_index.json` gives the policy's defaults for this model
(height, width, max_sequence_length, guidance_scale); `load_policy` reads it when present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["FAMILIES", "POLICY_DEFAULTS_FILE", "build_tiny_pipeline", "save_tiny", "tiny_model_dir"]

FAMILIES = ("sd3", "sd", "flux")
POLICY_DEFAULTS_FILE = "fusedrl_policy.json"
_VERSION = 1  # bump when the configs change, so cached folders are rebuilt

# Text encoders are character level: a byte-level vocab with no merges (CLIP) or one piece per
# character (T5). Prompts longer than the context are truncated, as with real tokenizers.
_CLIP_CONTEXT = 16
_T5_CONTEXT = 8
_TEXT_WIDTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_CONTEXT)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_CONTEXT)


def _clip_config(vocab_size: int, projection_dim: int = _TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=_TEXT_WIDTH, intermediate_size=2 * _TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=_CLIP_CONTEXT, projection_dim=projection_dim,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def _vae(scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def build_tiny_pipeline(family: str = "sd3", *, seed: int = 0):
    """Build a tiny diffusers pipeline of `family` ("sd3", "sd" or "flux") with seeded random weights.

    Returns the pipeline object (StableDiffusion3Pipeline, StableDiffusionPipeline or FluxPipeline), in fp32
    on the CPU; `save_tiny` saves one, `tiny_model_dir` builds and caches one.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=2 * _TEXT_WIDTH, caption_projection_dim=16,
            pooled_projection_dim=2 * _TEXT_WIDTH, pos_embed_max_size=16,
        )
        te1 = CLIPTextModelWithProjection(_clip_config(len(tok)))
        te2 = CLIPTextModelWithProjection(_clip_config(len(tok)))
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(1.5305, 0.0609), text_encoder=te1, tokenizer=tok, text_encoder_2=te2,
            tokenizer_2=_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None,
        )
    if family == "sd":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8,
        )
        scheduler = diffusers.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        )
        return diffusers.StableDiffusionPipeline(
            vae=_vae(0.18215, None), text_encoder=CLIPTextModel(_clip_config(len(tok))), tokenizer=tok, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    t5_tok = _t5_tokenizer()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=_TEXT_WIDTH, pooled_projection_dim=_TEXT_WIDTH, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=_TEXT_WIDTH, d_kv=8, d_ff=2 * _TEXT_WIDTH,
                                 num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(0.3611, 0.1159),
        text_encoder=CLIPTextModel(_clip_config(len(tok))), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
    )


def _policy_defaults(family: str) -> dict:
    return {
        "height": 32, "width": 32, "max_sequence_length": _T5_CONTEXT if family == "flux" else 4,
        "guidance_scale": 3.5 if family == "flux" else 1.0, "tiny": True,
    }


def save_tiny(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the tiny `family` pipeline and save it to `path` (created; replaced if it exists) with
    `save_pretrained`, plus its `fusedrl_policy.json`. The folder is written next to `path` and renamed
    into place, so a reader never sees a half-written model. Returns `path`."""
    from ..runs.atomic import atomic_write_dir

    pipe = build_tiny_pipeline(family, seed=seed)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        (tmp / POLICY_DEFAULTS_FILE).write_text(json.dumps(_policy_defaults(family), indent=2) + "\n")

    return atomic_write_dir(path, write)


def _cache_root() -> Path:
    root = os.environ.get("FUSEDRL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusedrl"


def tiny_model_dir(family: str = "sd3", root: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """The folder of the tiny `family` model, built on first use under `root` (default:
    `$FUSEDRL_CACHE` or `~/.cache/fusedrl`, subfolder `tiny/<family>-v<N>-s<seed>`) and reused after."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    base = Path(root) if root is not None else _cache_root() / "tiny"
    path = base / f"{family}-v{_VERSION}-s{seed}"
    if not (path / "model_index.json").is_file() or not (path / POLICY_DEFAULTS_FILE).is_file():
        save_tiny(family, path, seed=seed)
    return path
