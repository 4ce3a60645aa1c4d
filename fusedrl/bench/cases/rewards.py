"""Cases of the image rewards (`fusedrl.engine.rewards`): images per second of batched scoring vs a one-image loop
through the same reward, with random weights at the published architectures' sizes.

Rewards (op "reward_<name>"; sizes from the published configs):
- reward_aesthetic:   CLIP ViT-L/14 vision tower + projection (openai/clip-vit-large-patch14) + the LAION MLP head.
- reward_clip_score:  CLIP ViT-L/14, both towers (cosine of the projected embeddings).
- reward_pickscore:   CLIP ViT-H/14, both towers (laion/CLIP-ViT-H-14: vision 1280 x 32 layers, patch 14; text
                      1024 x 24), logit_scale x cosine. HPSv2 is the same architecture and computation (cosine).
- reward_imagereward: BLIP ViT-L (1024 x 24 layers, patch 16) + BERT-base text encoder with cross-attention + MLP.
"default" sizes: those models at 224 px (images given at 224 px, so preprocessing only normalizes), batches 1, 8, 64,
256; "small" sizes (a CPU, seconds): 2-layer 32-wide towers at 32 px, batches 1 and 4. One prompt per GRPO group of
8 images (CLIP rewards encode each distinct prompt once; ImageReward's text tower cross-attends to each image).

Mode "fwd": scoring without gradient (`reward(images, prompts)` under inference mode, as in a rollout).
Providers:
- "eager": the one-image loop through the same reward object, `[reward(x[i:i+1], p[i:i+1]) for i in range(B)]`, as
  the reference packages score (ImageReward's `inference_rank`, Flow-GRPO's scorers); skipped above batch 64 on a
  GPU (its images/s does not depend on B, and B = 256 loops make the run minutes long).
- "torch": fusedrl's batched call, `reward(x, p)` with max_batch_size = B (one micro-batch), SDPA attention.
- "compile": the same batched call with the reward's `compile=True` (its scoring through `torch.compile`, static
  shapes; the first call, which compiles, is a warm-up call of the runner).
Both run the same reward object with its value-range check off (`check_range=False`: no host sync per call).
The runner's speedup_vs_eager is then batched over loop (issue 5's target: >= 20x at batch 64 on an H100/H200).
dtypes: fp32 = fp32 weights; bf16 = the model loaded in bf16 (dtype=torch.bfloat16, preprocessing still in fp32).

Counted work: FLOPs of the ViT image tower's matmuls only (per image: per layer 2 N D (3D) + 2 N D D + 4 N D I +
4 N^2 D, plus the patch embedding 2 (N - 1) 3 p^2 D; N tokens, D width, I MLP width), so the % of the matmul ceiling
is a slight under-estimate (text towers, heads and preprocessing are not counted). Bytes: the weights read once plus
the fp32 input images. images/s = B / median: the runner's CSV has B (the shape's first number) and the median;
`python -m fusedrl.bench.cases.rewards results.csv` prints the images/s of these rows (`images_per_second`).
"""

from __future__ import annotations

import copy
import functools
import os
import string
import tempfile
from dataclasses import dataclass

import torch

from ..providers import COMPILE, EAGER, Impl, Skip
from . import Case, CaseConfig

PROVIDERS = (EAGER, "torch", COMPILE)
GROUP = 8
LOOP_MAX_BATCH = {"cuda": 64, "cpu": 1 << 30}
PROMPT = "a photo of a red fox in the snow, golden hour"


@dataclass(frozen=True)
class Tower:
    hidden: int
    inter: int
    layers: int
    heads: int
    patch: int
    image: int


@dataclass(frozen=True)
class Spec:
    reward: str
    vision: Tower
    text: Tower | None  # (hidden, inter, layers, heads; patch/image unused) or None: no text tower
    projection: int
    tiny: bool = False  # the "small" stand-ins: vocabularies of the in-memory tokenizers, 40 text positions


VIT_L14 = Tower(1024, 4096, 24, 16, 14, 224)
VIT_H14 = Tower(1280, 5120, 32, 16, 14, 224)
BLIP_VIT_L = Tower(1024, 4096, 24, 16, 16, 224)
TINY_VIT = Tower(32, 64, 2, 2, 8, 32)
TINY_TEXT = Tower(32, 64, 2, 2, 0, 0)

SPECS = {
    "default": [
        Spec("aesthetic", VIT_L14, None, 768),
        Spec("clip_score", VIT_L14, Tower(768, 3072, 12, 12, 0, 0), 768),
        Spec("pickscore", VIT_H14, Tower(1024, 4096, 24, 16, 0, 0), 1024),
        Spec("imagereward", BLIP_VIT_L, Tower(768, 3072, 12, 12, 0, 0), 0),
    ],
    "small": [
        Spec("aesthetic", TINY_VIT, None, 16, tiny=True),
        Spec("clip_score", TINY_VIT, TINY_TEXT, 16, tiny=True),
        Spec("pickscore", TINY_VIT, TINY_TEXT, 16, tiny=True),
        Spec("imagereward", TINY_VIT, TINY_TEXT, 0, tiny=True),
    ],
}
BATCHES = {"default": (1, 8, 64, 256), "small": (1, 4)}


def vit_flops(t: Tower) -> int:
    """Matmul FLOPs of one image through a ViT (module docstring)."""
    n = (t.image // t.patch) ** 2 + 1
    per_layer = 2 * n * t.hidden * 3 * t.hidden + 2 * n * t.hidden * t.hidden + 4 * n * t.hidden * t.inter \
        + 4 * n * n * t.hidden
    return t.layers * per_layer + 2 * (n - 1) * 3 * t.patch * t.patch * t.hidden


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """A character-level CLIPTokenizer (no merges), built in memory: no download."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + " .,!?")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


@functools.lru_cache(maxsize=1)
def _bert_tokenizer():
    """A word-level BERT tokenizer over the prompt's words, from a temporary vocab file: no download."""
    from fusedrl.engine.rewards.imagereward import load_blip_tokenizer

    folder = tempfile.mkdtemp(prefix="fusedrl-bench-bert-")
    words = sorted(set(PROMPT.replace(",", " , ").split()))
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    return load_blip_tokenizer(folder, "bench")


def _clip_config(spec: Spec):
    from transformers import CLIPConfig

    v, t = spec.vision, spec.text or TINY_TEXT
    vision = dict(hidden_size=v.hidden, intermediate_size=v.inter, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, patch_size=v.patch, image_size=v.image, projection_dim=spec.projection,
                  hidden_act="gelu")
    vocab = len(_clip_tokenizer()) if spec.tiny else 49408
    text = dict(hidden_size=t.hidden, intermediate_size=t.inter, num_hidden_layers=t.layers,
                num_attention_heads=t.heads, max_position_embeddings=77, vocab_size=vocab,
                projection_dim=spec.projection, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection)


def build_reward(spec: Spec, dtype: torch.dtype, device: torch.device):
    """The reward `spec` with random weights, built directly on `device` in `dtype`."""
    from fusedrl.engine.rewards import AestheticMLP, AestheticReward, ClipPreprocess, ClipReward, ImageRewardScore

    pre = ClipPreprocess(size=spec.vision.image, crop=spec.vision.image, channels_last=True)
    common = dict(max_batch_size=1 << 20, check_range=False)
    with torch.device(device):
        if spec.reward == "imagereward":
            from fusedrl.engine.rewards.imagereward import (
                imagereward_config,
                imagereward_model_class,
                set_vision_attention,
            )

            v, t = spec.vision, spec.text
            vocab, positions = (len(_bert_tokenizer()), 40) if spec.tiny else (30524, 512)
            config = imagereward_config(
                dict(hidden_size=v.hidden, intermediate_size=v.inter, num_hidden_layers=v.layers,
                     num_attention_heads=v.heads, patch_size=v.patch, image_size=v.image),
                dict(hidden_size=t.hidden, intermediate_size=t.inter, num_hidden_layers=t.layers,
                     num_attention_heads=t.heads, vocab_size=vocab, max_position_embeddings=positions))
            model = imagereward_model_class()._from_config(config, dtype=dtype).eval().requires_grad_(False)
            set_vision_attention(model, "sdpa")
            reward = ImageRewardScore(model, _bert_tokenizer(), pre, **common)
        elif spec.reward == "aesthetic":
            from transformers import CLIPVisionModelWithProjection

            vision = CLIPVisionModelWithProjection._from_config(_clip_config(spec).vision_config,
                                                                attn_implementation="sdpa", dtype=dtype)
            head = AestheticMLP(spec.projection).eval().requires_grad_(False)
            reward = AestheticReward(vision.eval().requires_grad_(False), head, pre, **common)
            model = vision
        else:
            from transformers import CLIPModel

            model = CLIPModel._from_config(_clip_config(spec), attn_implementation="sdpa", dtype=dtype)
            model = model.eval().requires_grad_(False)
            mode = "logit_scale" if spec.reward == "pickscore" else "cosine"
            reward = ClipReward(model, _clip_tokenizer(), pre, mode=mode, **common)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return reward, sum(p.numel() * p.element_size() for p in model.parameters())


def _setup(spec: Spec, batch: int, dtype: torch.dtype, device: torch.device):
    reward, _ = build_reward(spec, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, spec.vision.image, spec.vision.image, device=device, generator=g)
    prompts = [f"{PROMPT} {i // GROUP}" for i in range(batch)]

    def impl(provider: str) -> Impl:
        if provider == EAGER:
            if batch > LOOP_MAX_BATCH[device.type]:
                raise Skip(f"the one-image loop is not timed above batch {LOOP_MAX_BATCH[device.type]} (its images/s "
                           "does not depend on the batch)")

            def call():
                return [reward(images[i:i + 1], prompts[i:i + 1]) for i in range(batch)]
        elif provider in ("torch", COMPILE):
            scorer = reward
            if provider == COMPILE:  # a shallow copy: the same model, its own compiled scorer
                torch._dynamo.reset()  # each case its own compile (dynamo's recompile limit would run eager)
                scorer = copy.copy(reward)
                scorer.compile, scorer._compiled = True, None

            def call():
                return scorer(images, prompts)
        else:
            raise ValueError(f"unknown provider {provider!r}")
        return Impl(call, inputs=(images,), error_is_skip=provider == COMPILE)

    return impl


def cases(config: CaseConfig) -> list[Case]:
    found = []
    for spec in SPECS[config.sizes]:
        for batch in BATCHES[config.sizes]:
            for dtype in config.dtypes:
                shape = (batch, 3, spec.vision.image, spec.vision.image)
                weights = _weight_bytes(spec, dtype)
                found.append(Case(
                    op=f"reward_{spec.reward}", mode="fwd", shape=shape, dtype=dtype,
                    bytes=weights + batch * 3 * spec.vision.image ** 2 * 4, flops=batch * vit_flops(spec.vision),
                    providers=PROVIDERS, setup=functools.partial(_setup, spec, batch, dtype, config.device)))
    return found


def _weight_bytes(spec: Spec, dtype: torch.dtype) -> int:
    """Approximate parameter bytes of the towers (12 D^2-ish per layer from the shapes), without building them."""
    def tower(t: Tower | None) -> int:
        return 0 if t is None else t.layers * (4 * t.hidden * t.hidden + 2 * t.hidden * t.inter)

    return (tower(spec.vision) + tower(spec.text)) * dtype.itemsize


def images_per_second(csv_path: str) -> list[dict[str, str | float]]:
    """The reward rows of a `fusedrl bench` CSV with their images/s (batch / median seconds), in file order."""
    import csv

    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["op"].startswith("reward_") and row["median_ms"]:
                batch = int(row["shape"].split("x")[0])
                rows.append({"device": row["device"], "op": row["op"], "provider": row["provider"],
                             "batch": batch, "dtype": row["dtype"], "median_ms": float(row["median_ms"]),
                             "images_per_s": batch / (float(row["median_ms"]) * 1e-3),
                             "fraction_of_ceiling": float(row["fraction_of_ceiling"] or "nan")})
    return rows


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m fusedrl.bench.cases.rewards RESULTS.csv")
    print(f"{'op':<20} {'provider':<8} {'batch':>5} {'dtype':<5} {'images/s':>10} {'% ceiling':>9}")
    for r in images_per_second(sys.argv[1]):
        print(f"{r['op']:<20} {r['provider']:<8} {r['batch']:>5} {r['dtype']:<5} {r['images_per_s']:>10.1f} "
              f"{100 * r['fraction_of_ceiling']:>8.1f}%")
