"""open_clip -> transformers CLIPModel conversion (HPSv2's checkpoint layout), tested on tiny random open_clip
models of the same layout as ViT-H-14: the converted model's image and text embeddings equal open_clip's, and
`load_reward("hpsv2", ...)` on an HPSv2-style checkpoint file gives open_clip's normalized cosine."""

from __future__ import annotations

import pytest
import torch

from fusedrl.engine.rewards import clip_config_from_open_clip, convert_open_clip_checkpoint, load_reward
from fusedrl.engine.rewards.convert_open_clip import load_open_clip_checkpoint

from .test_rewards import MEAN, STD, images, tiny_clip_tokenizer

open_clip = pytest.importorskip("open_clip")

CONTEXT = 24
# the layout of open_clip's ViT-H-14.json at toy sizes (head_width 16 -> 2 vision heads; 2 text heads)
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 84, "width": 32, "heads": 2, "layers": 2},
}


def tiny_open_clip(quick_gelu: bool = False, seed: int = 0):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(TINY_CFG["embed_dim"], CLIPVisionCfg(**TINY_CFG["vision_cfg"]),
                           CLIPTextCfg(**TINY_CFG["text_cfg"]), quick_gelu=quick_gelu).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight"))
                                                                   else 0.0))
    return model


def token_ids(prompts):
    """The tiny CLIP tokenizer's ids padded to the context length (open_clip's text tower needs exactly that)."""
    tok = tiny_clip_tokenizer()
    return tok(prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")


PROMPTS = ["a cat", "a red dog on the grass", "photo of a very long prompt that will be cut off early", "x"]


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_converted_embeddings_equal_open_clip(quick_gelu):
    oc = tiny_open_clip(quick_gelu)
    cfg = dict(TINY_CFG, quick_gelu=quick_gelu)
    hf = load_open_clip_checkpoint(oc.state_dict(), cfg, device="cpu")
    assert hf.config.vision_config.num_attention_heads == 2 and hf.config.vision_config.image_size == 28
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    x = torch.randn(3, 3, 28, 28)
    tok = token_ids(PROMPTS)
    with torch.no_grad():
        ref_img, ref_txt = oc.encode_image(x), oc.encode_text(tok["input_ids"])
        img = hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)
        txt = hf.text_projection(hf.text_model(**tok).pooler_output)
    assert ref_img.abs().mean() > 0.1 and ref_txt.std(0).mean() > 0.05  # not degenerate
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.logit_scale, oc.logit_scale)
    # HPSv2 and open_clip tokenizers pad with 0 instead of EOT: the same text embedding (causal tower, EOT pooling)
    ids0 = tok["input_ids"].clone()
    after_eot = torch.cumsum((ids0 == 83).int(), dim=1) - (ids0 == 83).int() > 0
    ids0[after_eot] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf.text_projection(hf.text_model(input_ids=ids0).pooler_output), ref_txt,
                                   atol=1e-5, rtol=1e-5)


def open_clip_hps(oc, x01, prompts):
    """HPSv2's img_score.py formula with open_clip: diagonal of normalized image @ text features."""
    with torch.no_grad():
        img = oc.encode_image((x01 - MEAN) / STD, normalize=True)
        txt = oc.encode_text(token_ids(prompts)["input_ids"], normalize=True)
    return (img * txt).sum(-1)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """An HPSv2-style checkpoint ({"state_dict": {"module." + key: ...}, "epoch": ...}) under HPSv2's file name,
    next to the tokenizer."""
    oc = tiny_open_clip()
    path = tmp_path_factory.mktemp("hps")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in oc.state_dict().items()}},
               path / "HPS_v2.1_compressed.pt")
    tiny_clip_tokenizer().save_pretrained(path)
    return oc, path


def test_hpsv2_reward_from_checkpoint_file(hps_dir):
    oc, path = hps_dir
    x = images(4, 28, 28)
    expected = open_clip_hps(oc, x, PROMPTS)
    reward = load_reward("hpsv2", str(path), model_cfg=TINY_CFG, device="cpu")
    assert reward.differentiable and reward.mode == "cosine"
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # the file itself as path, and batched == one by one
    reward = load_reward("hpsv2", str(path / "HPS_v2.1_compressed.pt"), model_cfg=TINY_CFG, device="cpu",
                         tokenizer=str(path), max_batch_size=3)
    single = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(xg, PROMPTS).sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_hpsv2_letterboxes_non_square_images():
    """HPSv2 scores with open_clip's keep-ratio resize of the longer side and black padding (ResizeMaxSize; today's
    open_clip: resize_mode="longest"), not the shorter-side resize and center crop: a 2:3 image keeps its borders."""
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    from fusedrl.engine.rewards import ClipPreprocess

    x = torch.nn.functional.interpolate(images(1, 6, 9), size=(42, 63), mode="bilinear")
    x = (x * 255).round() / 255
    theirs = image_transform(28, is_train=False, resize_mode="longest", interpolation="bicubic")
    ref = theirs(Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
    got = ClipPreprocess(size=28, crop=28, fit="pad")(x)[0]
    assert got.shape == ref.shape == (3, 28, 28)
    assert (got - ref).abs().max() < 0.05  # PIL rounds its resized image to uint8
    cropped = ClipPreprocess(size=28, crop=28)(x)[0]
    assert (cropped - ref).abs().max() > 0.5  # the crop loses the borders the padding keeps


def test_convert_once_then_from_pretrained(hps_dir, tmp_path):
    oc, path = hps_dir
    out = convert_open_clip_checkpoint(str(path / "HPS_v2.1_compressed.pt"), str(tmp_path / "hf"), TINY_CFG,
                                       tokenizer=str(path))
    x = images(2, 28, 28)
    got = load_reward("hpsv2", out, device="cpu")(x, PROMPTS[:2])
    torch.testing.assert_close(got, open_clip_hps(oc, x, PROMPTS[:2]), atol=1e-5, rtol=1e-5)


def test_conversion_errors(hps_dir, tmp_path):
    oc, path = hps_dir
    sd = oc.state_dict()
    with pytest.raises(ValueError, match=r"no transformers CLIPModel counterpart.*resblocks.0.ls_1.gamma"):
        load_open_clip_checkpoint({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}, TINY_CFG)
    wrong = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 64}}
    with pytest.raises(ValueError, match="vision_cfg.width: config 64, checkpoint 32"):
        clip_config_from_open_clip(sd, wrong)
    # the default config is ViT-H-14: the tiny checkpoint contradicts it
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        clip_config_from_open_clip(sd)
    with pytest.raises(ValueError, match="not an open_clip CLIP state dict"):
        clip_config_from_open_clip({"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="does not exist; expected an HPSv2 checkpoint file"):
        load_reward("hpsv2", str(tmp_path / "missing.pt"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither config.json .* nor any of \['HPS_v2.1_compressed.pt'"):
        load_reward("hpsv2", str(tmp_path / "empty"), device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not read .*bad.pt"):
        load_reward("hpsv2", str(bad), model_cfg=TINY_CFG, device="cpu")
