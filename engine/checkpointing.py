"""Activation checkpointing that keeps the attention forward: save each attention call's output and
log-sum-exp, recompute everything else in backward.

Reward backpropagation (AlignProp / DRaFT / ReFL) holds K denoiser steps, a VAE decode and a ViT
reward in one autograd graph, and LLM GRPO holds long sequences: gradient checkpointing keeps them in
memory. Plain `torch.utils.checkpoint` reruns every op of a block in backward, the attention forward
included - the most expensive op of a long-sequence block. A flash-style attention needs for its
backward only its output O and the fp32 row log-sum-exp (plus Q, K, V, which the cheap projections
recompute). Saving those two per attention call costs O(N D) per call, next to the O(N D) per op that
checkpointing already drops, and skips the attention forward in backward.

Policies (`POLICIES`):
- "none": no checkpointing; `fn` runs as is.
- "full": plain non-reentrant `torch.utils.checkpoint`: only the region's inputs are kept, every op
  reruns in backward.
- "save_attention": non-reentrant checkpointing whose `context_fn` (`attention_stash.contexts`) gives the
  region an attention stash, with no dispatch mode: in the forward each attention call of the region
  runs as usual and stashes (out, lse) - detached aliases, no copy; in the recompute each one returns its
  stashed pair through the same autograd.Function instead of running the attention forward, and the
  backward calls the attention backward op. Everything else is recomputed. Served: calls of
  `F.scaled_dot_product_attention` (swapped while a region is active, so diffusers' AttnProcessor2_0,
  transformers' sdpa attention and nn.MultiheadAttention are seen; SDPA's own fused kernel runs, the one
  SDPA would choose, so outputs and gradients equal the stock SDPA's bit for bit) and
  `fusedrl.kernels.flash_attention` (its Triton path; its torch path calls SDPA). See
  `fusedrl.engine.attention_stash` for which SDPA inputs are served; the others are recomputed as under
  "full". Regions nest (each enclosing "save_attention" region stashes a call too, so a nested region's
  forward rerun by the outer recompute replays it; a nested region of another policy keeps its calls to
  itself) and are per thread. Under torch.compile, or once `register_attention_op` has
  registered an op, "save_attention" runs on SAC instead, as "save_attention_and_matmuls" does.
- "save_attention_and_matmuls": selective activation checkpointing (`create_selective_checkpoint_contexts`):
  the outputs of the fused attention ops (`ATTENTION_OPS`: SDPA's flash / efficient / cuDNN / CPU-flash
  backends, `aten._flash_attention_forward`, `aten._efficient_attention_forward`,
  `torch.ops.fusedrl.flash_attention_fwd`, flash-attn's `torch.ops.flash_attn._flash_attn_forward` /
  `_flash_attn_varlen_forward`, FlashAttention-3's `torch.ops.flash_attn_3.fwd`) and of the matmuls
  (`MATMUL_OPS`: aten.mm, addmm, bmm, baddbmm, ...) are saved (`CheckpointPolicy.MUST_SAVE`), so backward
  recomputes only the cheap elementwise ops and norms.
- "offload": no recompute; every tensor saved for backward is copied to pinned CPU memory during the
  forward and back in backward (`torch.autograd.graph.save_on_cpu`, except that tensors already on
  the CPU and parameters - or views of them - stay where they are, since copying them saves nothing).
- a callable `policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy`: SAC with that policy.
With a recomputing policy, `offload_inputs=True` (`checkpoint`, `CheckpointWrapper`, `apply_checkpointing`) also
keeps the region's activation inputs in pinned CPU memory between forward and backward
(`fusedrl.engine.input_offload`), so that a checkpointed model holds nothing per block on the GPU.

SAC ops are matched by name (`op._schema.name`), so nothing is resolved at import and ops registered
later (fusedrl's attention op, flash-attn imported after fusedrl) are recognised when they run.
`register_attention_op("ns::name")` adds another attention op.

Caveats, by design:
- SDPA's math backend (on the CPU: attention dropout; on CUDA: an attn_mask that requires grad, or a
  head dim / dtype no fused backend takes; anywhere: `sdpa_kernel(SDPBackend.MATH)`) decomposes into
  bmm / softmax / bmm with no log-sum-exp to save. Saving its [N, N] probabilities would give back
  most of the memory that checkpointing exists to save, so "save_attention" recomputes it there,
  exactly like "full", and warns once. Hand-written attention (`softmax(q @ k.T) @ v`) is likewise
  recomputed, without a warning. "save_attention_and_matmuls" saves the math path's two bmm outputs,
  the [N, N] scores included.
- An attention call with dropout (`dropout_p > 0`) draws random numbers; a saved call does not run in
  recompute, which would shift the RNG stream that later random ops of the region replay. Such calls
  are recomputed instead, so the recompute stays bit-identical to the forward.
- RNG state is stashed and restored as `torch.utils.checkpoint` does (`preserve_rng_state=True`), so
  dropout masks drawn in recompute equal the forward's.
- "save_attention" does not see flash-attn's functions or attention called through a name bound at import
  (`from torch.nn.functional import scaled_dot_product_attention`): those calls are recomputed. SAC sees
  flash-attn >= 2.7's ops; flash-attn < 2.7 calls its CUDA extension outside the dispatcher, and those
  calls are recomputed under every policy.
- The stash is not routed through an enclosing `saved_tensors_hooks` (e.g. `save_on_cpu`); SAC's saved
  outputs are (`respect_saved_tensors_hooks`).

Cost (host time): "save_attention" adds per region and pass two context-manager calls and a refcounted
swap of one module attribute, and per served attention call a Python wrapper, `torch._fused_sdp_choice`
and an autograd.Function - nothing per other op. Measured with `python -m fusedrl.bench.cases.checkpointing
--host` (72 regions of one attention call each, every op tiny, one thread of a loaded 2-core VM):
~0.2 ms per region over "full", against ~2.6 ms per region for the same policy on SAC. The SAC policies
("save_attention_and_matmuls", callables) run the region under PyTorch's two SAC dispatch modes (forward
and recompute), a Python call per aten op: measured ~20 us of host time per op and pass (a 28-op block,
torch 2.14, one core of a 2-core Xeon VM) on top of "full". On a GPU it is hidden where the ops are large
(a DiT block over 4096 tokens: ~60 us per matmul) and shows where they are small (a ViT over 257 tokens
at batch 1): choose the policy per submodule (`apply_checkpointing` on each), or use torch.compile, under
which SAC only marks graph nodes and costs nothing per call.

Memory: "save_attention" holds, beyond "full", each attention call's out and lse (for SDPA's CUDA kernels
also their RNG seed / offset scalars) until the region's backward is done.

Equivalent PyTorch ("save_attention", up to the stash): SAC with the attention ops saved,
    ops = [torch.ops.aten._scaled_dot_product_flash_attention.default, ...]
    torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, ops))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from . import attention_stash, input_offload
from .config import ConfigError, field, gt

__all__ = [
    "ATTENTION_OPS",
    "MATMUL_OPS",
    "POLICIES",
    "BlockLimitError",
    "CheckpointWrapper",
    "apply_checkpointing",
    "checkpoint",
    "iter_wrappers",
    "register_attention_op",
    "remove_checkpointing",
]

POLICIES = ("none", "full", "save_attention", "save_attention_and_matmuls", "offload")

# Fused attention ops whose outputs (O, LSE and, for some, RNG seed/offset and sequence offsets) are
# all that their backward needs besides Q, K, V. Matched by schema name: nothing is resolved at import.
ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
    "fusedrl::flash_attention_fwd",
    "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward",
    "flash_attn_3::fwd",
})

# Matmul-like ops saved by "save_attention_and_matmuls" (linear and matmul decompose into these below
# autograd; they are listed for backends that keep them whole).
MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm", "aten::baddbmm", "aten::addbmm",
    "aten::mv", "aten::addmv", "aten::_scaled_mm", "aten::_int_mm", "aten::linear", "aten::matmul",
})

# Only SDPA's math backend calls this op (torch >= 2.5): its presence means "attention ran unfused".
_MATH_SDPA_SIGNATURE = "aten::_safe_softmax"
_DROPOUT_ARGS = ("dropout_p", "p_dropout")

_extra_attention_ops: set[str] = set()
_lock = threading.Lock()

# Kinds of op, as the policy functions classify them (memoized per OpOverload).
_OTHER, _ATTENTION, _MATMUL, _MATH_SOFTMAX = range(4)
_op_kinds: dict[Any, tuple[int, int | None]] = {}


def register_attention_op(name: str) -> None:
    """Treat the op named `name` ("namespace::op", e.g. "mylib::attn_fwd") as an attention op whose
    outputs "save_attention" keeps. Its outputs must be what its backward needs besides its inputs.

    A stash cannot replay an arbitrary op without a dispatch mode: once an op is registered,
    "save_attention" runs on SAC (per-op host cost, see the module docstring) for the rest of the process."""
    if not isinstance(name, str) or "::" not in name:
        raise ValueError(f"name must be 'namespace::op_name' (as in the op's schema), got {name!r}")
    with _lock:
        _extra_attention_ops.add(name)
        _op_kinds.clear()


def _schema_name(op) -> str | None:
    schema = getattr(op, "_schema", None)  # higher-order ops (under torch.compile) have none
    return None if schema is None else schema.name


def _classify(op) -> tuple[int, int | None]:
    """(kind, position of the op's dropout argument or None), memoized per op."""
    found = _op_kinds.get(op)
    if found is not None:
        return found
    name = _schema_name(op)
    dropout_at = None
    if name in ATTENTION_OPS or name in _extra_attention_ops:
        kind = _ATTENTION
        for i, arg in enumerate(op._schema.arguments):
            if arg.name in _DROPOUT_ARGS:
                dropout_at = i
                break
    elif name in MATMUL_OPS:
        kind = _MATMUL
    elif name == _MATH_SDPA_SIGNATURE:
        kind = _MATH_SOFTMAX
    else:
        kind = _OTHER
    _op_kinds[op] = found = (kind, dropout_at)
    return found


def _has_dropout(op, dropout_at: int | None, args: tuple, kwargs: dict) -> bool:
    if dropout_at is None:
        return False
    name = op._schema.arguments[dropout_at].name
    value = kwargs[name] if name in kwargs else args[dropout_at] if dropout_at < len(args) else 0.0
    return isinstance(value, (int, float)) and value > 0


# One warning for both implementations (SAC here, the stash in attention_stash).
_warn_math_attention = attention_stash._warn_math_attention


def _sac_policy(save_matmuls: bool) -> Callable:
    """The selective-checkpoint policy function of "save_attention" (/ "_and_matmuls")."""

    def policy_fn(ctx, op, *args, **kwargs):
        kind, dropout_at = _classify(op)
        if kind == _ATTENTION:
            if _has_dropout(op, dropout_at, args, kwargs):
                return CheckpointPolicy.PREFER_RECOMPUTE  # keeps the RNG stream of the recompute aligned
            return CheckpointPolicy.MUST_SAVE
        if kind == _MATMUL and save_matmuls:
            return CheckpointPolicy.MUST_SAVE
        if kind == _MATH_SOFTMAX:
            _warn_math_attention()
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy_fn


_POLICY_FNS = {"save_attention": _sac_policy(False), "save_attention_and_matmuls": _sac_policy(True)}


def _validate_policy(policy) -> str | Callable:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(repr(p) for p in POLICIES)} or a callable "
                             f"policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy; got {policy!r}")
        return policy
    if callable(policy):
        return policy
    raise ValueError(f"policy must be one of {', '.join(repr(p) for p in POLICIES)} or a callable "
                     f"policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy; got {type(policy).__name__}")


# Read once at import (a signature, not an op): inspect.signature under torch.compile would graph-break.
_RESPECTS_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters


def _checkpoint_accepts_respect_hooks() -> bool:
    return _RESPECTS_HOOKS


# ---- offload -------------------------------------------------------------------------------------

def _offload_pack(t: torch.Tensor):
    """Copy a saved tensor to (pinned, when CUDA is available) CPU memory; tensors already on the CPU
    and parameters (which stay on the device anyway) are kept as they are."""
    if t.device.type == "cpu" or input_offload.is_parameter(t):
        return (None, t)
    pin = torch.cuda.is_available() and not t.is_sparse
    packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
    # Non-blocking into pinned memory: the copy is queued on the current stream, before any kernel that
    # could reuse t's memory after t is freed.
    packed.copy_(t, non_blocking=pin)
    return (t.device, packed)


def _offload_unpack(packed) -> torch.Tensor:
    device, t = packed
    if device is None:
        return t
    return t.to(device, non_blocking=t.is_pinned())


def _offload_hooks() -> torch.autograd.graph.saved_tensors_hooks:
    # Looked up at call time (not bound at import) so that the pack function can be observed in tests.
    return torch.autograd.graph.saved_tensors_hooks(
        lambda t: _offload_pack(t), lambda p: _offload_unpack(p))


# ---- the function --------------------------------------------------------------------------------

RECOMPUTING = ("full", "save_attention", "save_attention_and_matmuls")  # the policies offload_inputs goes with
_TORCH_CHECKPOINT_KEYWORDS = ("determinism_check", "debug", "early_stop")


def _rng_devices_positional(fn: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple]:
    """torch.utils.checkpoint saves and restores the RNG state of the devices of its positional tensors only: a block
    called with keywords alone (diffusers' blocks: `block(hidden_states=..., temb=...)`) had its CUDA RNG state
    left as the forward moved it, so dropout drew other masks in the recompute (wrong gradients, on a GPU only).
    Devices that only keyword tensors are on get an empty tensor passed positionally, which `fn` never sees."""
    have = set(input_offload.accelerator_devices(args))
    markers = input_offload.device_markers([d for d in input_offload.accelerator_devices(kwargs) if d not in have])
    if not markers:
        return fn, args
    n = len(markers)

    def call_without_markers(*args_: Any, **kwargs_: Any) -> Any:
        return fn(*args_[n:], **kwargs_)

    return call_without_markers, markers + tuple(args)


def checkpoint(fn: Callable, *args: Any, policy: str | Callable = "save_attention",
               preserve_rng_state: bool = True, offload_inputs: bool = False, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, with the activations it saves for backward chosen by `policy`.

    Args:
        fn: any function or module; args and kwargs may hold tensors (those in kwargs are not detached
            in recompute, as in `torch.utils.checkpoint`) and it may return any structure.
        policy: one of `POLICIES` ("none", "full", "save_attention", "save_attention_and_matmuls",
            "offload"; see the module docstring), or a selective-checkpoint policy function
            `policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy | bool` as
            `torch.utils.checkpoint.create_selective_checkpoint_contexts` takes.
        preserve_rng_state: stash and restore the CPU/CUDA RNG state around the recompute, so random
            ops (dropout) draw the same numbers as in the forward.
        offload_inputs: keep the region's activation inputs in pinned CPU memory between forward and
            backward (`fusedrl.engine.input_offload`: copies on a side stream, the next region's brought
            back while this one's backward runs), so that nothing per region stays on the GPU; with a
            recomputing policy (`RECOMPUTING` or a policy function). Not under torch.compile.

    Returns: what `fn` returns. With grad disabled (or policy "none") `fn` simply runs.

    Equivalent PyTorch: `torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
    context_fn=partial(create_selective_checkpoint_contexts, policy_fn), **kwargs)` ("save_attention":
    `context_fn=attention_stash.contexts`, no dispatch mode; "full": no context_fn; "offload":
    `with torch.autograd.graph.save_on_cpu(pin_memory=True): fn(*args)`).
    The "policy" and "preserve_rng_state" keywords (and torch.utils.checkpoint's own: "determinism_check",
    "early_stop", ...) are not passed on to `fn`; "debug=True" works with "full" and "offload" only (torch
    refuses it with a context_fn).
    """
    policy = _validate_policy(policy)
    _check_offload(policy, offload_inputs)
    if policy == "none" or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if policy == "offload":
        with _offload_hooks():
            return fn(*args, **kwargs)
    if preserve_rng_state and kwargs:
        fn, args = _rng_devices_positional(fn, args, kwargs)
    options: dict[str, Any] = {}
    # Under torch.compile the selective policies run on SAC, which there only marks graph nodes (no
    # per-op cost) and which the compiler requires of a context_fn; nothing thread-local is touched.
    compiling = _compiling()
    if policy == "save_attention" and not compiling and not _extra_attention_ops:
        options["context_fn"] = attention_stash.contexts
    elif policy == "full":
        if not compiling and attention_stash.active():
            # nested in a save_attention region: keep its attention calls out of that region's stash
            options["context_fn"] = attention_stash.blocker_contexts
    else:
        policy_fn = _POLICY_FNS[policy] if isinstance(policy, str) else policy
        sac = functools.partial(create_selective_checkpoint_contexts, policy_fn)
        options["context_fn"] = _with_blocker(sac) if not compiling and attention_stash.active() else sac
        if _checkpoint_accepts_respect_hooks():
            # Route the tensors that SAC saves through the caller's saved-tensors hooks (e.g. an outer
            # save_on_cpu), as autograd's own saved tensors are; torch will default to this later.
            options["respect_saved_tensors_hooks"] = True
    if offload_inputs and not compiling:  # (under torch.compile the inputs stay: the run's summary line says so)
        options.update((k, kwargs.pop(k)) for k in _TORCH_CHECKPOINT_KEYWORDS if k in kwargs)
        return input_offload.run_offloaded(torch.utils.checkpoint.checkpoint, fn, args, kwargs, use_reentrant=False,
                                           preserve_rng_state=preserve_rng_state, **options)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             preserve_rng_state=preserve_rng_state, **options, **kwargs)


def _check_offload(policy: str | Callable, offload_inputs: bool) -> None:
    if offload_inputs and isinstance(policy, str) and policy not in RECOMPUTING:
        raise ValueError(f"offload_inputs needs a policy that recomputes ({', '.join(RECOMPUTING)} or a policy "
                         f"function), got {policy!r}")


def _compiling() -> bool:
    """Under torch.compile (dynamo), or under AOTAutograd / export tracing (a proxy dispatch mode is active:
    the test torch.utils.checkpoint makes before it requires dispatch modes of a context_fn)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    except AttributeError:  # a torch without that query
        return False


class _Both:
    """Enters two context managers (SAC's dispatch mode, then a stash blocker), exits them in reverse."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)
        return False


def _with_blocker(sac_context_fn: Callable) -> Callable:
    def context_fn():
        fwd, rec = sac_context_fn()
        block_fwd, block_rec = attention_stash.blocker_contexts()
        return _Both(fwd, block_fwd), _Both(rec, block_rec)

    return context_fn


# ---- modules -------------------------------------------------------------------------------------

_WRAPPED = "_checkpoint_wrapped_module"  # torch's checkpoint_wrapper uses the same name (accelerate knows to
_PREFIX = _WRAPPED + "."                 # strip it; peft's adapter state dict does not: `wrappers_lifted`)


def unwrapped_name(name: str) -> str:
    """A parameter / module name as it reads without checkpoint wrappers ("blocks.0._checkpoint_wrapped_module.fc"
    -> "blocks.0.fc"), so names do not depend on the checkpointing policy."""
    return name.replace(_PREFIX, "")


def _strip_prefix_hook(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)
    return state_dict


def _add_prefix_hook(state_dict, prefix, *args, **kwargs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


class CheckpointWrapper(nn.Module):
    """Runs `module` under `checkpoint(module, ..., policy=policy)`.

    The wrapper is transparent: `state_dict()` keys are the wrapped module's (the wrapper adds no
    prefix, and loads such state dicts), attributes the wrapper lacks are read from the wrapped
    module, and `.module` is the wrapped module. Positional and keyword arguments are passed through.
    The policy can be changed at any time (`wrapper.policy = "full"`); it is validated on assignment.
    """

    def __init__(self, module: nn.Module, policy: str | Callable = "save_attention", *,
                 preserve_rng_state: bool = True, offload_inputs: bool = False) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, CheckpointWrapper):
            raise ValueError("module is already a CheckpointWrapper; set its .policy instead of wrapping twice")
        super().__init__()
        setattr(self, _WRAPPED, module)
        self.policy = policy
        self.preserve_rng_state = preserve_rng_state
        self.offload_inputs = offload_inputs
        self._register_state_dict_hook(_strip_prefix_hook)
        self._register_load_state_dict_pre_hook(_add_prefix_hook)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "policy":
            value = _validate_policy(value)
        super().__setattr__(name, value)

    @property
    def module(self) -> nn.Module:
        return self._modules[_WRAPPED]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            _drop_kv_cache(kwargs)
        return checkpoint(self._modules[_WRAPPED], *args, policy=self.policy,
                          preserve_rng_state=self.preserve_rng_state, offload_inputs=self.offload_inputs, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == _WRAPPED:
                raise
            return getattr(self._modules[_WRAPPED], name)

    def __getitem__(self, index):  # wrapped nn.Sequential / ModuleList stay indexable
        return self._modules[_WRAPPED][index]

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}" + (", offload_inputs=True" if self.offload_inputs else "")


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")  # "cache": transformers >= 5.2x
_said_cache = False


def _is_kv_cache(name: str, value: Any) -> bool:
    if value is None:
        return False
    if name != "cache":
        return True
    cache_utils = sys.modules.get("transformers.cache_utils")  # a generic name: only transformers' Cache objects
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _drop_kv_cache(kwargs: dict) -> None:
    """A checkpointed transformers decoder layer called with a KV cache (use_cache defaults to True, also in
    training) would append its keys and values to it twice, once more in the recomputation: the cache is left out of
    training calls, as transformers' own gradient checkpointing does (its GradientCheckpointingLayer)."""
    global _said_cache
    dropped = [k for k in _CACHE_KWARGS if _is_kv_cache(k, kwargs.get(k))]
    for k in dropped:
        kwargs[k] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
        dropped.append("use_cache")
    if dropped and not _said_cache:
        _said_cache = True
        logging.getLogger("fusedrl").warning(
            "fusedrl checkpointing: training calls of checkpointed layers run without their KV cache (%s), which "
            "the recomputation would fill twice; pass use_cache=False to say so", ", ".join(dropped))


def _selector(module_types, predicate) -> Callable[[str, nn.Module], bool]:
    if module_types is None and predicate is None:
        raise ValueError("give module_types (a class or tuple of classes, e.g. your transformer block) "
                         "or predicate(name, module) -> bool to choose the submodules to checkpoint")
    if module_types is not None:
        types = (module_types,) if isinstance(module_types, type) else tuple(module_types)
        if not types or not all(isinstance(t, type) for t in types):
            raise TypeError(f"module_types must be a class or a non-empty tuple of classes, got {module_types!r}")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be callable(name, module) -> bool, got {type(predicate).__name__}")

    def chosen(name: str, module: nn.Module) -> bool:
        return ((module_types is not None and isinstance(module, types))
                or (predicate is not None and bool(predicate(name, module))))

    return chosen


class BlockLimitError(ValueError):
    """apply_checkpointing's `limit` asks for more modules than are chosen (`chosen` of them)."""

    def __init__(self, message: str, chosen: int) -> None:
        super().__init__(message)
        self.chosen = chosen


def apply_checkpointing(model: nn.Module, policy: str | Callable = "save_attention", *,
                        module_types: type | Sequence[type] | None = None,
                        predicate: Callable[[str, nn.Module], bool] | None = None,
                        preserve_rng_state: bool = True, limit: int | None = None,
                        offload_inputs: bool = False) -> list[str]:
    """Wrap, in place, the submodules of `model` chosen by `module_types` (isinstance) or
    `predicate(qualified_name, module)` in `CheckpointWrapper(policy=policy)`.

    Rules: the outermost chosen module of a branch is wrapped and nothing inside it (checkpoints do
    not nest); `model` itself is never wrapped (wrap it with `CheckpointWrapper` yourself). Applied
    again, a submodule that is already wrapped and still chosen gets the new policy - never a second
    wrapper. `remove_checkpointing(model)` undoes it.

    `offload_inputs`: the wrappers keep their blocks' activation inputs in CPU memory between forward and
    backward (`checkpoint`'s option of that name).

    `limit`: wrap only the first `limit` chosen modules, in the model's order (partial checkpointing:
    each block left out keeps its activations and skips its recomputation, so memory buys time); chosen
    modules past it are left unwrapped (and unwrapped, if an earlier call wrapped them). BlockLimitError (a
    ValueError) when
    fewer than `limit` modules are chosen.

    Returns: the qualified names of the wrapped (or re-policied) submodules. Raises ValueError when
    none is chosen (checkpointing nothing would silently keep all the memory).
    """
    _validate_policy(policy)
    _check_offload(policy, offload_inputs)
    if limit is not None and limit < 1:
        raise ValueError(f"apply_checkpointing: limit must be >= 1 (or None: every chosen module), got {limit}")
    chosen = _selector(module_types, predicate)
    found: list[tuple[nn.Module, str, str, nn.Module]] = []  # (parent, attribute, qualified name, child)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qualified = f"{prefix}{name}"
            wrapped = isinstance(child, CheckpointWrapper)
            if chosen(qualified, child.module if wrapped else child):
                found.append((parent, name, qualified, child))
            elif not wrapped:  # never nest a checkpoint inside another
                visit(child, qualified + ".")

    visit(model, "")
    if not found:
        raise ValueError(f"apply_checkpointing: no submodule of {type(model).__name__} matched module_types="
                         f"{module_types!r} / predicate={predicate!r}")
    if limit is not None and len(found) < limit:
        raise BlockLimitError(f"apply_checkpointing: limit={limit} (memory.checkpoint_blocks in the trainers) but "
                              f"only {len(found)} submodules of {type(model).__name__} are chosen "
                              f"({found[0][2]} ... {found[-1][2]})", len(found))
    done: list[str] = []
    for i, (parent, name, qualified, child) in enumerate(found):
        wrapped = isinstance(child, CheckpointWrapper)
        if limit is not None and i >= limit:
            if wrapped:  # wrapped by an earlier call: past the limit now
                setattr(parent, name, child.module)
        elif wrapped:
            child.policy = policy
            child.preserve_rng_state = preserve_rng_state
            child.offload_inputs = offload_inputs
            done.append(qualified)
        else:
            setattr(parent, name, CheckpointWrapper(child, policy, preserve_rng_state=preserve_rng_state,
                                                    offload_inputs=offload_inputs))
            done.append(qualified)
    return done


def _lift_wrappers(model: nn.Module) -> list[tuple[str, nn.Module, str, CheckpointWrapper]]:
    """Replace every `CheckpointWrapper` inside `model` by the module it wraps; (qualified name, parent, attribute
    name, wrapper) of each, outermost first."""
    lifted: list[tuple[str, nn.Module, str, CheckpointWrapper]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}{name}"
            if isinstance(child, CheckpointWrapper):
                setattr(parent, name, child.module)
                lifted.append((qualified, parent, name, child))
                child = child.module
            visit(child, qualified + ".")

    visit(model, "")
    return lifted


def remove_checkpointing(model: nn.Module) -> list[str]:
    """Undo `apply_checkpointing`: replace every `CheckpointWrapper` inside `model` by the module it
    wraps. Returns the qualified names of the unwrapped submodules."""
    return [qualified for qualified, *_ in _lift_wrappers(model)]


@contextlib.contextmanager
def wrappers_lifted(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every `CheckpointWrapper` in `model` is out of the module tree (its module in its place, the same
    parameters), and back on exit. For code that matches `named_modules()` against `state_dict()` keys, which the
    wrappers strip of their prefix and module names keep: peft's adapter state dict (`save_pretrained`,
    `get_peft_model_state_dict`) found no LoRA layer inside a checkpointed block and saved an adapter without them.
    Not under FSDP2 (the sharded layers must stay where fully_shard put them)."""
    lifted = _lift_wrappers(model)
    try:
        yield model
    finally:
        for _, parent, name, wrapper in reversed(lifted):
            setattr(parent, name, wrapper)


def iter_wrappers(model: nn.Module) -> Iterable[tuple[str, CheckpointWrapper]]:
    """(qualified name, wrapper) of every CheckpointWrapper inside `model`."""
    for name, module in model.named_modules():
        if isinstance(module, CheckpointWrapper):
            yield name, module


@dataclass
class CheckpointingSection:
    """The trainers' activation-checkpointing options (their `memory` sections extend it)."""

    gradient_checkpointing: Literal[POLICIES] = field(
        "none", "activation checkpointing of the model's blocks (a denoiser's transformer or UNet blocks, an LM's "
        "decoder layers): full recomputes everything, save_attention keeps the attention outputs, offload copies "
        "activations to the CPU")
    checkpoint_blocks: int | None = field(
        None, "checkpoint only the first N blocks, in the order the model lists them (an LM's layers and a "
        "transformer's blocks in depth order; a UNet's down blocks, then its up blocks, then the middle one; "
        "none: all of them): each one left out keeps its activations in memory and skips its recomputation in "
        "backward, trading memory for time", check=gt(0))
    offload_block_inputs: bool = field(
        False, "keep each checkpointed block's inputs (the hidden states between blocks) in pinned CPU memory between "
        "forward and backward, copied on a side stream while the GPU computes: on the GPU nothing per block then "
        "waits for backward (an 8B LM at 8 x 4096 tokens: 9 GB less); with full, save_attention or "
        "save_attention_and_matmuls")

    def apply_to(self, model: nn.Module, what: str, *, module_types: type | Sequence[type] | None = None,
                 predicate: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
        """`apply_checkpointing` of `model`'s blocks (chosen by module_types / predicate) with these options; [] with
        gradient_checkpointing none. ConfigError when checkpoint_blocks asks for more blocks than `model` has
        (`what`: "the denoiser", named in the message)."""
        if self.gradient_checkpointing == "none":
            return []
        try:
            return apply_checkpointing(model, self.gradient_checkpointing, module_types=module_types,
                                       predicate=predicate, limit=self.checkpoint_blocks,
                                       offload_inputs=self.offload_block_inputs)
        except BlockLimitError as exc:
            raise ConfigError([("memory.checkpoint_blocks", f"{self.checkpoint_blocks}, but {what} has {exc.chosen} "
                                                            "blocks to checkpoint")]) from None

    def offload_summary(self) -> str | None:
        """With offload_block_inputs, train.log's line on what this process offloaded (or why nothing was); else
        None."""
        if not self.offload_block_inputs:
            return None
        from . import input_offload

        return input_offload.summary()

    def __post_init__(self) -> None:
        if self.checkpoint_blocks is not None and self.gradient_checkpointing == "none":
            raise ValueError("checkpoint_blocks needs gradient_checkpointing (now none): set a policy such as full "
                             "or save_attention, or leave checkpoint_blocks unset")
        if self.offload_block_inputs and self.gradient_checkpointing not in RECOMPUTING:
            raise ValueError(f"offload_block_inputs needs a gradient_checkpointing policy that recomputes "
                             f"({', '.join(RECOMPUTING)}), not {self.gradient_checkpointing}")
