"""fusedrl.engine.rewards: image rewards (aesthetic, clip_score, pickscore, jpeg) built from tiny random CLIP
models saved with save_pretrained and loaded through load_reward; text rewards on handmade cases; input errors.

What is checked: each learned reward equals its published formula computed with transformers' own CLIPModel
API; batched == one-by-one; gradients reach the pixels (and not for JPEG); bf16 autocast ~ fp32; the value
range contract; clear errors for bad images, prompts and missing or wrong weights."""

from __future__ import annotations

import io
import re
import string

import numpy as np
import pytest
import torch

from fusedrl.engine.rewards import (
    AestheticMLP,
    ClipPreprocess,
    available_rewards,
    extract_final_answer,
    final_number,
    load_reward,
)

IMAGE = 32  # tiny CLIP's image size (patch 8: 16 patches + class token)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


# -- tiny models --------------------------------------------------------------------------------------------


def tiny_clip_tokenizer():
    """A CLIPTokenizer over single characters (no merges): ids 0..81 characters, 82 <|startoftext|>,
    83 <|endoftext|> (the largest id, as in CLIP's real vocabulary)."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + " .,!?")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(vocab_size: int, projection_dim: int = 16, max_positions: int = 24):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_positions, eos_token_id=vocab_size - 1,
                bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1, projection_dim=projection_dim)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE, patch_size=8, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, logit_scale_init_value=3.0)


def randomize(model, std: float = 0.2, seed: int = 0):
    """Larger-than-init random weights, so that different images/prompts give clearly different scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + tokenizer + preprocessor_config.json, saved with save_pretrained."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    tok = tiny_clip_tokenizer()
    model = randomize(CLIPModel(tiny_clip_config(len(tok))).eval())
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        path)
    return str(path)


@pytest.fixture(scope="module")
def aesthetic_dir(clip_dir, tmp_path_factory):
    """The tiny CLIP plus an aesthetic head file under the LAION file name, with the original key layout."""
    import shutil

    path = tmp_path_factory.mktemp("aesthetic")
    shutil.copytree(clip_dir, path, dirs_exist_ok=True)
    torch.manual_seed(1)
    head = AestheticMLP(16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    torch.save(head.state_dict(), path / "sac+logos+ava1-l14-linearMSE.pth")
    return str(path)


def clip_model(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)


def features(out):
    """get_*_features returns a tensor or (newer transformers) an output whose pooler_output is the embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def images(b: int = 5, h: int = IMAGE, w: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a cat", "a red dog on the grass", "a cat", "photo of a very long prompt that will be cut off early", "x"]


def load(name, clip_dir, aesthetic_dir, **kw):
    if name == "aesthetic":
        return load_reward("aesthetic", aesthetic_dir, device="cpu", **kw)
    if name.startswith("jpeg"):
        return load_reward(name, **kw)
    return load_reward(name, clip_dir, device="cpu", **kw)


IMAGE_REWARDS = ["aesthetic", "clip_score", "pickscore", "jpeg_compressibility"]
LEARNED = ["aesthetic", "clip_score", "pickscore"]


# -- registry -----------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    names = available_rewards()
    for n in ["aesthetic", "clip_score", "pickscore", "hpsv2", "jpeg_compressibility", "jpeg_incompressibility",
              "numeric_answer", "exact_match", "regex_format", "sequence_classification"]:
        assert n in names
    with pytest.raises(ValueError, match=r"unknown reward 'pick_score'; known rewards: aesthetic, (.*, )?clip_score"):
        load_reward("pick_score")
    assert load_reward("JPEG-Compressibility").name == "jpeg_compressibility"
    with pytest.raises(ValueError, match="has no weights"):
        load_reward("jpeg_compressibility", "/some/path")


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, fusedrl.engine.rewards as r; r.available_rewards(); "
            "print(sorted(m for m in ('transformers', 'PIL', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# -- JPEG ---------------------------------------------------------------------------------------------------


def ddpo_jpeg_kb(x: torch.Tensor) -> list[float]:
    """DDPO's jpeg_incompressibility, verbatim in substance."""
    from PIL import Image

    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for a in arr:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return sizes


def test_jpeg_matches_ddpo_and_has_no_gradient():
    x = images(4, 48, 40)
    x[0] = 0.5  # flat: compresses well
    inc = load_reward("jpeg_incompressibility")
    comp = load_reward("jpeg_compressibility", num_threads=2)
    assert not inc.differentiable and not comp.differentiable
    ref = torch.tensor(ddpo_jpeg_kb(x))
    torch.testing.assert_close(inc(x), ref)
    torch.testing.assert_close(comp(x), -ref)
    assert comp(x)[0] > comp(x)[1]  # the flat image is the most compressible
    # [-1, 1] images declared as such give the same numbers
    torch.testing.assert_close(inc(x * 2 - 1, value_range=(-1, 1)), ref)
    xg = x.clone().requires_grad_(True)
    out = comp(xg)
    assert not out.requires_grad and out.dtype == torch.float32


# -- learned image rewards: the published formulas ----------------------------------------------------------


@pytest.mark.parametrize("name,mode", [("clip_score", "cosine"), ("clip_score", "x100"),
                                       ("clip_score", "clipscore"), ("clip_score", "logit_scale"),
                                       ("pickscore", None)])
def test_clip_rewards_match_reference_formula(clip_dir, name, mode):
    model, tok = clip_model(clip_dir)
    x = images()
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=(x - MEAN) / STD))
        t = tok(PROMPTS, padding=True, truncation=True, max_length=24, return_tensors="pt")
        txt = features(model.get_text_features(**t))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    expected = {"cosine": cos, "x100": 100 * cos.clamp(min=0), "clipscore": 2.5 * cos.clamp(min=0),
                "logit_scale": model.logit_scale.exp() * cos, None: model.logit_scale.exp() * cos}[mode]
    reward = load_reward(name, clip_dir, device="cpu", **({"mode": mode} if mode else {}))
    assert reward.differentiable
    got = reward(x, PROMPTS)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cos.std() > 1e-3  # the tiny model tells images/prompts apart (otherwise the test is vacuous)


def test_aesthetic_matches_ddpo_formula(aesthetic_dir):
    model, _ = clip_model(aesthetic_dir)
    head = AestheticMLP(16).eval()
    head.load_state_dict(torch.load(f"{aesthetic_dir}/sac+logos+ava1-l14-linearMSE.pth"))
    x = images()
    with torch.no_grad():
        embed = features(model.get_image_features(pixel_values=(x - MEAN) / STD))
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        expected = head(embed).squeeze(1)
    reward = load_reward("aesthetic", aesthetic_dir, device="cpu")
    torch.testing.assert_close(reward(x), expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 1e-3


def test_preprocess_matches_clip_image_processor():
    """Torch resize (antialiased bicubic) + crop + normalize ~ CLIPImageProcessorPil on the same uint8 image."""
    from transformers import CLIPImageProcessorPil

    pre = ClipPreprocess(size=IMAGE, crop=IMAGE)
    proc = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})

    def pil(x):
        arrays = [(a.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for a in x]
        return torch.as_tensor(np.stack(proc(arrays, return_tensors="np")["pixel_values"]))

    smooth = torch.nn.functional.interpolate(images(2, 6, 8), size=(45, 61), mode="bilinear")
    smooth = (smooth * 255).round() / 255
    ref = pil(smooth)
    got = pre(smooth)
    assert got.shape == ref.shape == (2, 3, IMAGE, IMAGE)
    # PIL rounds its resized image to uint8: 1/255 / std ~ 0.015 in normalized units
    assert (got - ref).abs().max() < 0.03
    # pixel noise: PIL's fixed-point filter and clipping of the overshoot differ by up to ~0.13 on single
    # pixels, ~0.005 on average
    noise = (images(2, 45, 61) * 255).round() / 255
    assert (pre(noise) - pil(noise)).abs().mean() < 0.01
    # an image already at size is only normalized
    y = images(1)
    torch.testing.assert_close(pre(y), (y - MEAN) / STD)


def test_preprocess_letterbox_and_crop_offsets():
    """fit="pad" is HPSv2's ResizeMaxSize (longer side -> size, black padding split in half, the odd pixel after);
    crop_offset="round" is torchvision's CenterCrop (Python's round of half the excess), "floor" transformers'."""
    pre = ClipPreprocess(size=8, crop=8, fit="pad")
    x = torch.ones(1, 3, 12, 6)  # -> 8 x 4, padded by 2 columns on each side
    got = pre(x)
    black, white = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert got.shape == (1, 3, 8, 8)
    torch.testing.assert_close(got[..., :, 2:6], white.expand(1, 3, 8, 4))
    torch.testing.assert_close(got[..., :, :2], black.expand(1, 3, 8, 2))
    torch.testing.assert_close(got[..., :, 6:], black.expand(1, 3, 8, 2))
    odd = ClipPreprocess(size=8, crop=8, fit="pad")(torch.ones(1, 3, 8, 5))  # no resize; 3 columns: 1 left, 2 right
    assert torch.equal(odd[0, 0, 0] == white[0, 0, 0, 0], torch.tensor([False, True, True, True, True, True, False,
                                                                         False]))
    ramp = torch.arange(11.0).view(1, 1, 1, 11).expand(1, 3, 8, 11) / 10  # already 8 on its shorter side
    floor = ClipPreprocess(size=8, crop=8)(ramp)
    rounded = ClipPreprocess(size=8, crop=8, crop_offset="round")(ramp)
    torch.testing.assert_close(floor, (ramp[..., 1:9] - MEAN) / STD)  # (11 - 8) // 2 = 1
    torch.testing.assert_close(rounded, (ramp[..., 2:10] - MEAN) / STD)  # round(1.5) = 2
    with pytest.raises(ValueError, match="fit must be"):
        ClipPreprocess(size=8, crop=6, fit="pad")


def test_preprocessor_config_is_read(clip_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(clip_dir, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg["image_mean"], cfg["image_std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    reward = load_reward("clip_score", str(tmp_path), device="cpu")
    assert reward.preprocess.mean == (0.5, 0.5, 0.5) and reward.preprocess.size == IMAGE


# -- batching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_batched_equals_one_by_one(clip_dir, aesthetic_dir, name):
    x = images(5, 40, 52)  # resized and cropped
    full = load(name, clip_dir, aesthetic_dir)(x, PROMPTS)
    chunked = load(name, clip_dir, aesthetic_dir, max_batch_size=2)(x, PROMPTS)
    reward = load(name, clip_dir, aesthetic_dir)
    single = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, full, atol=1e-5, rtol=1e-5)


def test_memory_budget_sets_micro_batch(clip_dir):
    reward = load_reward("clip_score", clip_dir, device="cpu", memory_budget_mb=1e-6)
    assert reward.micro_batch_size(False, IMAGE, IMAGE) == 1
    big = load_reward("clip_score", clip_dir, device="cpu", memory_budget_mb=1e6, max_batch_size=7)
    assert big.micro_batch_size(True, IMAGE, IMAGE) == 7
    assert reward.activation_bytes_per_image(True, IMAGE, IMAGE) > reward.activation_bytes_per_image(False, IMAGE,
                                                                                                     IMAGE)
    x = images()
    torch.testing.assert_close(reward(x, PROMPTS), big(x, PROMPTS), atol=1e-5, rtol=1e-5)


# -- gradients, inference mode, autocast --------------------------------------------------------------------


@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_pixels(clip_dir, aesthetic_dir, name):
    reward = load(name, clip_dir, aesthetic_dir, max_batch_size=2)
    latent = (torch.rand(3, 3, 40, 40) * 2 - 1).requires_grad_(True)  # as a VAE decoder's [-1, 1] output
    scores = reward(latent * 0.9, PROMPTS[:3], value_range=(-1, 1))
    assert scores.requires_grad
    (grad,) = torch.autograd.grad(scores.sum(), latent)
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    # each image's gradient comes from its own score only
    (g0,) = torch.autograd.grad(reward(latent * 0.9, PROMPTS[:3], value_range=(-1, 1))[0], latent)
    assert g0[0].abs().sum() > 0 and g0[1:].abs().sum() == 0
    # the reward's own weights stay frozen
    module = reward.vision if name == "aesthetic" else reward.model
    assert not any(p.requires_grad for p in module.parameters())


def test_no_gradient_path_returns_a_normal_tensor(clip_dir):
    reward = load_reward("clip_score", clip_dir, device="cpu")
    scores = reward(images(2), PROMPTS[:2])
    assert not scores.requires_grad and not scores.is_inference()
    logp = torch.randn(2, requires_grad=True)
    (scores * logp).sum().backward()  # usable as an advantage in the policy loss
    with torch.no_grad():
        assert not reward(images(2).requires_grad_(True), PROMPTS[:2]).requires_grad


@pytest.mark.parametrize("name", LEARNED)
def test_bf16_autocast_close_to_fp32(clip_dir, aesthetic_dir, name):
    x = images()
    fp32 = load(name, clip_dir, aesthetic_dir)(x, PROMPTS)
    bf16 = load(name, clip_dir, aesthetic_dir, autocast_dtype=torch.bfloat16)(x, PROMPTS)
    assert bf16.dtype == torch.float32
    # a config file or reward.options spells the dtype as a string
    assert torch.equal(load(name, clip_dir, aesthetic_dir, autocast_dtype="bf16")(x, PROMPTS), bf16)
    scale = fp32.abs().max().clamp(min=1e-3)
    assert ((bf16 - fp32).abs() / scale).max() < 0.05, (bf16, fp32)
    bf16_weights = load(name, clip_dir, aesthetic_dir, dtype=torch.bfloat16)(x, PROMPTS)
    assert ((bf16_weights - fp32).abs() / scale).max() < 0.1, (bf16_weights, fp32)


# -- value range --------------------------------------------------------------------------------------------


def test_value_range_declared_and_checked(clip_dir):
    reward = load_reward("clip_score", clip_dir, device="cpu")
    x = images()
    ref = reward(x, PROMPTS)
    torch.testing.assert_close(reward(x * 2 - 1, PROMPTS, value_range=(-1, 1)), ref)
    torch.testing.assert_close(reward(x * 255, PROMPTS, value_range=(0, 255)), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward(x * 2 - 1, PROMPTS, value_range="auto"), ref)
    neg = load_reward("clip_score", clip_dir, device="cpu", value_range=(-1, 1))
    torch.testing.assert_close(neg(x * 2 - 1, PROMPTS), ref)
    # VAE overshoot is clamped, not an error
    over = x * 2 - 1
    over[0, 0, 0, 0] = -1.2
    neg(over, PROMPTS)
    with pytest.raises(ValueError, match=r"values in \[-0.99.*value_range is \(0, 1\)"):
        reward(x * 2 - 1, PROMPTS)  # [-1, 1] images declared (0, 1)
    with pytest.raises(ValueError, match="value_range is"):
        reward(x * 255, PROMPTS)
    with pytest.warns(UserWarning, match="no negative value"):
        neg(x, PROMPTS)  # [0, 1] images declared (-1, 1)
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        reward(bad, PROMPTS)
    with pytest.raises(ValueError, match="lo < hi"):
        reward(x, PROMPTS, value_range=(1, 0))
    with pytest.raises(ValueError, match="'auto'"):
        reward(x, PROMPTS, value_range="0-1")


# -- bad inputs and missing weights -------------------------------------------------------------------------


def test_bad_images_and_prompts(clip_dir):
    reward = load_reward("clip_score", clip_dir, device="cpu")
    x = images(2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*unsqueeze"):
        reward(x[0], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"channels last"):
        reward(x.permute(0, 2, 3, 1), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]; got \(2, 1, 32, 32\)"):
        reward(x[:, :1], PROMPTS[:2])
    with pytest.raises(TypeError, match="floating point.*uint8"):
        reward((x * 255).to(torch.uint8), PROMPTS[:2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        reward(x.numpy(), PROMPTS[:2])
    with pytest.raises(ValueError, match="prompts has 3 entries but there are 2 samples"):
        reward(x, PROMPTS[:3])
    with pytest.raises(TypeError, match="list or tuple of strings"):
        reward(x, "a cat")
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        reward(x, ["a", 3])
    with pytest.raises(ValueError, match="prompts is required"):
        reward(x)
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        load_reward("jpeg_compressibility")(x, ["only one"])  # counted even where unused
    assert reward(x[:0], []).shape == (0,)
    with pytest.raises(ValueError, match="max_batch_size"):
        load_reward("jpeg_compressibility", max_batch_size=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        load_reward("jpeg_compressibility", autocast_dtype=torch.float32)
    with pytest.raises(ValueError, match="autocast_dtype must be None, bf16 or fp16"):
        load_reward("jpeg_compressibility", autocast_dtype="fp8")
    with pytest.raises(ValueError, match="mode must be one of"):
        load_reward("clip_score", clip_dir, device="cpu", mode="cos")


def test_missing_or_wrong_weights(clip_dir, aesthetic_dir, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"clip_score: no directory '.*nowhere'.*save_pretrained"):
        load_reward("clip_score", missing, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        load_reward("pickscore", str(empty), device="cpu")
    # the CLIP directory alone: no aesthetic head (the message names the files looked for and where)
    with pytest.raises(FileNotFoundError, match=re.escape("sac+logos+ava1-l14-linearMSE.pth") + r".*looked in '"):
        load_reward("aesthetic", clip_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="head file '.*nope.pth' does not exist"):
        load_reward("aesthetic", clip_dir, head=str(tmp_path / "nope.pth"), device="cpu")
    # a head of the wrong width, and a file that is not a head
    wrong = tmp_path / "wrong.pth"
    torch.save(AestheticMLP(24).state_dict(), wrong)
    with pytest.raises(ValueError, match="takes 24-d embeddings but the CLIP model projects to 16"):
        load_reward("aesthetic", clip_dir, head=str(wrong), device="cpu")
    junk = tmp_path / "junk.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 16), "layers.9.weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="does not match the improved-aesthetic-predictor layout"):
        load_reward("aesthetic", clip_dir, head=str(junk), device="cpu")
    # a checkpoint of another model: weights CLIP needs are missing
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=100)).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"lacks \d+ weights of CLIPModel .*is it a CLIP model"):
        load_reward("clip_score", str(bert), device="cpu")


@pytest.mark.parametrize("layout", ["original", "bare", "module", "safetensors"])
def test_aesthetic_head_key_layouts(clip_dir, aesthetic_dir, tmp_path, layout):
    sd = torch.load(f"{aesthetic_dir}/sac+logos+ava1-l14-linearMSE.pth")
    file = tmp_path / "head.pth"
    if layout == "bare":
        sd = {k[len("layers."):]: v for k, v in sd.items()}
    elif layout == "module":
        sd = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    if layout == "safetensors":
        from safetensors.torch import save_file

        file = tmp_path / "aesthetic_head.safetensors"
        save_file(sd, file)
    else:
        torch.save(sd, file)
    x = images(3)
    ref = load_reward("aesthetic", aesthetic_dir, device="cpu")(x)
    torch.testing.assert_close(load_reward("aesthetic", clip_dir, head=str(file), device="cpu")(x), ref)


# -- text rewards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("so the total is 42", 42.0),
    ("The answer is 42.0", 42.0),
    ("#### 42", 42.0),
    ("Step 1: 3 + 4 = 7.\n#### 1,234\nextra 9", 1234.0),
    ("we get \\boxed{42} and then 7", 42.0),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{-\\dfrac{1}{2}}", -0.5),
    ("answer: $3/4$", 0.75),
    ("\\boxed{x = -7.5}", -7.5),
    ("Answer: 12%", 12.0),
    ("cost is $1,000.", 1000.0),
    ("1e3", 1000.0),
    ("\\boxed{\\text{no number}} 5", 5.0),
    ("The answer is 7 because 3 + 4 = 7.\nCheck: 9", 7.0),
    ("answer is 3/4, i.e. 0.75", 0.75),
    ("So the probability is 3/4.", 0.75),  # a fraction ending a sentence (read as 4: the last integer)
    ("Answer: -3/4.", -0.75),
    ("The answer is 22/7.", 22 / 7),
    ("on 1/2/2024 the count was 5", 5.0),  # a date is no fraction
    ("\\boxed{2 \\times 3 = 6}", 6.0),
    ("The answer is 2^{10} = 1024.", 1024.0),  # a worked equation: its right-hand side
    ("Answer: x = -5", -5.0),
    ("Answer: \\frac{1}{2} \\cdot 4 = 2", 2.0),
    ("The answer is 3.5. Then 7 = 7", 3.5),  # the stated value's sentence only
    ("The answer is 1024 = 2^{10}.", 1024.0),  # stated first, then worked out
    ("The answer is 12 = 3 \\times 4", 12.0),
    ("The answer is approx. 5 and 9 more", 5.0),  # an abbreviation's "." ends no sentence with the number
    ("no number here", None),
    ("", None),
    ("\\boxed{unbalanced", None),
])
def test_final_number_parsing(text, value):
    assert final_number(text) == value


def test_extract_final_answer():
    assert extract_final_answer("x \\boxed{a{b}c} y \\boxed{2}") == "2"
    assert extract_final_answer("\\boxed{a{b}c}") == "a{b}c"
    assert extract_final_answer("work\n#### 18\n") == "18"
    assert extract_final_answer("The answer is: Paris.") == "Paris."
    assert extract_final_answer("Final Answer: 7") == "7"
    assert extract_final_answer("nothing marked") is None


def test_numeric_answer_reward():
    r = load_reward("numeric_answer")
    completions = ["#### 42", "\\boxed{41}", "I don't know", "42.0", "answer is 1/2", "The answer is 18 dollars"]
    answers = ["Natalia sold 48/2 = 24 clips.\n#### 42", 42, "42", 42.0, 0.5, "18"]
    torch.testing.assert_close(r(completions, answers=answers), torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    r2 = load_reward("numeric_answer", invalid_reward=-1.0, wrong_reward=-0.5)
    torch.testing.assert_close(r2(completions[:3], answers=answers[:3]), torch.tensor([1.0, -0.5, -1.0]))
    with pytest.raises(ValueError, match="answers is required"):
        r(completions)
    with pytest.raises(ValueError, match="answers has 2 entries but there are 6"):
        r(completions, answers=answers[:2])
    with pytest.raises(ValueError, match=r"answers\[0\] has no finite number"):
        r(["1"], answers=["none"])
    with pytest.raises(TypeError, match="completions must be a list"):
        r("#### 42", answers=["42"])


def test_exact_match_and_regex_format():
    em = load_reward("exact_match")
    got = em(["The answer is Paris.", "\\boxed{ New  York }", "london", "#### $5$"], answers=["paris", "new york",
                                                                                               "Paris", "#### 5"])
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    # LaTeX text wrappers and a multiple-choice "(B)" (they scored as wrong answers)
    got = em(["\\boxed{\\text{Paris}}", "The answer is (B).", "\\boxed{\\textbf{\\text{New York}}}", "(C)"],
             answers=["Paris", "B", "new york", "B"])
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    fmt = load_reward("regex_format")
    texts = ["<think>\nhmm\n</think>\n<answer>\n4\n</answer>", "<answer>4</answer>",
             "<think>a</think><answer>4</answer>x"]
    torch.testing.assert_close(fmt(texts), torch.tensor([1.0, 0.0, 0.0]))
    search = load_reward("regex_format", pattern=r"\d+", how="search")
    torch.testing.assert_close(search(["a 1", "none"]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        load_reward("regex_format", pattern="(")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny GPT-2 sequence classifier (2 labels, no pad token: the reward must pad with EOS) + byte tokenizer."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=128, num_labels=2,
                     id2label={0: "bad", 1: "good"}, bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    model = GPT2ForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_sequence_classification_reward(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    prompts = ["Q: 2+2? A:", "Q: capital of France? A:", "Q: hi", "Q: long " * 5]
    completions = [" 4", " Paris, of course.", "", " answer"]
    with torch.no_grad():
        ref = torch.stack([model(**tok(p + c, return_tensors="pt")).logits[0, 1] for p, c in zip(prompts, completions)])
    r = load_reward("sequence_classification", rm_dir, label="good", device="cpu", max_batch_size=3)
    got = r(completions, prompts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not got.is_inference() and got.dtype == torch.float32
    by_index = load_reward("sequence_classification", rm_dir, label=1, device="cpu")
    torch.testing.assert_close(by_index(completions, prompts), ref, atol=1e-5, rtol=1e-5)
    bf16 = load_reward("sequence_classification", rm_dir, label=1, device="cpu", autocast_dtype=torch.bfloat16)
    assert (bf16(completions, prompts) - ref).abs().max() < 0.05 * ref.abs().max().clamp(min=1)
    with torch.no_grad():
        alone = model(**tok(completions[1], return_tensors="pt")).logits[0, 0]
    torch.testing.assert_close(load_reward("sequence_classification", rm_dir, label="bad", device="cpu")(
        completions[1:2])[0], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has 2 outputs; pass label"):
        load_reward("sequence_classification", rm_dir, device="cpu")
    with pytest.raises(ValueError, match="label 'great' is not one of"):
        load_reward("sequence_classification", rm_dir, label="great", device="cpu")
    with pytest.raises(ValueError, match="needs path"):
        load_reward("sequence_classification")
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        r(completions, prompts[:1])


def test_sequence_classification_rejects_a_model_without_the_head(rm_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config.from_pretrained(rm_dir)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(rm_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks .* weights.*score"):
        load_reward("sequence_classification", str(tmp_path), label=1, device="cpu")


@pytest.mark.slow
def test_compiled_scoring_matches_eager(clip_dir):
    """compile=True runs each micro-batch's scoring through torch.compile: the same scores and pixel gradients."""
    x = images(5, 40, 52)
    eager = load_reward("clip_score", clip_dir, device="cpu", max_batch_size=3)
    compiled = load_reward("clip_score", clip_dir, device="cpu", max_batch_size=3, compile=True)
    torch.testing.assert_close(compiled(x, PROMPTS), eager(x, PROMPTS), atol=1e-4, rtol=1e-4)
    pixels = x.clone().requires_grad_(True)
    (g_eager,) = torch.autograd.grad(eager(pixels, PROMPTS).sum(), pixels)
    (g_compiled,) = torch.autograd.grad(compiled(pixels, PROMPTS).sum(), pixels)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-4, rtol=1e-3)
    with pytest.raises(TypeError, match="compile must be True or False"):
        load_reward("clip_score", clip_dir, device="cpu", compile="yes")
    # new prompts do not recompile (the tokenizer runs outside the compiled image tower): one compile, not one per
    # prompt list until torch's recompile limit
    import torch._dynamo.utils as dynamo_utils

    dynamo_utils.counters.clear()
    for prompts in (["a b"] * 5, ["c", "d", "c", "e", "f"], ["g"] * 5):
        torch.testing.assert_close(compiled(x, prompts), eager(x, prompts), atol=1e-4, rtol=1e-4)
    assert not dynamo_utils.counters["recompiles"] and dynamo_utils.counters["stats"]["unique_graphs"] <= 2
