"""The "save_attention" policy's stash (fusedrl.engine.attention_stash): gradients equal to "full" and to no
checkpointing (exactly: the same kernels run on the same inputs), no attention forward in the recompute,
nested regions, threads, regions run twice before backward, retain_graph, the F.scaled_dot_product_attention
swap and its restoration, fallbacks to recompute, clear errors on a recompute that differs from its forward,
the bytes held, and third-party blocks (diffusers' AttnProcessor2_0, transformers' sdpa attention)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusedrl.engine import attention_stash
from fusedrl.engine import checkpointing as ckpt

from .op_recorder import OpRecorder

STOCK_SDPA = F.scaled_dot_product_attention
CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
FUSEDRL_FWD = "fusedrl::flash_attention_fwd"
POLICIES = ("none", "full", "save_attention")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def fusedrl_attention(q, k, v):
    from fusedrl.kernels import flash_attention

    return flash_attention(q, k, v)


class Block(nn.Module):
    """Pre-norm transformer block over [B, N, d]; `attention(q, k, v)` on [B, H, N, d / H]."""

    def __init__(self, d: int = 16, heads: int = 2, attention=sdpa):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def grads_of(module: nn.Module, x: torch.Tensor, fn, *, count: bool = False):
    """(output, {name: grad} of x and the parameters, op counts of the backward) of loss = sum(fn(x)^2)."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    y = fn(x)
    rec = OpRecorder()
    if count:
        with rec:
            (y.double() ** 2).sum().backward()
    else:
        (y.double() ** 2).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}, rec.counts


def assert_exact(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def by_policy(module, x, make_fn, **kw):
    return {policy: grads_of(module, x, make_fn(policy), **kw) for policy in POLICIES}


# ---- gradients and op counts --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_block_gradients_exact_and_no_attention_forward_in_recompute(dtype):
    torch.manual_seed(0)
    blocks = nn.Sequential(Block(), Block()).to(dtype)
    x = torch.randn(2, 13, 16, dtype=dtype)
    runs = {policy: grads_of(blocks, x, lambda t, p=policy: _each(blocks, t, p), count=True) for policy in POLICIES}
    (y_ref, ref, none), (y_full, full_g, full), (y_sa, got, saved) = (runs[p] for p in POLICIES)
    torch.testing.assert_close(y_sa, y_ref, rtol=0, atol=0)
    assert_exact(full_g, ref)
    assert_exact(got, ref)  # the same kernels on the same inputs: bit for bit
    assert none[CPU_FLASH] == 0 and full[CPU_FLASH] == 2 and saved[CPU_FLASH] == 0
    assert none[CPU_FLASH + "_backward"] == full[CPU_FLASH + "_backward"] == saved[CPU_FLASH + "_backward"] == 2
    assert saved["aten::native_layer_norm"] == full["aten::native_layer_norm"] == 4  # the rest still reruns
    assert F.scaled_dot_product_attention is STOCK_SDPA


def _each(blocks, x, policy):
    for block in blocks:
        x = ckpt.checkpoint(block, x, policy=policy)
    return x


def test_fusedrl_flash_attention_triton_path():
    """fusedrl.kernels.flash_attention on its Triton path (the interpreter, fp32): replayed through
    FlashAttention(saved=...), gradients exact, no fusedrl::flash_attention_fwd in backward."""
    torch.manual_seed(0)
    blocks = nn.Sequential(Block(attention=fusedrl_attention), Block(attention=fusedrl_attention))
    x = torch.randn(1, 9, 16)
    runs = {policy: grads_of(blocks, x, lambda t, p=policy: _each(blocks, t, p), count=True) for policy in POLICIES}
    (_, ref, none), (_, full_g, full), (_, got, saved) = (runs[p] for p in POLICIES)
    if full[FUSEDRL_FWD] == 0:
        pytest.skip("flash_attention does not take its Triton path here")
    assert none[FUSEDRL_FWD] == 0 and full[FUSEDRL_FWD] == 2 and saved[FUSEDRL_FWD] == 0
    assert saved["fusedrl::flash_attention_bwd"] == 2
    assert_exact(full_g, ref)
    assert_exact(got, ref)


def test_fusedrl_flash_attention_torch_path_fp64(use_backend):
    """The torch path of flash_attention (fp64) calls SDPA, which the region serves."""
    use_backend("torch")
    torch.manual_seed(0)
    block = Block(attention=fusedrl_attention).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    runs = by_policy(block, x, lambda p: (lambda t: ckpt.checkpoint(block, t, policy=p)), count=True)
    assert runs["full"][2][CPU_FLASH] == 1 and runs["save_attention"][2][CPU_FLASH] == 0
    assert_exact(runs["save_attention"][1], runs["none"][1])


def test_masks_and_causal_are_served():
    """Bool and float masks (converted as SDPA converts them) and is_causal: saved, exact."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 3, 10, 8)
    keep = torch.rand(2, 1, 10, 10) > 0.3
    keep[..., 0] = True
    bias = torch.randn(10, 10)
    calls = {
        "bool": lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=keep),
        "float": lambda q: F.scaled_dot_product_attention(q, q, q, bias),
        "causal": lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.3),
    }
    for name, call in calls.items():
        runs = by_policy(lin, x, lambda p, c=call: (lambda t: ckpt.checkpoint(lambda u: c(lin(u)), t, policy=p)),
                         count=True)
        assert runs["full"][2][CPU_FLASH] == 1 and runs["save_attention"][2][CPU_FLASH] == 0, name
        torch.testing.assert_close(runs["save_attention"][0], runs["none"][0], rtol=0, atol=0, msg=name)
        assert_exact(runs["save_attention"][1], runs["none"][1])


def test_unsupported_inputs_fall_back_to_recompute(monkeypatch):
    """Attention dropout, a mask that requires grad, grouped-query attention: the stock SDPA runs and reruns
    in backward (as under full); gradients still equal no checkpointing (dropout: the same RNG replay). A
    fallback the user may not expect (grouped-query attention here) is said once."""
    monkeypatch.setattr(attention_stash, "_fallback_warned", set())
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 4, 10, 8)
    bias = torch.randn(10, 10, requires_grad=True)
    kv = torch.randn(2, 2, 10, 8)
    calls = {
        "dropout": lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.3),
        "mask_requires_grad": lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=bias),
        "gqa": lambda q: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True),
    }
    for name, call in calls.items():
        runs = {}
        for policy in POLICIES:
            bias.grad = None
            torch.manual_seed(1)
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                runs[policy] = grads_of(lin, x, lambda t, p=policy, c=call: ckpt.checkpoint(lambda u: c(lin(u)), t,
                                                                                            policy=p), count=True)
            told = [str(w.message) for w in said if "recomputed in backward as under 'full'" in str(w.message)]
            expected = name == "gqa" and policy == "save_attention"
            assert len(told) == int(expected) and all("grouped-query attention" in t for t in told), (name, told)
            runs[policy][1]["bias"] = None if bias.grad is None else bias.grad.clone()
        full, saved = runs["full"][2], runs["save_attention"][2]
        attention_ops = [op for op in full if "attention" in op and "backward" not in op or op == "aten::_safe_softmax"]
        assert attention_ops and all(saved[op] == full[op] > runs["none"][2][op] for op in attention_ops), name
        torch.testing.assert_close(runs["save_attention"][0], runs["none"][0], rtol=0, atol=0, msg=name)
        for key, want in runs["none"][1].items():
            torch.testing.assert_close(runs["save_attention"][1][key], want, rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")


def test_math_backend_falls_back_with_the_warning(monkeypatch):
    monkeypatch.setattr(attention_stash, "_math_warned", False)
    torch.manual_seed(0)
    block, x = Block(), torch.randn(1, 7, 16)
    with sdpa_kernel(SDPBackend.MATH), pytest.warns(RuntimeWarning, match="math backend"):
        runs = by_policy(block, x, lambda p: (lambda t: ckpt.checkpoint(block, t, policy=p)), count=True)
    assert runs["save_attention"][2]["aten::_safe_softmax"] == runs["full"][2]["aten::_safe_softmax"] == 1
    assert_exact(runs["save_attention"][1], runs["none"][1])


def test_autocast_is_reproduced():
    """Under CPU autocast SDPA runs in bf16: the region casts as autocast does and saves the bf16 call."""
    torch.manual_seed(0)
    block, x = Block(), torch.randn(1, 9, 16)
    runs = {}
    for policy in POLICIES:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[policy] = grads_of(block, x, lambda t, p=policy: ckpt.checkpoint(block, t, policy=p), count=True)
    assert runs["full"][2][CPU_FLASH] == 1 and runs["save_attention"][2][CPU_FLASH] == 0
    torch.testing.assert_close(runs["save_attention"][0], runs["none"][0], rtol=0, atol=0)
    assert_exact(runs["save_attention"][1], runs["full"][1])


# ---- regions ------------------------------------------------------------------------------------------

def test_nested_regions():
    """save_attention inside save_attention (by hand: apply_checkpointing never nests), and full inside
    save_attention; gradients exact. A nested save_attention region's forward, rerun by the outer recompute,
    takes its calls from the outer stash (it computed them again: one attention forward per call in backward);
    a region of another policy nested inside keeps its calls out of the outer stash."""
    torch.manual_seed(0)
    a, b, c = Block(), Block(), Block()
    model = nn.ModuleList([a, b, c])
    x = torch.randn(2, 7, 16)

    def make(policy, inner):
        def outer(t):
            t = a(t)
            t = ckpt.checkpoint(b, t, policy=inner)
            return c(t)

        return lambda t: ckpt.checkpoint(outer, t, policy=policy)

    ref = grads_of(model, x, make("none", "none"))[1]
    for inner in ("save_attention", "full", "save_attention_and_matmuls"):
        _, got, counts = grads_of(model, x, make("save_attention", inner), count=True)
        assert_exact(got, ref)
        # save_attention: no attention forward in backward at any depth; another policy's inner region computes
        # its call in the outer recompute, and "full" once more in its own
        assert counts[CPU_FLASH] == {"save_attention": 0, "full": 2, "save_attention_and_matmuls": 1}[inner], inner
    assert F.scaled_dot_product_attention is STOCK_SDPA and not attention_stash.active()


def test_three_nested_save_attention_regions_replay_every_call():
    """Regions three deep, each with its own attention call, the middle one called twice: every call is replayed
    from the stash of the region being recomputed, so backward runs no attention forward; gradients exact."""
    torch.manual_seed(0)
    a, b, c = Block(), Block(), Block()
    model = nn.ModuleList([a, b, c])
    x = torch.randn(2, 5, 16)

    def make(policy):
        inner = lambda t: ckpt.checkpoint(c, t, policy=policy)
        middle = lambda t: ckpt.checkpoint(lambda u: inner(b(u)), t, policy=policy)
        return lambda t: ckpt.checkpoint(lambda u: middle(middle(a(u))), t, policy=policy)

    ref = grads_of(model, x, make("none"))[1]
    _, got, counts = grads_of(model, x, make("save_attention"), count=True)
    assert counts[CPU_FLASH] == 0
    assert_exact(got, ref)
    assert not attention_stash.active()


def test_region_called_twice_before_backward_keeps_separate_stashes():
    torch.manual_seed(0)
    block = Block()
    x1, x2 = torch.randn(1, 5, 16), torch.randn(1, 8, 16)

    def fn(policy):
        return lambda t: torch.cat([ckpt.checkpoint(block, t, policy=policy),
                                    ckpt.checkpoint(block, x2 * t.mean(), policy=policy)], dim=1)

    ref = grads_of(block, x1, fn("none"))[1]
    _, got, counts = grads_of(block, x1, fn("save_attention"), count=True)
    assert counts[CPU_FLASH] == 0
    assert_exact(got, ref)


def test_retain_graph_replays_twice():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(1, 6, 16)
    grads = {}
    for policy in ("none", "save_attention"):
        block.zero_grad(set_to_none=True)
        y = ckpt.checkpoint(block, x, policy=policy)
        y.square().sum().backward(retain_graph=True)
        first = [p.grad.clone() for p in block.parameters()]
        with OpRecorder() as rec:
            y.square().sum().backward()
        grads[policy] = (first, [p.grad.clone() for p in block.parameters()], rec.counts)
    assert grads["save_attention"][2][CPU_FLASH] == 0
    for i in (0, 1):
        for got, want in zip(grads["save_attention"][i], grads["none"][i]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_threads_keep_their_stashes_apart():
    """Two threads in regions at the same time (held together by a barrier inside the forward)."""
    torch.manual_seed(0)
    blocks = [Block(), Block()]
    xs = [torch.randn(1, 5, 16), torch.randn(2, 9, 16)]
    refs = [grads_of(b, x, lambda t, b=b: b(t))[1] for b, x in zip(blocks, xs)]
    barrier = threading.Barrier(2, timeout=60)
    results, errors = [None, None], []

    def work(i):
        try:
            def fn(t):
                barrier.wait()  # both regions are active now
                out = blocks[i](t)
                barrier.wait()
                return out

            results[i] = grads_of(blocks[i], xs[i], lambda t: ckpt.checkpoint(fn, t, policy="save_attention"))[1]
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for got, want in zip(results, refs):
        assert_exact(got, want)
    assert F.scaled_dot_product_attention is STOCK_SDPA


def test_sdpa_is_restored_after_exceptions():
    block, x = Block(), torch.randn(1, 4, 16, requires_grad=True)

    def bad(t):
        block(t)
        assert F.scaled_dot_product_attention is not STOCK_SDPA  # swapped inside the region
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        ckpt.checkpoint(bad, x, policy="save_attention")
    assert F.scaled_dot_product_attention is STOCK_SDPA and not attention_stash.active()

    state = {"fail": False}

    def fails_in_recompute(t):
        if state["fail"]:
            raise ValueError("recompute failed")
        return block(t)

    y = ckpt.checkpoint(fails_in_recompute, x, policy="save_attention")
    state["fail"] = True
    with pytest.raises(ValueError, match="recompute failed"):
        y.sum().backward()
    assert F.scaled_dot_product_attention is STOCK_SDPA and not attention_stash.active()
    from fusedrl.kernels.attention import api

    assert api.checkpoint_hook is None


def test_a_replacement_made_inside_a_region_is_left_in_place():
    def mine(*args, **kwargs):
        return STOCK_SDPA(*args, **kwargs)

    def fn(t):
        F.scaled_dot_product_attention = mine
        return t * 2

    try:
        ckpt.checkpoint(fn, torch.ones(2, requires_grad=True), policy="save_attention")
        assert F.scaled_dot_product_attention is mine
    finally:
        F.scaled_dot_product_attention = STOCK_SDPA


def test_a_recompute_that_differs_from_its_forward_raises():
    lin = nn.Linear(8, 8)
    x = torch.randn(1, 2, 6, 8, requires_grad=True)
    state = {"calls": 2, "n": 6}

    def fn(t):
        q = lin(t)
        for _ in range(state["calls"]):
            q = F.scaled_dot_product_attention(q[..., : state["n"], :], q, q)
        return q

    y = ckpt.checkpoint(fn, x, policy="save_attention")
    state["calls"] = 1
    with pytest.raises(RuntimeError, match="made 1 attention calls, its forward 2"):
        y.sum().backward()

    state.update(calls=1, n=6)
    y = ckpt.checkpoint(fn, x, policy="save_attention")
    state["n"] = 4
    with pytest.raises(RuntimeError, match="different attention call #1"):
        y.sum().backward()

    state.update(calls=1, n=6)
    y = ckpt.checkpoint(fn, x, policy="save_attention", early_stop=False)  # else the recompute stops in time
    state["calls"] = 3
    with pytest.raises(RuntimeError, match="more attention calls than its forward"):
        y.sum().backward()
    assert F.scaled_dot_product_attention is STOCK_SDPA


def test_output_modified_in_place_is_recomputed():
    torch.manual_seed(0)
    lin, x = nn.Linear(8, 8), torch.randn(1, 2, 6, 8)

    def fn(t):
        o = F.scaled_dot_product_attention(lin(t), t, t)
        o.mul_(2)  # the stash aliases o: the replay sees the change and recomputes this call
        return o.sin()

    full = grads_of(lin, x, lambda t: ckpt.checkpoint(fn, t, policy="full"))[1]
    _, got, counts = grads_of(lin, x, lambda t: ckpt.checkpoint(fn, t, policy="save_attention"), count=True)
    assert counts[CPU_FLASH] == 1
    assert_exact(got, full)


def test_stash_holds_out_and_lse_only(monkeypatch):
    regions = []

    class Recorded(attention_stash.Region):
        def __init__(self):
            super().__init__()
            regions.append(self)

    monkeypatch.setattr(attention_stash, "Region", Recorded)
    torch.manual_seed(0)
    block = Block(d=16, heads=2)
    B, N, D, H = 2, 11, 16, 2
    y = ckpt.checkpoint(block, torch.randn(B, N, D, requires_grad=True), policy="save_attention")
    assert len(regions) == 1 and len(regions[0].entries) == 1
    assert regions[0].nbytes() == (B * N * D + B * H * N) * 4  # out [B, H, N, D/H] and the fp32 lse [B, H, N]
    y.sum().backward()


# ---- third-party blocks -------------------------------------------------------------------------------

def test_diffusers_attn_processor2_0_block():
    diffusers_attention = pytest.importorskip("diffusers.models.attention")
    torch.manual_seed(0)
    block = diffusers_attention.BasicTransformerBlock(16, 2, 8, cross_attention_dim=12)
    assert type(block.attn1.processor).__name__ == "AttnProcessor2_0"
    x, context = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    runs = by_policy(block, x, lambda p: (lambda t: ckpt.checkpoint(block, t, policy=p, encoder_hidden_states=context)),
                     count=True)
    assert runs["full"][2][CPU_FLASH] == 2 and runs["save_attention"][2][CPU_FLASH] == 0  # self and cross
    assert_exact(runs["save_attention"][1], runs["none"][1])


def test_transformers_clip_vision_sdpa():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    model = transformers.CLIPVisionModel._from_config(config, attn_implementation="sdpa")
    layer_type = next(type(m) for m in model.modules() if type(m).__name__.endswith("EncoderLayer"))
    pixels = torch.randn(1, 3, 16, 16)

    def loss_grads():
        model.zero_grad(set_to_none=True)
        with OpRecorder() as rec:
            out = model(pixel_values=pixels).last_hidden_state
            out.square().sum().backward()
        return ({n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None},
                rec.counts)

    ref, none = loss_grads()
    ckpt.apply_checkpointing(model, "full", module_types=layer_type)
    _, full = loss_grads()
    ckpt.apply_checkpointing(model, "save_attention", module_types=layer_type)
    got, saved = loss_grads()
    assert full[CPU_FLASH] == none[CPU_FLASH] + 2 and saved[CPU_FLASH] == none[CPU_FLASH] == 2
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)


# ---- SDPA's CUDA kernels, on the meta device ----------------------------------------------------------

@pytest.mark.parametrize("choice, op, masked", [
    (SDPBackend.FLASH_ATTENTION, "aten::_scaled_dot_product_flash_attention", False),
    (SDPBackend.EFFICIENT_ATTENTION, "aten::_scaled_dot_product_efficient_attention", False),
    (SDPBackend.EFFICIENT_ATTENTION, "aten::_scaled_dot_product_efficient_attention", True),
    (SDPBackend.CUDNN_ATTENTION, "aten::_scaled_dot_product_cudnn_attention", False),
])
def test_cuda_kernel_calls_on_meta_tensors(monkeypatch, choice, op, masked):
    """The calls of SDPA's CUDA kernels and of their backward ops (argument order, the stash, the saved
    tensors' metadata that checkpointing checks), run on meta tensors with SDPA's choice forced: what a
    CPU-only machine can check of the CUDA paths."""
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: int(choice))
    lin = nn.Linear(16, 16, device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 3, 21, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.empty(21, 21, device="meta", dtype=torch.bool) if masked else None

    def fn(t):
        q = lin(t)
        return F.scaled_dot_product_attention(q, t, t, attn_mask=mask)

    with OpRecorder() as forward:
        y = ckpt.checkpoint(fn, x, policy="save_attention", preserve_rng_state=False)
    assert y.shape == x.shape and y.device.type == "meta"
    with OpRecorder() as backward:
        dx, dw = torch.autograd.grad(y.sum(), (x, lin.weight))
    assert dx.shape == x.shape and dw.shape == lin.weight.shape
    assert forward.counts[op] == 1 and backward.counts[op] == 0 and backward.counts[op + "_backward"] == 1
    assert backward.counts["aten::addmm"] + backward.counts["aten::mm"] > 0  # the projection reran


def test_bench_host_overhead_runs():
    """The host-time check of the bench case (`python -m fusedrl.bench.cases.checkpointing --host`), once."""
    from fusedrl.bench.cases import checkpointing as case

    ms = case.host_overhead(rounds=1, warmup=0, policies=("full", "save_attention", "save_attention_sac"))
    assert set(ms) == {"full", "save_attention", "save_attention_sac"} and all(v > 0 for v in ms.values())
    assert F.scaled_dot_product_attention is STOCK_SDPA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels need a CUDA device")
@pytest.mark.parametrize("backend, op", [
    (SDPBackend.FLASH_ATTENTION, "aten::_scaled_dot_product_flash_attention"),
    (SDPBackend.EFFICIENT_ATTENTION, "aten::_scaled_dot_product_efficient_attention"),
    (SDPBackend.CUDNN_ATTENTION, "aten::_scaled_dot_product_cudnn_attention"),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_sdpa_backends_exact(backend, op, autocast):
    """On a GPU: each SDPA backend, bf16 (or fp32 under bf16 autocast), saved and replayed: the output
    bit-equal to no checkpointing, no attention forward in backward, and gradients as close to no
    checkpointing's as two runs of no checkpointing are to each other (bit-equal where the backward
    kernel is deterministic; flash and cuDNN backwards may accumulate dQ with atomics)."""
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    blocks = nn.Sequential(Block(d=128, heads=2), Block(d=128, heads=2)).to("cuda", dtype)
    x = torch.randn(2, 300, 128, device="cuda", dtype=dtype)
    runs = {}
    with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        try:
            blocks(x)
        except RuntimeError as exc:
            pytest.skip(f"{backend} cannot run here: {exc}")
        for policy in (*POLICIES, "none"):
            runs[policy if policy not in runs else "none again"] = grads_of(
                blocks, x, lambda t, p=policy: _each(blocks, t, p), count=True)
    assert runs["full"][2][op] == 2 and runs["save_attention"][2][op] == 0
    assert runs["save_attention"][2][op + "_backward"] == 2
    torch.testing.assert_close(runs["save_attention"][0], runs["none"][0], rtol=0, atol=0)
    ref, again, got = runs["none"][1], runs["none again"][1], runs["save_attention"][1]
    for name in ref:
        spread = (again[name].float() - ref[name].float()).abs().max().item()
        error = (got[name].float() - ref[name].float()).abs().max().item()
        assert error <= 4 * spread + 1e-3 * ref[name].float().abs().max().item(), (name, error, spread)
