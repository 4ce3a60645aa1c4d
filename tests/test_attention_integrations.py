"""fusedrl.patch_attention on tiny transformers and diffusers models built from configs: the same outputs and
gradients as the stock attention (fp32), on padded batches, with KV caches, and back to stock after unpatching."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedrl
from fusedrl.integrations import diffusers_attention as da
from fusedrl.integrations import transformers_attention as ta
from fusedrl.kernels import attention as fused_attention

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
ATOL, RTOL = 2e-5, 1e-4  # fp32; the patched path computes the same math through a different mask layout


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def count_flash(monkeypatch):
    """Counts flash_attention calls made by the integrations and records whether each had a key padding mask."""
    calls = []
    real = fused_attention.flash_attention

    def spy(q, k, v, **kw):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "mask": kw.get("key_padding_mask") is not None,
                      "causal": kw.get("causal", False)})
        return real(q, k, v, **kw)

    monkeypatch.setattr(fused_attention, "flash_attention", spy)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# transformers causal LMs
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 61


def _lm_config(kind: str, **over):
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    elif kind == "qwen2":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg.pad_token_id = 0
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _build_lm(kind: str, path: Path | None = None, **over):
    torch.manual_seed(0)
    cls = getattr(transformers, _MODEL_CLASSES[kind])
    model = cls(_lm_config(kind, **over))
    if path is not None:  # the real save/load code, as a user's checkpoint would go
        model.save_pretrained(path)
        model = cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def lm(request, tmp_path_factory):
    model = _build_lm(request.param, tmp_path_factory.mktemp(request.param))
    assert model.config._attn_implementation == "sdpa"
    yield model
    fusedrl.unpatch_attention(model)


def _left_padded_batch(B=3, N=11, pads=(0, 3, 7), seed=1, right=(0, 0, 0)):
    """Left-padded prompts (and, with `right`, right-padded completions, as in a GRPO forward)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b, (p, r) in enumerate(zip(pads, right)):
        mask[b, :p] = 0
        mask[b, N - r:] = 0 if r else 1
    ids[mask == 0] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def _forward_and_grads(model, ids, mask, pos):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    w = torch.linspace(-1, 1, logits.shape[-1])
    (logits[real] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None and any(s in n for s in ("layers.0.self_attn.q_proj", "layers.1.self_attn.k_proj",
                                                             "h.0.attn.c_attn", "h.1.attn.c_proj", "embed", "wte"))}
    assert len(grads) >= 2
    return logits.detach()[real], grads


def test_lm_left_padded_outputs_and_gradients(lm, count_flash):
    """Left-padded prompts and a right-padded completion (the GRPO case): logits at real tokens and parameter
    gradients match stock SDPA; the patched model really ran flash_attention, with a key padding mask and causal;
    unpatching restores stock."""
    ids, mask, pos = _left_padded_batch(right=(0, 2, 0))
    ref_logits, ref_grads = _forward_and_grads(lm, ids, mask, pos)

    patch = fusedrl.patch_attention(lm)
    assert lm.config._attn_implementation == "fusedrl" and patch.kind == "transformers" and not patch.skipped
    assert fusedrl.patch_attention(lm) is patch  # patching twice is a no-op
    logits, grads = _forward_and_grads(lm, ids, mask, pos)
    n_layers = lm.config.num_hidden_layers
    assert len(count_flash) == n_layers and all(c["mask"] and c["causal"] for c in count_flash)
    _close(logits, ref_logits, "logits")
    for n in ref_grads:
        _close(grads[n], ref_grads[n], f"grad {n}")

    assert fusedrl.unpatch_attention(lm) and not fusedrl.unpatch_attention(lm)
    assert lm.config._attn_implementation == "sdpa"
    count_flash.clear()
    logits, _ = _forward_and_grads(lm, ids, mask, pos)
    assert not count_flash
    _close(logits, ref_logits, "logits after unpatch")


def test_lm_unpadded_batch_needs_no_mask(lm, count_flash):
    """Without padding the mask function returns None and flash_attention runs causal with no mask."""
    ids, mask, pos = _left_padded_batch(pads=(0, 0, 0))
    ref = lm(input_ids=ids, attention_mask=mask).logits
    with_patch = fusedrl.patch_attention(lm)
    try:
        out = lm(input_ids=ids, attention_mask=mask).logits
    finally:
        with_patch.undo()
    assert count_flash and all(c["causal"] and not c["mask"] for c in count_flash)
    _close(out, ref, "logits")


def test_lm_kv_cache_continuation(lm):
    """Prefill a left-padded prompt into a DynamicCache, then feed 3 tokens at once (Nq=3 < Nkv: bottom-right
    causal) and then 1: the logits match stock SDPA at every step."""
    ids, mask, pos = _left_padded_batch()
    more = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))

    def run():
        cache = transformers.DynamicCache(config=lm.config)
        outs = [lm(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                   use_cache=True).logits[mask.bool()]]
        m, p = mask, pos
        for chunk in (more[:, :3], more[:, 3:]):
            m = torch.cat([m, torch.ones_like(chunk)], dim=1)
            p = p[:, -1:] + torch.arange(1, chunk.shape[1] + 1)
            outs.append(lm(input_ids=chunk, attention_mask=m, position_ids=p, cache=cache,
                           use_cache=True).logits)
        return outs

    with torch.no_grad():
        ref = run()
        patch = fusedrl.patch_attention(lm)
        try:
            got = run()
        finally:
            patch.undo()
    for i, (a, b) in enumerate(zip(got, ref)):
        _close(a, b, f"step {i}")


def test_lm_greedy_generate_same_tokens(lm):
    """Greedy generation with a KV cache from a left-padded batch gives the same tokens patched and unpatched."""
    ids, mask, _ = _left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = lm.generate(ids, **kw)
        patch = fusedrl.patch_attention(lm)
        try:
            got = lm.generate(ids, **kw)
        finally:
            patch.undo()
    assert torch.equal(got, ref)


def test_lm_static_cache_generate(count_flash):
    """A static cache holds max_cache_len key slots: the mask function returns a key mask only as long as the
    written keys (the rest are dropped), so the bottom-right causal alignment is right; same tokens as stock."""
    model = _build_lm("llama")
    ids, mask, _ = _left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        fusedrl.patch_attention(model)
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)
    prefill = count_flash[0]
    assert prefill["q"][2] == ids.shape[1] and prefill["k"][2] == ids.shape[1] and prefill["mask"]


def test_mask_function_is_what_makes_padding_right(monkeypatch):
    """With the mask function registered, transformers calls it and the attention function gets a [B, N] key mask
    on a left-padded batch. With only an AttentionInterface registration (no mask function), transformers hands
    the attention function attention_mask=None and the real tokens' logits come out wrong."""
    from transformers import AttentionInterface, AttentionMaskInterface

    model = _build_lm("llama")
    ids, mask, pos = _left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]

    seen = {"mask_fn": 0, "masks": []}

    def mask_spy(*a, **kw):
        seen["mask_fn"] += 1
        return ta.fusedrl_mask(*a, **kw)

    def attn_spy(module, q, k, v, attention_mask, **kw):
        seen["masks"].append(attention_mask)
        return ta.fusedrl_attention_forward(module, q, k, v, attention_mask, **kw)

    patch = fusedrl.patch_attention(model)  # registers "fusedrl": spy on what transformers calls after that
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "fusedrl", mask_spy)
    monkeypatch.setitem(AttentionInterface._global_mapping, "fusedrl", attn_spy)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    patch.undo()
    assert seen["mask_fn"] >= 1
    assert all(m is not None and m.dtype == torch.bool and tuple(m.shape) == tuple(ids.shape) for m in seen["masks"])
    _close(out, ref, "logits")

    # The attention function alone, under a name with no mask function.
    seen["masks"].clear()
    monkeypatch.setitem(AttentionInterface._global_mapping, "fusedrl_attention_only", attn_spy)
    model.set_attn_implementation("fusedrl_attention_only")
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    model.set_attn_implementation("sdpa")
    assert seen["masks"] and all(m is None for m in seen["masks"])
    padded_rows = mask[:, 0] == 0
    row_of_token = torch.arange(3)[:, None].expand_as(mask)[mask.bool()]
    assert (wrong - ref)[padded_rows[row_of_token]].abs().max() > 1e-2  # the padded sequences attend to padding
    _close(wrong[~padded_rows[row_of_token]], ref[~padded_rows[row_of_token]], "unpadded row")


def test_fallbacks_match_stock_and_say_why(caplog, monkeypatch):
    """Calls flash_attention cannot express run the stock attention, with the same results, and log why once
    (attention dropout: GPT-2 in training mode, same RNG draws as stock SDPA; a binding sliding window), unless
    patched with fallback_log=False."""
    monkeypatch.setattr(ta, "_said", set())
    caplog.set_level(logging.INFO, logger="fusedrl")
    ids, mask, pos = _left_padded_batch()

    gpt2 = _build_lm("gpt2", attn_pdrop=0.3).train()
    outs = []
    for patched in (False, True):
        if patched:
            fusedrl.patch_attention(gpt2)
        torch.manual_seed(3)
        outs.append(gpt2(input_ids=ids, attention_mask=mask).logits[mask.bool()])
        torch.manual_seed(3)
        gpt2(input_ids=ids, attention_mask=mask)  # a second call: the reason is logged once
    _close(outs[1], outs[0], "gpt2 with attention dropout")
    assert sum("attention dropout" in r.getMessage() for r in caplog.records) == 1

    qwen = _build_lm("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0,
                     layer_types=["sliding_attention"] * 2)
    with torch.no_grad():
        fusedrl.patch_attention(qwen)
        qwen(input_ids=ids, attention_mask=mask, position_ids=pos)
    assert any("sliding window that binds" in r.getMessage() for r in caplog.records)

    caplog.clear()
    monkeypatch.setattr(ta, "_said", set())
    quiet = _build_lm("gpt2", attn_pdrop=0.3).train()
    fusedrl.patch_attention(quiet, fallback_log=False)
    quiet(input_ids=ids, attention_mask=mask)
    assert not any("dropout" in r.getMessage() for r in caplog.records)


def test_softcapping_falls_back_to_the_models_eager_attention(caplog, monkeypatch):
    """Gemma-2 (attention logit softcapping, which SDPA lacks): every call goes to the model's own
    eager_attention_forward with the mask made explicit; same logits as stock on a left-padded batch."""
    monkeypatch.setattr(ta, "_said", set())
    caplog.set_level(logging.INFO, logger="fusedrl")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                                    pad_token_id=0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids, mask, pos = _left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        fusedrl.patch_attention(model)
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    _close(got, ref, "gemma2 logits")
    assert any("softcapping" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("window", [4, 48])
def test_sliding_window_layers(window, count_flash):
    """Qwen2 with every layer sliding: a window shorter than the batch's sequence binds and goes to the stock
    attention with transformers' 4D mask; a window no query reaches past is plain causal and runs flash_attention.
    Same logits as stock both ways, for a left-padded forward and for greedy decoding with a KV cache."""
    model = _build_lm("qwen2", use_sliding_window=True, sliding_window=window, max_window_layers=0,
                      layer_types=["sliding_attention"] * 2)
    ids, mask, pos = _left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        ref_tokens = model.generate(ids, **kw)
        fusedrl.patch_attention(model)
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        got_tokens = model.generate(ids, **kw)
    _close(got, ref, f"window {window}")
    assert torch.equal(got_tokens, ref_tokens)
    prefill = [c for c in count_flash if c["q"][2] == ids.shape[1]]
    assert bool(prefill) == (window >= ids.shape[1])  # the 11-token prefill runs flash_attention iff 11 <= window
    # Decoding steps run it either way: transformers' sliding cache keeps the last `window` keys, all visible.
    assert any(c["q"][2] == 1 for c in count_flash)


def test_from_pretrained_with_fusedrl_and_save(tmp_path):
    """After register(), from_pretrained(attn_implementation="fusedrl") works; saving a patched model writes a
    checkpoint that loads without fusedrl."""
    model = _build_lm("qwen2")
    fusedrl.patch_attention(model)
    model.save_pretrained(tmp_path)
    assert "fusedrl" not in (tmp_path / "config.json").read_text()
    ta.register()
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="fusedrl")
    assert loaded.config._attn_implementation == "fusedrl"
    plain = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert plain.config._attn_implementation == "sdpa"
    ids, mask, pos = _left_padded_batch()
    with torch.no_grad():
        a = loaded.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        b = plain.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    _close(a, b, "loaded with fusedrl vs sdpa")


def test_peft_wrapped_model(count_flash):
    """A PEFT LoRA model (as TRL trains it) is unwrapped to its base model, patched, and unpatched."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_build_lm("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask, pos = _left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        patch = fusedrl.patch_attention(model)
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    assert model.get_base_model().config._attn_implementation == "fusedrl" and count_flash
    _close(got, ref, "peft logits")
    assert fusedrl.unpatch_attention(model) and not patch.active
    assert model.get_base_model().config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------------------------


def _save_load(model, path):
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


def _param(model, name):
    return dict(model.named_parameters())[name]


def _run_and_grads(model, make_inputs, param_names, input_name):
    model.zero_grad(set_to_none=True)
    inputs = make_inputs()
    x = inputs[input_name].detach().clone().requires_grad_(True)
    inputs[input_name] = x
    out = model(**inputs, return_dict=False)[0]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: _param(model, n).grad.clone() for n in param_names}


def _check_parity(model, make_inputs, param_names, input_name, count_flash, expect_processor):
    ref = _run_and_grads(model, make_inputs, param_names, input_name)
    patch = fusedrl.patch_attention(model)
    assert patch.kind == "diffusers" and patch.patched and not patch.skipped
    assert all(type(p) is expect_processor for p in model.attn_processors.values())
    got = _run_and_grads(model, make_inputs, param_names, input_name)
    assert count_flash, "the patched model did not call flash_attention"
    _close(got[0], ref[0], "output")
    _close(got[1], ref[1], f"grad {input_name}")
    for n in param_names:
        _close(got[2][n], ref[2][n], f"grad {n}")
    calls = list(count_flash)
    assert fusedrl.unpatch_attention(model)
    assert not any(isinstance(p, da._Base) for p in model.attn_processors.values())
    count_flash.clear()
    with torch.no_grad():
        again = model(**make_inputs(), return_dict=False)[0]
    assert not count_flash
    _close(again, ref[0], "output after unpatch")
    return calls


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)
    return _save_load(model, tmp_path_factory.mktemp("unet"))


def test_unet_padded_text_outputs_and_gradients(unet, count_flash):
    """SD1.5-style UNet: self-attention and cross-attention to a padded text batch (encoder_attention_mask) match
    the stock AttnProcessor2_0 in output and gradients (the noisy latent, attention and conv weights)."""
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 7, 24, generator=g)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])

    def inputs():
        return {"sample": sample.clone(), "timestep": torch.tensor([10, 999]), "encoder_hidden_states": text,
                "encoder_attention_mask": text_mask}

    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_in.weight"]
    calls = _check_parity(unet, inputs, names, "sample", count_flash, da.FusedRLAttnProcessor)
    assert any(c["mask"] for c in calls) and any(not c["mask"] for c in calls)  # cross- and self-attention


def test_unet_fully_masked_text_row(unet):
    """A prompt whose text tokens are all masked: the stock UNet adds the same -10000 bias to every key, which
    cancels in the softmax, so it attends to all of them. fusedrl does the same, exactly (it equals the unmasked
    output); stock only up to the rounding of scores + -10000 in fp32 (ulp(10000) ~ 1e-3)."""
    g = torch.Generator().manual_seed(3)
    sample, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 7, 24, generator=g)
    masked = torch.tensor([[1] * 7, [0] * 7])
    with torch.no_grad():
        stock = unet(sample, 50, encoder_hidden_states=text, encoder_attention_mask=masked).sample
        unmasked = unet(sample, 50, encoder_hidden_states=text).sample
        patch = fusedrl.patch_attention(unet)
        got = unet(sample, 50, encoder_hidden_states=text, encoder_attention_mask=masked).sample
        patch.undo()
    _close(got, unmasked, "fully masked row vs no mask")
    torch.testing.assert_close(got, stock, atol=2e-3, rtol=1e-2)


def test_unet_text_mask_checked_once_per_forward_and_compiles(unet, monkeypatch):
    """The UNet turns its text mask into one float bias that every cross-attention layer gets: its values are read
    (a host sync) once per forward, not once per layer; and under torch.compile(fullgraph=True), where they cannot be
    read, the stock processor serves the masked calls (the check broke the graph: a data-dependent branch)."""
    g = torch.Generator().manual_seed(5)
    sample, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 7, 24, generator=g)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ref = unet(sample, 10, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
    patch = fusedrl.patch_attention(unet)
    try:
        checks = []
        real_all = torch.Tensor.all
        monkeypatch.setattr(torch.Tensor, "all", lambda t, *a, **k: checks.append(1) or real_all(t, *a, **k))
        with torch.no_grad():
            got = unet(sample, 10, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
        monkeypatch.undo()
        layers = sum(1 for _, m in unet.attn_processors.items() if isinstance(m, da.FusedRLAttnProcessor)) // 2
        assert len(checks) == 1 and layers > 1
        _close(got, ref, "unet output")
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            out = compiled(sample, 10, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
        _close(out, ref, "compiled unet output")
    finally:
        patch.undo()
        torch._dynamo.reset()


def test_unet_without_text_mask(unet, count_flash):
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        ref = unet(sample, 7, encoder_hidden_states=text).sample
        patch = fusedrl.patch_attention(unet)
        got = unet(sample, 7, encoder_hidden_states=text).sample
        patch.undo()
    assert count_flash and not any(c["mask"] for c in count_flash)
    _close(got, ref, "unet output")


def test_unet_general_mask_falls_back(unet, caplog, monkeypatch):
    """A bias that is not a key padding mask (here -0.5 on some keys) goes to the stock processor, and says so."""
    monkeypatch.setattr(da, "_said", set())
    caplog.set_level(logging.INFO, logger="fusedrl")
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, 5, 24, generator=g)
    bias = torch.zeros(2, 1, 5)
    bias[1, 0, 3:] = -0.5
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    with torch.no_grad():
        hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
        ref = attn(hidden, encoder_hidden_states=text, attention_mask=bias)
        patch = fusedrl.patch_attention(unet)
        got = attn(hidden, encoder_hidden_states=text, attention_mask=bias)
        patch.undo()
    _close(got, ref, "attn2 with a general bias")
    assert any("additive attention bias" in r.getMessage() for r in caplog.records)


def test_unet_unknown_processors_are_left_alone(unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    names = list(unet.attn_processors)
    unet.set_attn_processor({n: AttnProcessor() if i == 0 else AttnProcessor2_0() for i, n in enumerate(names)})
    try:
        patch = fusedrl.patch_attention(unet)
        assert list(patch.skipped) == [names[0]] and len(patch.patched) == len(names) - 1
        assert type(unet.attn_processors[names[0]]) is AttnProcessor
        patch.undo()
        unet.set_attn_processor(AttnProcessor())
        with pytest.raises(TypeError, match="none of its attention processors"):
            fusedrl.patch_attention(unet)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


def test_sd3_joint_attention(tmp_path, count_flash):
    """SD3 (with an SD3.5-style dual-attention block and the last block's context_pre_only attention) matches the
    stock JointAttnProcessor2_0 in output and gradients."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,))
    model = _save_load(model, tmp_path)
    assert any(getattr(m, "context_pre_only", False) for m in model.modules())
    g = torch.Generator().manual_seed(0)
    hs, text, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 12)

    def inputs():
        return {"hidden_states": hs.clone(), "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": torch.tensor([3, 700])}

    names = ["transformer_blocks.0.attn.add_k_proj.weight", "transformer_blocks.1.attn.to_q.weight",
             "transformer_blocks.0.attn2.to_v.weight"]
    _check_parity(model, inputs, names, "hidden_states", count_flash, da.FusedRLJointAttnProcessor)


@pytest.mark.parametrize("with_mask", [False, True])
def test_flux_joint_and_single_blocks(tmp_path, count_flash, with_mask):
    """Flux (rotary embeddings, joint and single blocks) matches the stock FluxAttnProcessor in output and
    gradients, without a mask and with a bool key mask over the text+image tokens (padded text)."""
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    model = _save_load(model, tmp_path)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 12, 5
    hs, text, pooled = (torch.randn(2, n_img, 8, generator=g), torch.randn(2, n_txt, 16, generator=g),
                        torch.randn(2, 12, generator=g))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    txt_ids = torch.zeros(n_txt, 3)
    extra = {}
    if with_mask:
        keys = torch.ones(2, n_txt + n_img, dtype=torch.bool)
        keys[1, 3:n_txt] = False  # the second prompt has 3 text tokens
        extra["joint_attention_kwargs"] = {"attention_mask": keys}

    def inputs():
        return {"hidden_states": hs.clone(), "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": torch.tensor([0.3, 0.9]), "img_ids": img_ids, "txt_ids": txt_ids, **extra}

    names = ["transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.attn.to_k.weight",
             "x_embedder.weight"]
    calls = _check_parity(model, inputs, names, "hidden_states", count_flash, da.FusedRLFluxAttnProcessor)
    assert calls and all(c["mask"] == with_mask for c in calls)


# ----------------------------------------------------------------------------------------------------------------
# the front door
# ----------------------------------------------------------------------------------------------------------------


def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="transformers PreTrainedModel or a diffusers model"):
        fusedrl.patch_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        fusedrl.patch_attention("not a model")
    assert fusedrl.unpatch_attention(torch.nn.Linear(2, 2)) is False


def test_patch_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = _build_lm("gpt2")
    patch = fusedrl.patch_attention(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    patch.undo()  # nothing left to undo: no error


def test_import_fusedrl_stays_light():
    code = ("import sys, fusedrl; fusedrl.patch_attention; "
            "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules, "
            "[m for m in ('transformers', 'diffusers') if m in sys.modules]; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
