"""fusedrl.engine.checkpointing: which forward ops rerun in backward under each policy (counted with a
TorchDispatchMode during loss.backward()), gradients equal to no checkpointing, RNG replay, offload,
the module wrapper, and the bytes each policy holds for backward. The save_attention stash itself
(nesting, threads, fallbacks, mismatches, third-party blocks) is tested in test_checkpointing_stash.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy

from fusedrl.engine import attention_stash
from fusedrl.engine import checkpointing as ckpt

from .op_recorder import OpRecorder

CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """A pre-norm transformer block; `attention(q, k, v)` takes and returns [B, H, N, Dh]."""

    def __init__(self, d: int = 32, heads: int = 4, dropout: float = 0.0, attention=sdpa):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, shift=None):
        B, N, D = x.shape
        h = self.norm1(x) if shift is None else self.norm1(x) + shift
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = self.attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.drop(self.proj(o))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class Model(nn.Module):
    def __init__(self, depth: int = 2, **kw):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(depth))
        self.head = nn.Linear(32, 1)

    def forward(self, x, *, shift=None):
        for block in self.blocks:
            x = block(x, shift=shift)
        return self.head(x)


def run(model, x, policy, **kw):
    """(output, counts of the ops run during backward, {name: grad} of x and the parameters)."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    y = ckpt.checkpoint(model, x, policy=policy, **kw)
    loss = (y.float() ** 2).sum()
    with OpRecorder() as rec:
        loss.backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return y.detach(), rec.counts, grads


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def model_x():
    torch.manual_seed(0)
    return Model(depth=2), torch.randn(2, 33, 32)


def test_full_reruns_attention_save_attention_does_not(model_x):
    model, x = model_x
    _, none, _ = run(model, x, "none")
    _, full, _ = run(model, x, "full")
    _, saved, _ = run(model, x, "save_attention")
    assert none[CPU_FLASH] == 0
    assert full[CPU_FLASH] == 2  # one attention forward per block reruns in the recompute
    assert saved[CPU_FLASH] == 0  # its output and LSE were saved
    for counts in (none, full, saved):  # the attention backward runs in every case
        assert counts[CPU_FLASH + "_backward"] == 2
    # everything else still reruns under save_attention: the projections and the MLP
    assert sum(saved[op] for op in MM_OPS) == sum(full[op] for op in MM_OPS) > sum(none[op] for op in MM_OPS)
    assert saved["aten::native_layer_norm"] == full["aten::native_layer_norm"] > 0


def test_save_attention_and_matmuls_runs_no_matmul_forward(model_x):
    model, x = model_x
    _, none, _ = run(model, x, "none")
    _, both, _ = run(model, x, "save_attention_and_matmuls")
    assert both[CPU_FLASH] == 0
    # The only matmuls in backward are the gradient matmuls that run without checkpointing too.
    for op in MM_OPS:
        assert both[op] == none[op], op
    assert both["aten::native_layer_norm"] == 4 and both["aten::gelu"] == 2  # the cheap ops rerun


@pytest.mark.parametrize("policy", ckpt.POLICIES)
def test_gradients_equal_no_checkpointing(model_x, policy):
    model, x = model_x
    y_ref, _, ref = run(model, x, "none")
    y, _, got = run(model, x, policy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert_same_grads(got, ref)


@pytest.mark.parametrize("policy", ckpt.POLICIES)
def test_dropout_replays_the_same_mask(policy):
    torch.manual_seed(0)
    model, x = Model(depth=2, dropout=0.3).train(), torch.randn(2, 17, 32)
    torch.manual_seed(123)
    y_ref, _, ref = run(model, x, "none")
    torch.manual_seed(123)
    y, _, got = run(model, x, policy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert_same_grads(got, ref)


def test_attention_with_dropout_is_recomputed_not_saved():
    """A saved op does not run in recompute; an attention op that draws random numbers would then leave
    the RNG stream of the recompute behind the forward's, so such calls are recomputed."""
    policy_fn = ckpt._POLICY_FNS["save_attention"]
    op = torch.ops.aten._scaled_dot_product_efficient_attention.default
    q = torch.zeros(1, 1, 4, 8)
    ctx = None
    assert policy_fn(ctx, op, q, q, q, None, True, 0.0) == CheckpointPolicy.MUST_SAVE
    assert policy_fn(ctx, op, q, q, q, None, True, 0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy_fn(ctx, op, q, q, q, None, True, dropout_p=0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    assert policy_fn(ctx, flash, q, q, q) == CheckpointPolicy.MUST_SAVE  # default dropout_p = 0
    assert policy_fn(ctx, flash, q, q, q, 0.2) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy_fn(ctx, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.PREFER_RECOMPUTE
    both = ckpt._POLICY_FNS["save_attention_and_matmuls"]
    assert both(ctx, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.MUST_SAVE


def test_math_backend_is_recomputed_with_one_warning(model_x, monkeypatch):
    """SDPA's math backend has no attention op: save_attention recomputes it (as full) and says so once."""
    monkeypatch.setattr(attention_stash, "_math_warned", False)
    model, x = model_x
    with sdpa_kernel(SDPBackend.MATH):
        _, none, ref = run(model, x, "none")
        _, full, _ = run(model, x, "full")
        with pytest.warns(RuntimeWarning, match="math backend"):
            _, saved, got = run(model, x, "save_attention")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(model, x, "save_attention")  # once per process
    assert none[CPU_FLASH] == full[CPU_FLASH] == saved[CPU_FLASH] == 0
    assert saved["aten::_safe_softmax"] == full["aten::_safe_softmax"] == 2  # the math attention reruns
    assert saved["aten::bmm"] == full["aten::bmm"] > none["aten::bmm"]
    assert_same_grads(got, ref)


def test_math_backend_with_matmuls_saves_the_bmms(model_x, monkeypatch):
    monkeypatch.setattr(attention_stash, "_math_warned", True)
    model, x = model_x
    with sdpa_kernel(SDPBackend.MATH):
        _, none, ref = run(model, x, "none")
        _, both, got = run(model, x, "save_attention_and_matmuls")
    assert both["aten::bmm"] == none["aten::bmm"]  # neither attention bmm reruns
    assert both["aten::_safe_softmax"] == 2  # the softmax reruns from the saved scores
    assert_same_grads(got, ref)


def test_fusedrl_flash_attention_public_function(model_x):
    """fusedrl.kernels.flash_attention, whatever path it takes here (on the CPU its torch path calls SDPA)."""
    from fusedrl.kernels import flash_attention

    torch.manual_seed(0)
    model, x = Model(depth=2, attention=lambda q, k, v: flash_attention(q, k, v)), torch.randn(2, 33, 32)
    _, none, ref = run(model, x, "none")
    _, full, _ = run(model, x, "full")
    _, saved, got = run(model, x, "save_attention")
    attention_ops = [name for name in full if name in ckpt.ATTENTION_OPS]
    assert attention_ops, f"no known attention op ran in recompute: {sorted(full)}"
    for name in attention_ops:
        assert full[name] == 2 and saved[name] == 0 and none[name] == 0, name
    assert_same_grads(got, ref)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_fusedrl_attention_op(backend, use_backend):
    """torch.ops.fusedrl.flash_attention_fwd, on every backend that calls it here."""
    import fusedrl.kernels  # noqa: F401  (registers the fusedrl ops)

    if not hasattr(torch.ops.fusedrl, "flash_attention_fwd"):
        pytest.skip("torch.ops.fusedrl.flash_attention_fwd is not registered (yet) in this build")
    from fusedrl.kernels import flash_attention

    use_backend(backend)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Model(depth=2, attention=lambda q, k, v: flash_attention(q, k, v)).to(device)
    x = torch.randn(2, 33, 32, device=device)
    try:
        _, none, ref = run(model, x, "none")
    except (RuntimeError, ValueError, TypeError) as exc:
        pytest.skip(f"FUSEDRL_BACKEND={backend} cannot run here: {exc}")
    _, full, _ = run(model, x, "full")
    _, saved, got = run(model, x, "save_attention")
    name = "fusedrl::flash_attention_fwd"
    if full[name] == 0:
        pytest.skip(f"flash_attention's {backend} path does not call {name} on {device}")
    assert full[name] == 2 and saved[name] == 0 and none[name] == 0
    assert_same_grads(got, ref)


# A custom op standing in for any attention op registered with register_attention_op (and for
# fusedrl's own op before it exists): returns (out, lse); its backward needs q, k, v, out, lse.
@torch.library.custom_op("fusedrl_ckpt_test::attn", mutates_args=())
def _test_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]) @ v, lse


@_test_attn.register_fake
def _(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


def _test_attn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _test_attn_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    scale = q.shape[-1] ** -0.5
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse[..., None])
    dv = p.transpose(-1, -2) @ dout
    dp = dout @ v.transpose(-1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-1, -2) @ q, dv


_test_attn.register_autograd(_test_attn_backward, setup_context=_test_attn_setup)


def test_registered_custom_attention_op(monkeypatch):
    """A registered op is saved by name: "save_attention" then runs on SAC (see register_attention_op)."""
    monkeypatch.setattr(ckpt, "_extra_attention_ops", set())  # the registration ends with the test
    ckpt.register_attention_op("fusedrl_ckpt_test::attn")
    torch.manual_seed(0)
    model = Model(depth=2, attention=lambda q, k, v: _test_attn(q, k, v)[0])
    x = torch.randn(2, 17, 32)
    _, none, ref = run(model, x, "none")
    _, full, _ = run(model, x, "full")
    _, saved, got = run(model, x, "save_attention")
    name = "fusedrl_ckpt_test::attn"
    assert full[name] == 2 and saved[name] == 0 and none[name] == 0
    assert_same_grads(got, ref)
    with pytest.raises(ValueError, match="namespace::op_name"):
        ckpt.register_attention_op("no_namespace")


def test_offload_packs_saved_tensors_to_cpu(model_x, monkeypatch):
    model, x = model_x
    packed = []
    original = ckpt._offload_pack

    def recording(t):
        out = original(t)
        packed.append((t, out))
        return out

    monkeypatch.setattr(ckpt, "_offload_pack", recording)
    _, _, ref = run(model, x, "none")
    _, counts, got = run(model, x, "offload")
    assert packed, "no saved tensor went through the offload hooks"
    assert all(out[1].device.type == "cpu" for _, out in packed)
    # Parameters (and views of them, as linear saves weight.t()) are never copied.
    weights = [out for t, out in packed if ckpt.input_offload.is_parameter(t)]
    assert weights and all(out[0] is None for out in weights)
    assert counts[CPU_FLASH] == 0  # no recompute
    assert_same_grads(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to offload from")
def test_offload_moves_cuda_activations_to_pinned_cpu(monkeypatch):
    torch.manual_seed(0)
    model, x = Model(depth=2).cuda(), torch.randn(2, 33, 32, device="cuda")
    packed = []
    original = ckpt._offload_pack
    monkeypatch.setattr(ckpt, "_offload_pack", lambda t: packed.append(original(t)) or packed[-1])
    _, _, ref = run(model, x, "none")
    _, _, got = run(model, x, "offload")
    moved = [p for p in packed if p[0] is not None]
    assert moved and all(p[0].type == "cuda" and p[1].device.type == "cpu" and p[1].is_pinned() for p in moved)
    assert_same_grads(got, ref)


def held_bytes(model, x, policy, monkeypatch) -> int:
    """Bytes of the distinct storages held for backward (inputs and parameters excluded): the tensors
    saved through the caller's saved-tensors hooks (autograd's, and SAC's) and the save_attention stash."""
    saved, regions = [], []

    def pack(t):
        saved.append(t)
        return t

    class Recorded(attention_stash.Region):
        def __init__(self):
            super().__init__()
            regions.append(self)

    monkeypatch.setattr(attention_stash, "Region", Recorded)
    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ckpt.checkpoint(model, x, policy=policy)
    skip = {t.untyped_storage().data_ptr() for t in [x, *model.parameters()]}
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    for region in regions:
        for entry in region.entries:
            for t in (entry.out, entry.lse):
                if t is not None:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    y.sum().backward()
    return sum(n for ptr, n in held.items() if ptr not in skip)


def test_saved_bytes_order(model_x, monkeypatch):
    """What each policy keeps between forward and backward (SAC routes its saved tensors through the
    caller's saved-tensors hooks; save_attention's stash is counted directly):
    none > save_attention_and_matmuls > save_attention > full."""
    if not ckpt._checkpoint_accepts_respect_hooks():
        pytest.skip("this torch's checkpoint has no respect_saved_tensors_hooks: SAC's saves are invisible")
    model, x = model_x
    got = {policy: held_bytes(model, x, policy, monkeypatch) for policy in ("none", "save_attention_and_matmuls",
                                                                "save_attention", "full")}
    assert got["none"] > got["save_attention_and_matmuls"] > got["save_attention"] > got["full"] == 0, got
    # save_attention keeps per attention call O [B, N, D] and the fp32 LSE [B, H, N]: 2 blocks.
    B, N, D, H = 2, 33, 32, 4
    assert got["save_attention"] == 2 * (B * N * D + B * H * N) * 4


def test_bad_policy_names_the_choices():
    with pytest.raises(ValueError, match="'none', 'full', 'save_attention', 'save_attention_and_matmuls', 'offload'"):
        ckpt.checkpoint(torch.sin, torch.ones(2), policy="selective")
    with pytest.raises(ValueError, match="save_attention"):
        ckpt.CheckpointWrapper(nn.Linear(2, 2), policy=3)
    wrapper = ckpt.CheckpointWrapper(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="offload"):
        wrapper.policy = "Full"
    with pytest.raises(ValueError, match="save_attention"):
        ckpt.apply_checkpointing(Model(), "bogus", module_types=Block)


def test_callable_policy_and_no_grad(model_x):
    model, x = model_x
    _, ref_counts, ref = run(model, x, "none")

    def save_layer_norms(ctx, op, *args, **kwargs):
        return op is torch.ops.aten.native_layer_norm.default

    _, counts, got = run(model, x, save_layer_norms)
    assert counts["aten::native_layer_norm"] == 0 and counts[CPU_FLASH] == 2
    assert_same_grads(got, ref)
    with torch.no_grad(), OpRecorder():
        y = ckpt.checkpoint(model, x, policy="save_attention")
    assert y.grad_fn is None


def test_function_kwargs_reach_fn_and_get_gradients():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 17, 32)
    shift = torch.randn(32, requires_grad=True)
    grads = {}
    for policy in ("none", "full", "save_attention"):
        shift.grad = None
        y = ckpt.checkpoint(block, x, policy=policy, shift=shift)
        y.square().sum().backward()
        grads[policy] = shift.grad.clone()
    torch.testing.assert_close(grads["full"], grads["none"])
    torch.testing.assert_close(grads["save_attention"], grads["none"])


@pytest.mark.parametrize("policy", ("full", "save_attention"))
def test_keyword_tensors_devices_reach_torch_checkpoint_positionally(policy, monkeypatch):
    """torch.utils.checkpoint restores the RNG state of its positional tensors' devices only; diffusers calls its
    blocks with keywords alone, so a GPU's dropout drew other masks in the recompute. A device only keyword
    tensors are on (meta here, standing in for cuda) reaches it as a positional marker, which fn never sees."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append([a.device.type for a in args if isinstance(a, torch.Tensor)])
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    w = torch.randn(4, 4, requires_grad=True)
    seen = []

    def fn(x=None, extra=None):
        seen.append((x.device.type, extra.device.type))
        return x @ w

    y = ckpt.checkpoint(fn, policy=policy, x=torch.randn(2, 4), extra=torch.empty(3, device="meta"))
    y.sum().backward()
    assert calls == [["meta"]] and seen[0] == ("cpu", "meta") and w.grad is not None
    calls.clear()
    ckpt.checkpoint(fn, torch.randn(2, 4), policy=policy, extra=torch.randn(3))  # the CPU's state is always kept
    assert calls == [["cpu"]]


def test_apply_checkpointing_wraps_in_place_and_undoes(model_x):
    model, x = model_x
    keys = list(model.state_dict())
    originals = list(model.blocks)
    _, _, ref = run(model, x, "none")

    names = ckpt.apply_checkpointing(model, "save_attention", module_types=Block)
    assert names == ["blocks.0", "blocks.1"]
    assert all(isinstance(b, ckpt.CheckpointWrapper) and b.module is o for b, o in zip(model.blocks, originals))
    assert list(model.state_dict()) == keys  # no wrapper prefix in the keys
    model.load_state_dict(model.state_dict())  # and loads them back
    assert model.blocks[0].heads == 4 and model.blocks[0].qkv is originals[0].qkv  # attributes pass through
    assert "policy='save_attention'" in repr(model)

    y, counts, got = run(model, x, "none")  # the blocks checkpoint themselves
    assert counts[CPU_FLASH] == 0 and counts["aten::native_layer_norm"] == 4
    assert_same_grads({k.replace("_checkpoint_wrapped_module.", ""): v for k, v in got.items()}, ref)

    # Applied again: the same wrappers get the new policy, none is wrapped twice.
    assert ckpt.apply_checkpointing(model, "full", module_types=Block) == names
    assert all(b.policy == "full" and not isinstance(b.module, ckpt.CheckpointWrapper) for b in model.blocks)
    _, counts, _ = run(model, x, "none")
    assert counts[CPU_FLASH] == 2

    # Kwargs reach the wrapped blocks (and their tensors get gradients).
    shift = torch.randn(32, requires_grad=True)
    model(x, shift=shift).sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0

    assert ckpt.remove_checkpointing(model) == names
    assert list(model.blocks) == originals and list(model.state_dict()) == keys


def test_apply_checkpointing_selection_rules(model_x):
    model, _ = model_x
    with pytest.raises(ValueError, match="module_types"):
        ckpt.apply_checkpointing(model)
    with pytest.raises(ValueError, match="no submodule"):
        ckpt.apply_checkpointing(model, module_types=nn.Conv2d)
    with pytest.raises(TypeError, match="module_types"):
        ckpt.apply_checkpointing(model, module_types="Block")
    # Outermost match only: Linear layers inside the chosen blocks are not wrapped again.
    names = ckpt.apply_checkpointing(model, module_types=(Block, nn.Linear))
    assert names == ["blocks.0", "blocks.1", "head"]
    # A predicate sees qualified names; the model itself is never wrapped.
    ckpt.remove_checkpointing(model)
    names = ckpt.apply_checkpointing(model, "full", predicate=lambda name, m: name in ("", "blocks.1"))
    assert names == ["blocks.1"]
    assert [n for n, _ in ckpt.iter_wrappers(model)] == ["blocks.1"]
    with pytest.raises(ValueError, match="already a CheckpointWrapper"):
        ckpt.CheckpointWrapper(model.blocks[1])


def test_apply_checkpointing_limit_wraps_the_first_blocks(model_x):
    """Partial checkpointing: the first `limit` chosen modules, in order; a lower limit applied again unwraps
    the rest; gradients unchanged; a limit above what is chosen is refused before anything is wrapped."""
    model, x = model_x
    _, _, ref = run(model, x, "none")
    with pytest.raises(ValueError, match=r"limit=3 .* but only 2 submodules .*blocks\.0 \.\.\. blocks\.1"):
        ckpt.apply_checkpointing(model, "full", module_types=Block, limit=3)
    assert not list(ckpt.iter_wrappers(model))  # refused before any change
    with pytest.raises(ValueError, match="limit must be >= 1"):
        ckpt.apply_checkpointing(model, "full", module_types=Block, limit=0)
    assert ckpt.apply_checkpointing(model, "save_attention", module_types=Block) == ["blocks.0", "blocks.1"]
    assert ckpt.apply_checkpointing(model, "full", module_types=Block, limit=1) == ["blocks.0"]
    assert [(n, w.policy) for n, w in ckpt.iter_wrappers(model)] == [("blocks.0", "full")]
    assert not isinstance(model.blocks[1], ckpt.CheckpointWrapper)
    y, counts, got = run(model, x, "none")
    assert counts[CPU_FLASH] == 1 and counts["aten::native_layer_norm"] == 2  # block 0 recomputed, block 1 not
    assert_same_grads({k.replace("_checkpoint_wrapped_module.", ""): v for k, v in got.items()}, ref)


def test_checkpoint_blocks_option_is_checked():
    """The trainers' memory.checkpoint_blocks: needs a policy, a positive count, at most the model's blocks (a
    ConfigError naming the field, from CheckpointingSection.apply_to)."""
    from fusedrl.engine.config import ConfigError

    with pytest.raises(ValueError, match="checkpoint_blocks needs gradient_checkpointing"):
        ckpt.CheckpointingSection(checkpoint_blocks=2)
    def stack(n: int) -> nn.Module:
        model = nn.Module()
        model.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))
        return model

    section = ckpt.CheckpointingSection(gradient_checkpointing="full", checkpoint_blocks=3)
    assert section.apply_to(stack(3), "the model", module_types=nn.Linear) == ["blocks.0", "blocks.1", "blocks.2"]
    with pytest.raises(ConfigError, match="memory.checkpoint_blocks: 3, but the model has 2 blocks"):
        section.apply_to(stack(2), "the model", module_types=nn.Linear)
    assert ckpt.CheckpointingSection().apply_to(stack(2), "the model", module_types=nn.Linear) == []
    for policy in ("none", "offload"):
        with pytest.raises(ValueError, match=f"offload_block_inputs needs .* recomputes .*, not {policy}"):
            ckpt.CheckpointingSection(gradient_checkpointing=policy, offload_block_inputs=True)
    assert ckpt.CheckpointingSection(gradient_checkpointing="save_attention", offload_block_inputs=True)


def test_torch_compile_traces_the_wrapped_blocks(model_x):
    """Under torch.compile (aot_eager: no C++ compiler needed) SAC marks the saved nodes; no graph break."""
    torch._dynamo.reset()
    model, x = model_x
    _, _, ref = run(model, x, "none")
    ckpt.apply_checkpointing(model, "save_attention", module_types=Block)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = x.clone().requires_grad_()
    (compiled(x).float() ** 2).sum().backward()
    got = {"x": x.grad, **{n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}}
    assert_same_grads(got, ref)
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["full", "save_attention"])
def test_transformers_decoder_layers_train_with_their_default_kv_cache(policy):
    """A transformers LM's training forward leaves use_cache at its default (True): checkpointed decoder layers run
    without the cache (the recomputation appended K/V to it a second time and backward failed), and the gradients
    equal those of the unwrapped model called with use_cache=False."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fusedrl.engine.checkpointing import apply_checkpointing

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    torch.manual_seed(0)
    ref_model = transformers.LlamaForCausalLM(cfg).train()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ref_model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    apply_checkpointing(model, policy, module_types=LlamaDecoderLayer)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
