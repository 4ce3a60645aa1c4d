"""`fusedrl.patch_backbone`: the fused RMSNorm, SwiGLU and LoRA forwards give a transformers model's outputs and
gradients (Llama-, Qwen2- and Qwen3-shaped, with and without LoRA, LoRA dropout included); peft's own paths
(adapter disabled, merged) still run; what it cannot fuse is left alone and named; undo restores the model.
Under TRITON_INTERPRET=1 (the tests' setting) the fused ops run their Triton kernels."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fusedrl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    """Models and inputs are built on the GPU on a GPU machine (the Triton kernels run there); here on the CPU, where
    conftest's TRITON_INTERPRET=1 runs them in Triton's interpreter."""
    with torch.device(DEVICE):
        yield

TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=211, head_dim=12)
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _model(arch: str, lora: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls = getattr(transformers, ARCHS[arch])
    model = cls(getattr(transformers, ARCHS[arch].replace("ForCausalLM", "Config"))(**TINY))
    with torch.no_grad():  # weights away from their init (norms at 1, LoRA B at 0) so every term shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    if lora is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return model


def _step(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout draws the same masks
    logits = model(input_ids=ids, use_cache=False).logits
    logits.double().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-4):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = gb[name].abs().max().item() + 1e-12
        assert (ga[name] - gb[name]).abs().max().item() <= rtol * scale + 1e-7, name


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("lora", [None, {}, {"lora_dropout": 0.3}], ids=["full", "lora", "lora-dropout"])
def test_patched_model_equals_stock(arch, lora):
    model = _model(arch, lora)
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 13))
    stock = _step(model, ids)
    patch = fusedrl.patch_backbone(model)
    layers, norms_per_layer = TINY["num_hidden_layers"], 4 if arch == "qwen3" else 2  # Qwen3: q_norm, k_norm
    assert patch.patched == {"rms_norm": layers * norms_per_layer + 1, "swiglu": layers, "rotary": layers,
                             "lora": 0 if lora is None else 7 * layers}, patch.skipped
    assert not patch.skipped
    _assert_same(_step(model, ids), stock)
    assert patch.summary().startswith(f"fused backbone: {patch.patched['rms_norm']} rms_norm")
    patch.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(_step(model, ids)[0], stock[0], rtol=0, atol=0)


def test_peft_paths_the_fused_forward_does_not_take_run_peft():
    """Adapter disabled (the KL reference), merged adapters, and a mixed-batch call with adapter names."""
    model = _model("qwen2", {}).eval()  # peft takes adapter_names in eval mode only
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(input_ids=ids).logits
        lora_out = model(input_ids=ids).logits
        fusedrl.patch_backbone(model)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_out)
        torch.testing.assert_close(model(input_ids=ids).logits, lora_out, rtol=1e-5, atol=1e-5)
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(mixed[0], lora_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], base_out[1], rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, lora_out, rtol=1e-4, atol=1e-4)


class OffsetRMSNorm(nn.Module):  # Gemma's form: (1 + weight), not a Llama RMSNorm
    def __init__(self, width, init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), init))
        self.eps = 1e-6

    def normalized(self, x):
        return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return (self.normalized(x) * (1.0 + self.weight.float())).to(x.dtype)


class GeluMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(width, 8), nn.Linear(width, 8), nn.Linear(8, width)
        self.act_fn = nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SiluOtherMLP(GeluMLP):  # silu, the right names, another formula
    def __init__(self, width):
        super().__init__(width)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_modules_of_another_formula_are_left_alone_and_named():
    model = nn.Sequential(OffsetRMSNorm(6), GeluMLP(6), SiluOtherMLP(6))
    x = torch.randn(3, 6)
    expected = model(x)
    patch = fusedrl.patch_backbone(model)
    assert patch.patched == {"rms_norm": 0, "swiglu": 0, "rotary": 0, "lora": 0}
    assert "another formula" in patch.skipped["0"] and patch.skipped["0"].startswith("rms_norm: ")
    assert "its activation is GELU, not silu" in patch.skipped["1"]
    assert "another formula" in patch.skipped["2"]
    assert "3 module(s) left alone" in patch.summary()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_gpt2_lora_is_left_alone():
    """GPT-2: LayerNorm and a GELU MLP (nothing to fuse), LoRA on its Conv1D layers left to peft."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    patch = fusedrl.patch_backbone(model)
    assert patch.patched == {"rms_norm": 0, "swiglu": 0, "rotary": 0, "lora": 0}
    assert list(patch.skipped.values()) == ["lora: its base layer is Conv1D, not nn.Linear"]


def test_weights_that_cannot_be_probed_are_left_alone():
    with torch.device("meta"):
        model = _model("llama")
    patch = fusedrl.patch_backbone(model)
    assert sum(patch.patched.values()) == 0
    assert all("meta device" in why for why in patch.skipped.values())


def test_a_model_on_the_meta_device_replays_the_probes_of_one_with_weights():
    """FSDP2 processes that take rank 0's weights hold the model on the meta device: they fuse what rank 0's probes
    fused (with the rms_norm variant it chose) and leave alone what it left, with rank 0's reasons."""
    stock = nn.Sequential(OffsetRMSNorm(6), _model("qwen3"))
    with torch.device("meta"):
        waiting = nn.Sequential(OffsetRMSNorm(6), _model("qwen3"))
    recorded = fusedrl.patch_backbone(stock)
    assert recorded.patched["rms_norm"] > 0 and "another formula" in recorded.skipped["0"]
    replayed = fusedrl.patch_backbone(waiting, replay=recorded.probes)
    assert (replayed.patched, replayed.skipped) == (recorded.patched, recorded.skipped)
    assert _fused_modules(waiting) == _fused_modules(stock)
    assert fusedrl.patch_backbone(waiting, replay=recorded.probes) is replayed  # fused already: nothing new
    assert sum(replayed.patched.values()) == sum(recorded.patched.values())
    with torch.device("meta"):
        other = nn.Sequential(nn.Identity(), nn.Identity(), _model("llama"))  # names the record does not have
    unknown = fusedrl.patch_backbone(other, replay=recorded.probes)
    assert sum(unknown.patched.values()) == 0 and unknown.skipped
    assert all("no such module" in why for why in unknown.skipped.values())


def test_patching_is_idempotent_selective_and_reversible():
    model = _model("llama", {})
    patch = fusedrl.patch_backbone(model, swiglu=False, rotary=False, lora=False)
    assert patch.patched == {"rms_norm": 5}
    assert fusedrl.patch_backbone(model) is patch  # the existing patch
    assert fusedrl.unpatch_backbone(model) and not patch.active
    assert not fusedrl.unpatch_backbone(model)
    patch.undo()  # idempotent
    assert fusedrl.patch_backbone(model).patched == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "lora": 14}
    with pytest.raises(TypeError, match="patch_backbone takes a torch.nn.Module, got builtins.str"):
        fusedrl.patch_backbone("Qwen/Qwen2.5-0.5B")


def test_a_forward_replaced_by_someone_else_is_kept(monkeypatch):
    """... and not probed first."""
    from fusedrl.integrations import transformers_backbone as tb

    model = _model("llama")
    norm = model.model.norm
    norm.forward = lambda x: x  # e.g. accelerate's device-map hooks
    probed, real = [], tb._probe_dtype_device
    monkeypatch.setattr(tb, "_probe_dtype_device", lambda module: probed.append(module) or real(module))
    patch = fusedrl.patch_backbone(model)
    assert patch.skipped == {"model.norm": "rms_norm: its forward is already replaced on the instance"}
    assert probed and all(module is not norm for module in probed)
    patch.undo()
    assert "forward" in norm.__dict__


def _counting_rotary(monkeypatch) -> list[int]:
    import fusedrl.kernels

    calls, real = [], fusedrl.kernels.apply_rotary

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fusedrl.kernels, "apply_rotary", counted)
    return calls


def test_rotary_is_fused_in_the_patched_model_only(monkeypatch):
    """The modeling module's function is shared: a second model of the architecture keeps the stock rotary, the
    patched one uses the fused one (in checkpointing's recomputation too); undo and collection restore it."""
    import gc

    from transformers.models.llama import modeling_llama

    gc.collect()  # models of earlier tests: their patches released
    stock = modeling_llama.apply_rotary_pos_emb
    calls = _counting_rotary(monkeypatch)
    patched, other = _model("llama"), _model("llama", seed=1)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    expected = _step(patched, ids)
    patch = fusedrl.patch_backbone(patched)
    assert modeling_llama.apply_rotary_pos_emb is not stock
    calls.clear()  # the patch's probe
    other(input_ids=ids)
    assert not calls  # the unpatched model: stock rotary
    _assert_same(_step(patched, ids), expected)
    layers = TINY["num_hidden_layers"]
    assert len(calls) == 2 * layers  # each layer's forward and its recomputation in the backward
    patch.undo()
    assert modeling_llama.apply_rotary_pos_emb is stock
    fusedrl.patch_backbone(other)
    assert modeling_llama.apply_rotary_pos_emb is not stock
    del other
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb is stock  # the collected model's patch let go


def test_rotary_of_another_formula_is_left_alone(monkeypatch):
    from transformers.models.llama import modeling_llama

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's pairs, not transformers' halves
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", interleaved)
    patch = fusedrl.patch_backbone(_model("llama"))
    assert patch.patched["rotary"] == 0 and modeling_llama.apply_rotary_pos_emb is interleaved
    assert "rotary: its apply_rotary_pos_emb computes another formula" in patch.skipped["model.layers.0.self_attn"]


def test_diffusers_sd3_qk_norms_and_lora():
    """diffusers: SD3.5's q/k RMSNorms (diffusers' RMSNorm) and the LoRA on its attention projections, as the
    diffusion trainers patch them; Flux's norms are the same class."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
    model.requires_grad_(False)
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500.0, 200.0]),
                  encoder_hidden_states=torch.randn(2, 5, 16), pooled_projections=torch.randn(2, 16))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dict=False)[0]
        out.double().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stock = step()
    patch = fusedrl.patch_backbone(model)
    norms = sum(type(m).__name__ == "RMSNorm" for m in model.modules())
    assert norms and patch.patched["rms_norm"] == norms and patch.patched["lora"] > 0, patch.skipped
    _assert_same(step(), stock)


@pytest.mark.slow
def test_patch_adds_no_graph_breaks_under_torch_compile():
    """torch.compile traces the patched modules (custom ops, the rotary hooks' flag) without new graph breaks."""
    import torch._dynamo

    model = _model("qwen2", {})
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    stock = torch._dynamo.explain(model)(input_ids=ids).graph_break_count
    torch._dynamo.reset()
    fusedrl.patch_backbone(model)
    explained = torch._dynamo.explain(model)(input_ids=ids)
    torch._dynamo.reset()
    assert explained.graph_break_count <= stock, [str(r.reason)[:200] for r in explained.break_reasons]


def _saved_bytes(layer, *args, **kwargs) -> int:
    """Bytes of the tensors autograd keeps for the backward of one call (parameters and their views left out: they
    stay anyway), each storage counted once."""
    storages = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(*args, **kwargs)
    return sum(storages.values())


def test_a_patched_layer_keeps_less_for_its_backward():
    """What a decoder layer holds for its backward (all of it live while a checkpointed layer's backward runs): fp16
    weights with fp32 LoRA on the attention projections, Qwen2's width ratios. Measured: 56% of the stock layer's
    bytes (the fp32 norm temporaries, silu(gate), peft's fp32 copies and products are gone); also at Qwen2.5-1.5B's
    widths (963 -> 541 MB per layer at 10240 tokens, scaled from 128)."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors take the torch formulas unless Triton's interpreter runs the kernels")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=256, intermediate_size=1536, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = peft.get_peft_model(transformers.Qwen2ForCausalLM(config).to(torch.float16),
                                peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    decoder = model.get_base_model().model
    x = torch.randn(2, 128, 256, dtype=torch.float16, requires_grad=True)
    rotary = decoder.rotary_emb(x, torch.arange(128)[None].expand(2, -1))
    stock = _saved_bytes(decoder.layers[0], x, position_embeddings=rotary, attention_mask=None)
    fusedrl.patch_backbone(model)
    fused = _saved_bytes(decoder.layers[0], x, position_embeddings=rotary, attention_mask=None)
    assert fused <= 0.6 * stock, (fused, stock)


def _tiny(cls_name: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**{**TINY, **extra})
    return getattr(transformers, cls_name)(config)


def test_partial_rotary_runs_the_stock_function():
    """Phi-3 style partial rotary (cos narrower than the head): the patched model's calls go to the stock
    function, which rotates the first cos.shape[-1] dims only."""
    model = _tiny("Phi3ForCausalLM", partial_rotary_factor=0.5, pad_token_id=0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    expected = _step(model, ids)
    patch = fusedrl.patch_backbone(model)
    assert patch.patched["rotary"] == TINY["num_hidden_layers"] and patch.patched["rms_norm"] > 0
    _assert_same(_step(model, ids), expected)


def test_fp32_rotary_tables_over_bf16_queries_run_the_stock_function():
    """Olmo2 keeps cos / sin in fp32 and casts the rotated q, k back to their dtype: the stock function serves
    (the fused one would return fp32 queries next to bf16 values)."""
    model = _tiny("Olmo2ForCausalLM").to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fusedrl.patch_backbone(model)
        got = model(input_ids=ids).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


class ClampedSwiGLU(GeluMLP):  # DeepSeek-V4 / GLM-5-Next: silu, the usual names, gate and up clamped to +-10
    def __init__(self, width):
        super().__init__(width)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x).clamp(max=10.0)) * self.up_proj(x).clamp(-10.0, 10.0))


class CastBackRMSNorm(OffsetRMSNorm):  # Olmo2's form: weight times the fp32 row, then cast back to x's dtype
    def __init__(self, width):
        super().__init__(width, init=1.0)

    def forward(self, x):
        return (self.weight * self.normalized(x)).to(x.dtype)


def test_formulas_that_differ_only_off_the_common_inputs_are_not_fused_there():
    """A SwiGLU that clamps (seen on large inputs) is left alone; an RMSNorm that casts back to the input's dtype
    (seen with fp32 weights over bf16 activations, as under autocast) is fused for inputs of its weights' dtype,
    and runs its own forward for others."""
    model = nn.Sequential(ClampedSwiGLU(6), CastBackRMSNorm(6))
    patch = fusedrl.patch_backbone(model)
    assert patch.patched["swiglu"] == 0 and "another formula" in patch.skipped["0"]
    assert patch.patched["rms_norm"] == 1
    norm, stock = model[1], CastBackRMSNorm(6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(norm(x), stock(x), rtol=1e-6, atol=1e-6)
    got = norm(x.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, stock(x.bfloat16()))


def test_a_one_plus_weight_norm_with_an_outlier_channel_is_left_alone():
    """Gemma's (1 + w) form differs from w's by x-hat in every channel; one large weight made every other channel's
    difference look small next to the largest output (the probe compared to it), and the norm was fused."""
    norm = OffsetRMSNorm(256)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(256, generator=torch.Generator().manual_seed(0)))
        norm.weight[7] = 400.0
    patch = fusedrl.patch_backbone(nn.Sequential(norm))
    assert patch.patched["rms_norm"] == 0 and "another formula" in patch.skipped["0"]


def test_diffusers_rms_norm_is_fused_for_inputs_of_its_weights_dtype_only():
    """diffusers' RMSNorm rounds x-hat to a half-precision weight's dtype (else keeps it in fp32) and returns that
    dtype: with inputs of another dtype its output differs from transformers' order, so those run diffusers'."""
    normalization = pytest.importorskip("diffusers.models.normalization")
    for weight_dtype, other in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        norm = normalization.RMSNorm(64, eps=1e-6).to(weight_dtype)
        with torch.no_grad():
            norm.weight.add_(0.3 * torch.randn(64, generator=torch.Generator().manual_seed(1)).to(weight_dtype))
        stock = copy.deepcopy(norm)
        assert fusedrl.patch_backbone(nn.Sequential(norm)).patched["rms_norm"] == 1
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        got, want = norm(x.to(other)), stock(x.to(other))
        assert got.dtype == want.dtype and torch.equal(got, want), weight_dtype
        torch.testing.assert_close(norm(x.to(weight_dtype)), stock(x.to(weight_dtype)), rtol=1e-2, atol=1e-2)


def test_fp16_mlp_whose_large_probe_overflows_is_still_fused():
    """The x100 trial overflows to inf in fp16 in the stock forward too (wide MLPs): it is skipped, not held
    against the module."""
    model = nn.Sequential(transformers.models.llama.modeling_llama.LlamaMLP(
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128)))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # gate and up ~ 3200 at x100: their product overflows fp16
    model.half()
    x = 100 * torch.ones(2, 64, dtype=torch.float16)
    assert not torch.isfinite(model(x)).all()
    assert fusedrl.patch_backbone(model).patched["swiglu"] == 1


def _fused_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_lora_added_after_the_patch_is_fused_by_patching_again():
    """patch, get_peft_model, patch again: the new LoRA linears join the patch (the summary says so), the outputs
    are peft's, and undo restores every module."""
    model = _model("llama")
    patch = fusedrl.patch_backbone(model)
    assert patch.patched["lora"] == 0
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    assert fusedrl.patch_backbone(peft_model) is patch and patch.patched["lora"] == 14
    assert "14 lora" in patch.summary()
    fused = peft_model(input_ids=ids).logits
    patch.undo()
    assert _fused_modules(peft_model) == []
    torch.testing.assert_close(fused, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_of_a_patched_model_gets_a_patch_of_its_own():
    """The copy carries the fused forwards: patching it adopts them (counted, none 'left alone'), and unpatching
    it restores them."""
    import copy

    model = _model("llama", {})
    patch = fusedrl.patch_backbone(model)
    clone = copy.deepcopy(model)
    own = fusedrl.patch_backbone(clone)
    assert own is not patch and own.patched == patch.patched and not own.skipped
    assert fusedrl.unpatch_backbone(clone) and _fused_modules(clone) == []
    assert patch.active and _fused_modules(model)


def test_dora_linears_are_left_to_peft_and_said_so():
    model = _model("llama", {"use_dora": True})
    patch = fusedrl.patch_backbone(model)
    assert patch.patched["lora"] == 0
    assert all(why == "lora: its adapters are DoRA / other peft variants or have a bias: peft's forward runs them"
               for name, why in patch.skipped.items() if "proj" in name)


def test_a_copied_patch_copies_no_model():
    import copy

    patch = fusedrl.patch_backbone(_model("llama"))
    assert copy.deepcopy(patch)._registry is patch._registry


def test_zero3_partitioned_adapters_run_peft_forward(monkeypatch):
    """Under DeepSpeed ZeRO-3 (parameters carry ds_id) an adapter's weights are gathered only inside its own
    forward: the fused LoRA forward, which reads them directly, hands such a linear to peft's forward."""
    from peft.tuners.lora.layer import Linear

    model = _model("llama", {})
    fusedrl.patch_backbone(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    fused = model(input_ids=ids).logits
    calls = []
    stock = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, x, *a, **k: calls.append(1) or stock(self, x, *a, **k))
    assert model(input_ids=ids).logits is not None and calls == []  # the fused forward runs
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.ds_id = 0  # what deepspeed.zero.Init sets on every parameter it partitions
    out = model(input_ids=ids).logits
    assert len(calls) == 14
    torch.testing.assert_close(out, fused, rtol=1e-4, atol=1e-5)
