"""The "save_attention" checkpointing policy without a dispatch mode: each checkpointed region keeps a
stash of its attention calls' outputs and log-sum-exps, and its recompute replays them.

`fusedrl.engine.checkpointing.checkpoint(fn, policy="save_attention")` runs non-reentrant
`torch.utils.checkpoint` with `context_fn=contexts`: two cheap context managers, one around the forward
(record) and one around the recompute in backward (replay), that only push the region on a thread-local
stack (regions nest: every region on the stack down to a blocker stashes the call, and a nested region whose
forward an enclosing region's recompute reruns takes it from that stash: `_route`) and, while any region is
active on any thread,
route two entry points through this module:
- `F.scaled_dot_product_attention` (looked up at call time by diffusers' AttnProcessor2_0, transformers'
  sdpa attention, nn.MultiheadAttention, fusedrl's own torch path): the module attribute is swapped for
  `_sdpa` on the first region's entry and restored on the last one's exit (a refcount under a lock;
  exactly the object that was there, unless someone replaced it meanwhile). Code that bound the function
  at import (`from torch.nn.functional import scaled_dot_product_attention`) is not seen: its attention
  is recomputed as under "full".
- `fusedrl.kernels.flash_attention` on its Triton path, through `kernels.attention.api.checkpoint_hook`.
Off a region's thread, or in a region of another policy nested inside (a "blocker"), both run as usual.

Why the forward goes through the stash Function too: non-reentrant checkpointing backpropagates
through the nodes of the *forward* graph; the recompute only re-creates the tensors those nodes saved,
matched to them by position (and checked by shape, dtype, device). So a recomputed attention call must
save exactly the tensors its forward call saved, in the same order: each served call runs one
autograd.Function (`_StashedSDPA`, or fusedrl's `FlashAttention`) in both passes - in the forward it
computes (out, lse) and stashes detached aliases of them (no copy), in the recompute it returns the
stashed pair instead of computing it. The forward node's backward then receives the recomputed q, k, v
and the stashed out and lse, and calls the attention backward op. The stash holds out and lse, and for
SDPA's CUDA backends the few bytes of bookkeeping their backward op takes (RNG seed / offset, sequence
lengths); nothing else.

Which SDPA calls are served (saved): SDPA's own fused kernels, chosen exactly as SDPA chooses them
(`torch._fused_sdp_choice` on the same inputs, under the same `sdpa_kernel` settings and autocast), so
that outputs and gradients equal the stock SDPA's bit for bit:
- CPU: the flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`), masks included (a bool mask
  becomes the same additive mask SDPA builds);
- CUDA: flash (head dim a multiple of 8, no mask), memory-efficient (masks too: SDPA's bool conversion and
  alignment padding are reproduced), cuDNN (no mask).
Everything else runs the stock SDPA and is recomputed in backward, as under "full": attention dropout
(dropout_p > 0: the recompute must draw the same random numbers as the forward, which a saved call
would not), a mask that requires grad, grouped-query attention (enable_gqa with fewer K/V heads),
nested tensors and tensor subclasses, calls with grad disabled or no input requiring grad, a cuDNN call
with a mask, and SDPA's math backend (which warns once: it has no log-sum-exp to save).

Every attention call of a region, served or not, takes one slot of the stash in call order, so the
recompute takes the same decisions as the forward without re-deriving them. A recompute that makes a
different call than its forward at some position (other shapes, dtype, flags), or more calls, raises a
RuntimeError; one that ends normally after fewer calls does too. A stashed output that was modified in
place after the forward (its version counter moved) is not replayed: that call is recomputed.

Cost per served call: one Python wrapper, `_fused_sdp_choice` and an autograd.Function, in the forward
and again in the recompute - nothing per other op. Per region and pass: two context-manager calls and
a refcounted swap of one module attribute (a lock and two setattr). The stash lives as long as the
region's checkpoint frame (until its backward is done, or the graph is freed); a second backward
(retain_graph=True) replays it again.
"""

from __future__ import annotations

import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from fusedrl.kernels.attention import api as _attention_api
from fusedrl.kernels.attention.op import FlashAttention

__all__ = ["Region", "active", "blocker_contexts", "contexts"]

# ---- regions, contexts and the thread-local stack -----------------------------------------------------

_FALLBACK, _SDPA, _FUSEDRL = range(3)  # what a stash slot holds


class _Entry:
    """One attention call of a region's forward, in call order."""

    __slots__ = ("backend", "extras", "kind", "lse", "out", "sig", "version")

    def __init__(self, kind: int, sig: tuple, backend: int = -1) -> None:
        self.kind, self.sig, self.backend = kind, sig, backend
        self.out = self.lse = self.extras = None
        self.version = 0

    def fresh(self) -> bool:
        """The stashed out has not been modified in place since the forward stashed it."""
        return self.out._version == self.version

    def nbytes(self) -> int:
        tensors = [self.out, self.lse, *(t for t in (self.extras or ()) if isinstance(t, torch.Tensor))]
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


class Region:
    """The attention stash of one checkpointed call: its attention calls in forward order; `cursor` is the
    next slot the recompute replays."""

    __slots__ = ("cursor", "entries")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.cursor = 0

    def nbytes(self) -> int:
        """Bytes of the distinct storages the stash holds (out, lse and bookkeeping)."""
        return sum(e.nbytes() for e in self.entries if e.out is not None)

    def take(self, sig: tuple) -> _Entry:
        """The slot of the recompute's next attention call, checked against the forward's call there."""
        i = self.cursor
        if i >= len(self.entries):
            raise RuntimeError(
                f"fusedrl checkpointing (policy 'save_attention'): the recompute of a checkpointed region made "
                f"more attention calls than its forward ({len(self.entries)}): call #{i + 1} is {_describe(sig)}. "
                "The checkpointed function must make the same attention calls each time it runs (no control flow "
                "that depends on state other than its inputs); use policy='full' for it otherwise.")
        entry = self.entries[i]
        if entry.sig != sig:
            raise RuntimeError(
                f"fusedrl checkpointing (policy 'save_attention'): the recompute of a checkpointed region made a "
                f"different attention call #{i + 1} than its forward: {_describe(sig)} in the recompute, "
                f"{_describe(entry.sig)} in the forward. The checkpointed function must make the same attention "
                "calls each time it runs; use policy='full' for it otherwise.")
        self.cursor = i + 1
        return entry


def _describe(sig: tuple) -> str:
    name, q, k = sig[0], tuple(sig[1]), tuple(sig[2])
    return f"{name}(q {list(q)}, k {list(k)}, {sig[4]}, flags {sig[5:]})"


class _Tls(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Context] = []


_tls = _Tls()


class _Context:
    """Entered around a region's forward (record) or its recompute (replay); re-enterable (torch enters
    the recompute context once per backward that needs the region). region None: a blocker, which keeps
    the attention calls of a nested region of another policy out of the enclosing region's stash."""

    __slots__ = ("region", "replay")

    def __init__(self, region: Region | None, replay: bool) -> None:
        self.region, self.replay = region, replay

    def __enter__(self) -> _Context:
        if self.replay and self.region is not None:
            self.region.cursor = 0
        _acquire()
        _tls.stack.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack = _tls.stack
        if stack and stack[-1] is self:
            stack.pop()
        else:  # exited out of order (should not happen): remove this one wherever it is
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is self:
                    del stack[i]
                    break
        _release()
        region = self.region
        # With checkpointing's early stop the recompute ends by an exception once every saved tensor is
        # back, possibly before the last attention calls: only a recompute that ran to its end is counted.
        if self.replay and region is not None and exc_type is None and region.cursor != len(region.entries):
            raise RuntimeError(
                f"fusedrl checkpointing (policy 'save_attention'): the recompute of a checkpointed region made "
                f"{region.cursor} attention calls, its forward {len(region.entries)}. The checkpointed function "
                "must make the same attention calls each time it runs; use policy='full' for it otherwise.")
        return False


def contexts() -> tuple[_Context, _Context]:
    """`context_fn` of "save_attention": (forward context, recompute context) of a new region."""
    region = Region()
    return _Context(region, False), _Context(region, True)


def blocker_contexts() -> tuple[_Context, _Context]:
    """`context_fn` part of a region of another policy nested in a "save_attention" region."""
    return _Context(None, False), _Context(None, True)


def active() -> bool:
    """A region (or blocker) is active on this thread."""
    return bool(_tls.stack)


def _route(stack: list[_Context]) -> tuple[Region | None, list[Region]]:
    """Where the attention call of the innermost region (stack[-1], not a blocker) comes from and goes:
    (source, records). source: the region whose stash replays it - the innermost region itself in its recompute,
    or an enclosing region in its recompute that a nested region recording its forward lies in (then the nested
    region's forward takes the call from the enclosing stash instead of computing it again); None: the call is
    computed. records: the regions in record mode above the source (or, without one, up to a blocker or the
    stack's bottom), innermost first: each keeps the call in its stash, so that its own recompute replays it."""
    top = stack[-1]
    if top.replay:
        return top.region, []
    records = [top.region]
    for ctx in reversed(stack[:-1]):
        if ctx.region is None:  # a blocker: the regions below keep out of its calls
            break
        if ctx.replay:
            return ctx.region, records
        records.append(ctx.region)
    return None, records


# ---- the swap ---------------------------------------------------------------------------------------

_swap_lock = threading.Lock()
_swap_count = 0
_original_sdpa = F.scaled_dot_product_attention  # what the wrapper falls back to (re-read at each swap)


def _acquire() -> None:
    global _swap_count, _original_sdpa
    with _swap_lock:
        if _swap_count == 0:
            current = F.scaled_dot_product_attention
            if current is not _sdpa:
                _original_sdpa = current
                F.scaled_dot_product_attention = _sdpa
            _attention_api.checkpoint_hook = _fusedrl_hook
        _swap_count += 1


def _release() -> None:
    global _swap_count
    with _swap_lock:
        _swap_count -= 1
        if _swap_count == 0:
            if F.scaled_dot_product_attention is _sdpa:  # leave a replacement made meanwhile in place
                F.scaled_dot_product_attention = _original_sdpa
            if _attention_api.checkpoint_hook is _fusedrl_hook:
                _attention_api.checkpoint_hook = None


# ---- fusedrl.kernels.flash_attention (Triton path) ----------------------------------------------------

def _fusedrl_hook(q, k, v, key_padding_mask, causal, scale, backend):
    stack = _tls.stack
    if not stack or stack[-1].region is None:
        return None
    source, records = _route(stack)
    sig = ("flash_attention", q.shape, k.shape, v.shape, q.dtype, q.device, key_padding_mask is None, causal, scale,
           backend)
    if source is not None:
        entry = source.take(sig)
        for region in records:
            region.entries.append(entry)
        if entry.kind == _FALLBACK or not entry.fresh():
            return None
        return FlashAttention.apply(q, k, v, key_padding_mask, causal, scale, backend, (entry.out, entry.lse))
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        entry = _Entry(_FALLBACK, sig)
        for region in records:
            region.entries.append(entry)
        return None
    out, lse = FlashAttention.apply(q, k, v, key_padding_mask, causal, scale, backend)
    entry = _Entry(_FUSEDRL, sig)
    entry.out, entry.lse, entry.version = out.detach(), lse.detach(), out._version
    for region in records:
        region.entries.append(entry)
    return out, lse


# ---- F.scaled_dot_product_attention -------------------------------------------------------------------

_CPU_FLASH, _CUDA_FLASH, _CUDA_EFFICIENT, _CUDA_CUDNN = range(10, 14)  # distinct from SDPBackend values
_FLASH, _EFFICIENT, _CUDNN, _MATH = (int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION),
                                     int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.MATH))
_math_warned = False


_fallback_warned: set[str] = set()


def _warn_fallback(reason: str) -> None:
    """Once per reason: a fused SDPA call that a 'save_attention' region recomputes instead of saving."""
    if reason in _fallback_warned:
        return
    _fallback_warned.add(reason)
    warnings.warn(f"fusedrl checkpointing: an attention call inside a 'save_attention' region is recomputed in "
                  f"backward as under 'full', not saved: {reason}. This warning is shown once.",
                  RuntimeWarning, stacklevel=5)


def _warn_math_attention() -> None:
    global _math_warned
    if _math_warned:
        return
    _math_warned = True
    warnings.warn(
        "fusedrl checkpointing: SDPA ran its math backend (bmm + softmax, no fused attention op) inside a "
        "'save_attention' region, so that attention is recomputed in backward as under 'full' (saving its "
        "[N, N] probabilities would undo the memory saving). Use a fused backend (no dropout on CPU, no "
        "attn_mask that requires grad, fp16/bf16 on CUDA) or fusedrl.kernels.flash_attention. "
        "This warning is shown once.",
        RuntimeWarning,
        stacklevel=4,
    )


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          **kwargs):
    """F.scaled_dot_product_attention while a "save_attention" region is active on some thread."""
    if not torch.compiler.is_compiling() and not kwargs:
        stack = _tls.stack
        if stack and stack[-1].region is not None:
            return _region_sdpa(stack, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, **kwargs)


_sdpa.__name__ = "scaled_dot_product_attention"
_sdpa.__qualname__ = "scaled_dot_product_attention"
_sdpa.__doc__ = F.scaled_dot_product_attention.__doc__


def _autocast(t, device_type: str, dtype: torch.dtype):
    """The cast autocast applies to SDPA's floating-point arguments (lower-precision policy; fp64 stays)."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _prepare(q, k, v, mask, is_causal, scale, enable_gqa, choose: bool):
    """(q, k, v, mask) as SDPA's fused kernel would receive them, and the backend (when `choose`); the
    backend is None when the stock SDPA must run (its reason: _MATH for the math backend)."""
    device_type = q.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (_autocast(t, device_type, dtype) for t in (q, k, v))
        mask = _autocast(mask, device_type, dtype)
    if not choose:
        return q, k, v, mask, None
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    except Exception:  # invalid inputs: the stock SDPA raises its own error
        return q, k, v, mask, None
    if device_type == "cpu":
        backend = _CPU_FLASH if choice == _FLASH else None
    elif choice == _FLASH:
        backend = _CUDA_FLASH if mask is None and q.shape[-1] % 8 == 0 else None  # no head-dim padding
        if backend is None:
            _warn_fallback("SDPA's flash kernel with a head dim that is not a multiple of 8 (SDPA pads it)")
    elif choice == _EFFICIENT:
        backend = _CUDA_EFFICIENT
    elif choice == _CUDNN:
        backend = _CUDA_CUDNN if mask is None else None
        if backend is None:
            _warn_fallback("SDPA chose its cuDNN kernel, as it does on Hopper, for a call with attn_mask; run the "
                           "model under torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION, "
                           "SDPBackend.EFFICIENT_ATTENTION]) to have masked calls served by the efficient kernel")
    else:
        backend = None
    if backend is None:
        return q, k, v, mask, (_MATH if choice == _MATH else None)
    return q, k, v, mask, backend


def _convert_mask(mask, q, k, backend: int):
    """SDPA's own mask preprocessing for the fused kernel (aten/src/ATen/native/transformers/attention.cpp):
    a bool mask becomes an additive one (-inf where False); the efficient kernel takes an 8-aligned bias
    expanded to [B, H, Nq, Nkv]."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.where(mask.logical_not(), -math.inf,
                           torch.scalar_tensor(0.0, dtype=q.dtype, device=mask.device))
    if backend == _CUDA_EFFICIENT:
        aligned = mask.stride(-1) == 1 and all(mask.stride(i) % 8 == 0 for i in range(mask.dim() - 1))
        if not aligned:
            last = mask.shape[-1]
            mask = F.pad(mask, (0, 8 - last % 8)).narrow(-1, 0, last)
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return mask


def _region_sdpa(stack: list[_Context], q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    source, records = _route(stack)
    sig = ("sdpa", q.shape, k.shape, v.shape, q.dtype, q.device,
           None if mask is None else (mask.shape, mask.dtype), dropout_p, is_causal, scale, enable_gqa)
    if source is not None:
        entry = source.take(sig)
        if entry.kind == _FALLBACK:
            for region in records:
                region.entries.append(entry)
            return _stock(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
        q, k, v, mask, _ = _prepare(q, k, v, mask, is_causal, scale, enable_gqa, choose=False)
        mask = _convert_mask(mask, q, k, entry.backend)
        if not entry.fresh():  # modified in place since: compute this call again
            entry = _Entry(_SDPA, sig, entry.backend)
        for region in records:
            region.entries.append(entry)
        return _StashedSDPA.apply(q, k, v, mask, entry.backend, is_causal, scale, entry)

    backend = None
    if (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and (mask is None or (type(mask) is torch.Tensor and not mask.requires_grad))
            and isinstance(dropout_p, (int, float)) and dropout_p == 0
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not (q.is_nested or k.is_nested or v.is_nested)
            and q.shape[-3:-2] == k.shape[-3:-2] == v.shape[-3:-2]):
        q2, k2, v2, mask2, backend = _prepare(q, k, v, mask, is_causal, scale, enable_gqa, choose=True)
    elif q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3] and torch.is_grad_enabled():
        _warn_fallback("grouped-query attention (fewer key / value heads than query heads)")
    if backend is None or backend == _MATH:
        if backend == _MATH:
            _warn_math_attention()
        entry = _Entry(_FALLBACK, sig)
        for region in records:
            region.entries.append(entry)
        return _stock(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    entry = _Entry(_SDPA, sig, backend)
    out = _StashedSDPA.apply(q2, k2, v2, _convert_mask(mask2, q2, k2, backend), backend, is_causal, scale, entry)
    for region in records:
        region.entries.append(entry)
    return out


def _stock(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    return _original_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)


_aten = torch.ops.aten


def _forward(backend: int, q, k, v, mask, is_causal: bool, scale):
    """-> (out, lse, extras for the backward op), as SDPA calls the kernel."""
    if backend == _CPU_FLASH:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                     scale=scale)
        return out, lse, None
    if backend == _CUDA_FLASH:
        og_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])  # SDPA passes a float
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=og_scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    if backend == _CUDA_EFFICIENT:
        out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, is_causal,
                                                                              scale=scale)
        return out, lse, (seed, offset)
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _backward(backend: int, dout, q, k, v, out, lse, mask, is_causal: bool, scale, extras, need):
    """(dq, dk, dv) by the backward op that SDPA's own autograd formula calls for that kernel."""
    if backend == _CPU_FLASH:
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    if backend == _CUDA_FLASH:
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        og_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=og_scale)
    if backend == _CUDA_EFFICIENT:
        seed, offset = extras
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, mask, out, lse, seed, offset, 0.0, [need[0], need[1], need[2], False], is_causal,
            scale=scale)
        return dq, dk, dv
    cum_q, cum_k, max_q, max_k, seed, offset = extras
    return _aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, is_causal, scale=scale)


class _StashedSDPA(torch.autograd.Function):
    """(q, k, v, mask, backend, is_causal, scale, entry) -> out: one of SDPA's fused kernels, run (forward:
    entry.out is None; the results are stashed on entry) or replayed (recompute: entry's out and lse are
    returned). Saves (q, k, v, out, lse, mask) either way; backward calls the kernel's backward op."""

    @staticmethod
    def forward(ctx, q, k, v, mask, backend, is_causal, scale, entry):
        if entry.out is None:
            out, lse, extras = _forward(backend, q, k, v, mask, is_causal, scale)
            entry.out, entry.lse, entry.extras, entry.version = out.detach(), lse, extras, out._version
        else:
            out, lse, extras = entry.out.detach(), entry.lse, entry.extras
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.spec = (backend, is_causal, scale, extras)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        backend, is_causal, scale, extras = ctx.spec
        dq, dk, dv = _backward(backend, dout, q, k, v, out, lse, mask, is_causal, scale, extras,
                               ctx.needs_input_grad[:3])
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None, None)
