"""ImageReward: a tiny random model in the ORIGINAL layout (BLIP's timm-style ViT, med.py's BERT with cross-attention,
the MLP head; written here in plain torch after THUDM/ImageReward's ImageReward.py and BLIP's vit.py / med.py) is
saved as ImageReward.pt, loaded through load_reward("imagereward", ...) (key converter -> transformers' BLIP parts),
and must score like the original code path, one image at a time. Also: batched == one-by-one, gradients reach the
pixels, the vision attention back-ends agree, convert-once-then-from_pretrained, bf16 autocast, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusedrl.engine.rewards import (
    ClipPreprocess,
    convert_imagereward_checkpoint,
    convert_imagereward_state_dict,
    load_reward,
)
from fusedrl.engine.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, MAX_LENGTH

IMAGE, PATCH, V_WIDTH, V_HEADS, V_LAYERS = 32, 8, 48, 4, 2
T_WIDTH, T_HEADS, T_LAYERS, T_POS = 32, 2, 2, 40
WORDS = ["a", "cat", "red", "dog", "on", "the", "grass", "photo", "of", "very", "long", "prompt", "that", "will", "be",
         "cut", "off", "early", "x", "blue", "sky", "##s", ".", ","]


# -- the original layout (after BLIP's vit.py and med.py, as ImageReward uses them) --------------------------------


class VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class VitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), VitAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), VitMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(PATCH, V_WIDTH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, V_WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH))
        self.blocks = nn.ModuleList([VitBlock(V_WIDTH, V_HEADS) for _ in range(V_LAYERS)])
        self.norm = nn.LayerNorm(V_WIDTH, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed[:, :x.size(1) + 1, :]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, T_WIDTH, padding_idx=0)
        self.position_embeddings = nn.Embedding(T_POS, T_WIDTH)
        self.LayerNorm = nn.LayerNorm(T_WIDTH, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(T_POS).expand((1, -1)))

    def forward(self, ids):
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(self.position_ids[:, :ids.shape[1]]))


class BertSelfAttention(nn.Module):
    def __init__(self, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(T_WIDTH, T_WIDTH)
        self.key, self.value = nn.Linear(kv_width, T_WIDTH), nn.Linear(kv_width, T_WIDTH)

    def forward(self, h, mask, kv=None):
        kv = h if kv is None else kv

        def split(x):
            return x.view(x.shape[0], x.shape[1], T_HEADS, -1).permute(0, 2, 1, 3)

        q, k, v = split(self.query(h)), split(self.key(kv)), split(self.value(kv))
        scores = q @ k.transpose(-1, -2) / (T_WIDTH // T_HEADS) ** 0.5 + mask
        return (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(h.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, inner: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(inner, T_WIDTH), nn.LayerNorm(T_WIDTH, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, kv_width: int) -> None:
        super().__init__()
        self.self, self.output = BertSelfAttention(kv_width), BertSelfOutput(T_WIDTH)

    def forward(self, h, mask, kv=None):
        return self.output(self.self(h, mask, kv), h)


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.crossattention = BertAttention(T_WIDTH), BertAttention(V_WIDTH)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(T_WIDTH, 2 * T_WIDTH)
        self.output = BertSelfOutput(2 * T_WIDTH)

    def forward(self, h, mask, image, image_mask):
        h = self.attention(h, mask)
        h = self.crossattention(h, image_mask, image)
        return self.output(nn.functional.gelu(self.intermediate.dense(h)), h)


class BertModel(nn.Module):
    """med.py's BertModel(add_pooling_layer=False) with add_cross_attention, in encoder mode."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer() for _ in range(T_LAYERS)])

    def forward(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask):
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        image_mask = (1.0 - encoder_attention_mask[:, None, None, :].float()) * -10000.0
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, mask, encoder_hidden_states, image_mask)
        return h


class OriginalImageReward(nn.Module):
    """ImageReward.py's ImageReward: blip (visual_encoder, text_encoder, vision_proj, text_proj) + mlp."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer()
        self.blip.text_encoder = BertModel(vocab)
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(V_WIDTH, 16), nn.Linear(T_WIDTH, 16)
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(nn.Linear(T_WIDTH, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                        nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                        nn.Linear(16, 1))
        self.mean, self.std = IMAGEREWARD_MEAN, IMAGEREWARD_STD

    def score(self, ids, mask, image):
        """ImageReward.score for one preprocessed image [1, 3, S, S] and its tokenized prompt."""
        image_embeds = self.blip.visual_encoder(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        out = self.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_atts)
        rewards = self.mlp.layers(out[:, 0, :].float())
        return ((rewards - self.mean) / self.std).squeeze()


# -- fixtures -----------------------------------------------------------------------------------------------------


def tiny_bert_tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizer(str(vocab))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def randomize(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    """ImageReward.pt (original layout) + med_config.json + tokenizer files, as a user would lay them out."""
    path = tmp_path_factory.mktemp("imagereward")
    tok = tiny_bert_tokenizer(tmp_path_factory.mktemp("vocab"))
    tok.save_pretrained(path)
    orig = randomize(OriginalImageReward(len(tok)))
    torch.save(orig.state_dict(), path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps({
        "hidden_size": T_WIDTH, "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS, "vocab_size": len(tok),
        "intermediate_size": 2 * T_WIDTH, "max_position_embeddings": T_POS, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 768}))
    return path, orig, tok


PROMPTS = ["a cat", "a red dog on the grass", "a cat", "photo of a very long prompt that will be cut off early " * 3,
           "x"]


def images(b: int = 5, h: int = IMAGE, w: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def load(path, **kw):
    return load_reward("imagereward", str(path), device="cpu", vision_heads=V_HEADS, **kw)


def original_scores(orig, tok, x01, prompts):
    """The original code path, one image at a time (ImageReward.score), on pixels preprocessed as CLIP does."""
    pre = ClipPreprocess(size=IMAGE, crop=IMAGE)
    out = []
    for i, prompt in enumerate(prompts):
        t = tok(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        with torch.no_grad():
            out.append(orig.score(t.input_ids, t.attention_mask, pre(x01[i:i + 1])))
    return torch.stack(out)


# -- tests --------------------------------------------------------------------------------------------------------


def test_converted_scores_equal_original(ir_dir):
    path, orig, tok = ir_dir
    reward = load(path / "ImageReward.pt")
    assert reward.name == "imagereward" and reward.differentiable and reward.needs_prompts
    x = images()
    ref = original_scores(orig, tok, x, PROMPTS)
    got = reward(x, PROMPTS)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.std() > 0.05  # the random model separates images and prompts
    # the same through the directory (ImageReward.pt + med_config.json found there)
    torch.testing.assert_close(load(path)(x, PROMPTS), ref, rtol=1e-5, atol=1e-5)
    cfg = reward.model.config
    assert (cfg.reward_mean, cfg.reward_std) == (0.16717362830052426, 1.0333394966054072)
    assert cfg.vision_config.layer_norm_eps == 1e-6 and cfg.text_config.encoder_hidden_size == V_WIDTH


def test_batched_equals_one_by_one_and_micro_batches(ir_dir):
    path, _, _ = ir_dir
    x = images(7, seed=3)
    prompts = (PROMPTS * 2)[:7]
    full = load(path)(x, prompts)
    singles = torch.cat([load(path)(x[i:i + 1], prompts[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load(path, max_batch_size=3)(x, prompts), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "fusedrl"])
def test_vision_attention_backends_agree(ir_dir, impl):
    path, _, _ = ir_dir
    x = images(3, seed=5)
    ref = load(path, attn_implementation="sdpa")(x, PROMPTS[:3])
    torch.testing.assert_close(load(path, attn_implementation=impl)(x, PROMPTS[:3]), ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_pixels(ir_dir):
    path, _, _ = ir_dir
    reward = load(path)
    x = images(2, 48, 40, seed=7).requires_grad_(True)  # resized (bicubic) and center-cropped on the way
    out = reward(x * 2 - 1, PROMPTS[:2], value_range=(-1, 1))
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a finite difference along the gradient agrees with it
    d = grad / grad.norm()
    eps = 1e-3
    with torch.no_grad():
        up = reward((x + eps * d) * 2 - 1, PROMPTS[:2], value_range=(-1, 1)).sum()
        down = reward((x - eps * d) * 2 - 1, PROMPTS[:2], value_range=(-1, 1)).sum()
    assert (up - down) / (2 * eps) == pytest.approx(grad.norm().item(), rel=2e-2)


def test_bf16_autocast_close_to_fp32(ir_dir):
    path, _, _ = ir_dir
    x = images(4, seed=9)
    ref = load(path)(x, PROMPTS[:4])
    got = load(path, autocast_dtype=torch.bfloat16)(x, PROMPTS[:4])
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_convert_once_then_from_pretrained(ir_dir, tmp_path):
    path, _, _ = ir_dir
    out = convert_imagereward_checkpoint(str(path / "ImageReward.pt"), str(tmp_path / "converted"),
                                         vision_heads=V_HEADS, tokenizer=str(path))
    x = images(3, seed=11)
    ref = load(path)(x, PROMPTS[:3])
    reward = load_reward("imagereward", out, device="cpu")
    torch.testing.assert_close(reward(x, PROMPTS[:3]), ref, rtol=1e-5, atol=1e-5)
    assert reward.model.config.reward_mean == IMAGEREWARD_MEAN and reward.model.config.reward_std == IMAGEREWARD_STD


def test_converter_and_loading_errors(ir_dir, tmp_path):
    path, orig, _ = ir_dir
    sd = orig.state_dict()
    converted = convert_imagereward_state_dict(sd)
    assert "vision_model.encoder.layers.1.self_attn.projection.weight" in converted
    assert not any("proj" in k and k.startswith("blip.") for k in converted)
    assert not any(k.endswith("position_ids") for k in converted)
    with pytest.raises(ValueError, match=r"no counterpart.*blip\.visual_encoder\.extra"):
        convert_imagereward_state_dict({**sd, "blip.visual_encoder.extra": torch.zeros(1)})
    bad = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        load(bad)
    with pytest.raises(FileNotFoundError, match=r"imagereward: .*nowhere.* does not exist"):
        load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither config.json .* nor ImageReward.pt"):
        load(empty)
    with pytest.raises(ValueError, match="attn_implementation"):
        load(path, attn_implementation="flash")
    with pytest.raises(ValueError, match="prompts is required"):
        load(path)(images(2))
