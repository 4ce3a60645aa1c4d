"""The modules of a transformers causal LM's decoder that `fusedrl.patch_backbone` runs on fused code, and how.

- RMSNorm (Llama, Qwen2/3, Mistral, ... the per-head q/k norms of Qwen3, and diffusers' `RMSNorm`, SD3.5's and
  Flux's q/k norms): `fusedrl.kernels.rms_norm`, one pass per row instead of seven elementwise kernels and their fp32
  temporaries.
- SwiGLU MLPs (`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with silu): `fusedrl.kernels.silu_mul`, one pass, and
  no silu(gate) tensor kept for the backward.
- rotary embeddings (the modeling module's `apply_rotary_pos_emb`, transformers' half-split form):
  `fusedrl.kernels.apply_rotary`, one pass over the queries and one over the keys instead of ten elementwise
  kernels (rotate_half's slices, negation and concatenation included).
- peft LoRA linears (plain LoRA, one active adapter; in transformers' and diffusers' models alike): the update
  added to the base layer's output by the GEMM that computes it (`torch.addmm(base(x), (x A^T), B^T,
  alpha=scaling)`, in the base layer's dtype, as autocast would) instead of peft's fp32 product, scaling and add
  over the layer's whole output. Calls peft handles otherwise (adapters disabled, as for the KL reference; merged;
  several active adapters; mixed-batch adapter names; DoRA and other variants; lora_bias) run peft's own forward.

A module qualifies by what it has (names, an activation, a peft class) and by a probe: its stock forward and the
fused one run on two rows of random input and must give the same shapes and dtypes and agree, element by element,
to 1% of each output's magnitude plus the mean one (a different formula, such as Gemma's (1 + weight) norm or a GELU
MLP, misses by far more; rounding differences do not). SwiGLU MLPs are probed at x1 and x100 (MLPs that clamp their
gate show only on large inputs). Norms are probed again on rows of another dtype than their weights (bf16 over fp32
weights, fp32 over half ones): a norm whose casts differ from transformers' order there (diffusers' RMSNorm rounds
x-hat to the weight's dtype, Olmo2's casts back to the input's) is fused for inputs of its weights' dtype only.
The rotary dispatcher takes only full-width, one-dtype calls (partial rotary and fp32 tables run the stock
function). Modules whose weights cannot be probed (meta device, sharded) are left alone; patch before sharding.
A process whose copy of the model has its parameters on the meta device (FSDP2 processes that take their shards from
rank 0) can replay rank 0's probe outcomes instead (`ProbeLog`), and so patches exactly the modules rank 0 patched.

Patching sets `module.forward` on the instance (the class is untouched, so other models are not affected);
`undo` deletes it. The rotary embedding is called by name from the attention's code, so that name in the modeling
module is rebound to a function that runs the fused kernel inside the patched model's attention modules (hooks on
them set a flag) and the stock function everywhere else; the last patch undone (or its model collected) restores
the stock function.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("rms_norm", "swiglu", "rotary", "lora")
ROTARY_NAME = "apply_rotary_pos_emb"
PROBE_TOLERANCE = 1e-2  # of the output's largest magnitude


def _eps_attribute(module: nn.Module) -> str | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name
    return None


def _rms_norm_forward(eps_name: str, same_dtype_only: bool = False) -> Callable:
    """The fused forward of an RMSNorm whose epsilon is the attribute `eps_name`; with same_dtype_only, inputs of
    another dtype than the weight run the stock forward (a norm that orders its casts otherwise: diffusers')."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from fusedrl.kernels import rms_norm

        if same_dtype_only and hidden_states.dtype != self.weight.dtype:
            return type(self).forward(self, hidden_states)
        return rms_norm(hidden_states, self.weight, getattr(self, eps_name))

    return forward


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    from fusedrl.kernels import silu_mul

    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` on the fused kernel."""
    from fusedrl.kernels import apply_rotary

    return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


# [True] while a patched model's attention module runs (its forward, or its recomputation under checkpointing).
# A plain global rather than a ContextVar: torch.compile traces a global's mutation (a ContextVar.set breaks the
# graph); a thread running an unpatched model meanwhile would at worst get the fused rotary, the same numbers.
_IN_PATCHED_ATTENTION = [False]
# modeling module name -> [its stock apply_rotary_pos_emb, how many active patches hold the dispatcher there]
_ROTARY_HOLDS: dict[str, list] = {}


def _rotary_dispatcher(stock: Callable) -> Callable:
    """The modeling module's new apply_rotary_pos_emb: fused inside patched attention modules, else `stock`."""

    @functools.wraps(stock)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _IN_PATCHED_ATTENTION[0] and not args and set(kwargs) <= {"unsqueeze_dim"} and _full_rotary(q, k, cos, sin):
            return _fused_rotary_pos_emb(q, k, cos, sin, **kwargs)
        return stock(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _full_rotary(q, k, cos, sin) -> bool:
    """Calls the fused rotary computes as the stock one: every head dim rotated (Phi-3's and Qwen3-Next's partial
    rotary rotate the first cos.shape[-1] only) and one dtype throughout (Olmo2 keeps fp32 tables and casts the
    result back to q's dtype)."""
    return (q.ndim == k.ndim == 4 and cos.ndim == sin.ndim == 3 and cos.shape[-1] == q.shape[-1]
            and q.dtype == k.dtype == cos.dtype == sin.dtype)


def _enter_attention(module, args) -> None:
    _IN_PATCHED_ATTENTION[0] = True


def _leave_attention(module, args, output) -> None:
    _IN_PATCHED_ATTENTION[0] = False


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    # DeepSpeed ZeRO-3 gathers a module's weights in its own forward's hooks: the adapters' weights, read here
    # without calling them, are empty partitions there, so peft's forward (which calls them) runs
    if lora_A.bias is not None or lora_B.bias is not None or hasattr(lora_A.weight, "ds_id"):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    xa = F.linear(self.lora_dropout[name](x).to(dtype), lora_A.weight.to(dtype))  # [..., r]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_B.weight.to(dtype).t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


def _peft_runs(module: nn.Module, name: str) -> bool:
    """Adapter `name` of a LoRA linear is one `_lora_forward` hands to peft's forward (a variant such as DoRA, or a
    bias)."""
    a, b = module.lora_A[name], module.lora_B[name]
    return name in getattr(module, "lora_variant", {}) or a.bias is not None or b.bias is not None


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


def _probe_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device] | str:
    """The dtype and device of the module's stock weights, or why it cannot be probed."""
    weights = [p for p in module.parameters() if not p.requires_grad] or list(module.parameters())
    if not weights:
        return "it has no weights"
    w = weights[0]
    if w.device.type == "meta":
        return "its weights are on the meta device"
    if type(w).__name__ == "DTensor" or type(w.data).__name__ == "DTensor":
        return "its weights are sharded (patch before FSDP)"
    return w.dtype, w.device


class ProbeLog:
    """The probes' outcomes by key (module name and probe; None: the fused forward agreed, else why not).

    Recording (the default), each probe runs and its outcome is kept in `outcomes`; replaying (`ProbeLog(outcomes)`
    with another process's record), no probe runs and each outcome is the recorded one: a process whose model has
    its parameters on the meta device, to be filled from rank 0's by FSDP2, cannot probe, and must patch the same
    modules with the same forwards as rank 0 (the processes would otherwise compute different numbers).
    """

    def __init__(self, replay: dict[str, str | None] | None = None) -> None:
        self.outcomes: dict[str, str | None] = dict(replay) if replay is not None else {}
        self.replaying = replay is not None

    def __call__(self, key: str, probe: Callable[[], str | None], module: nn.Module | None = None) -> str | None:
        """`probe()`'s outcome, or the recorded one for `key`; `module`'s own state (fused already, or its forward
        replaced by another library) is looked at here either way."""
        if self.replaying:
            state = _forward_state(module) if module is not None else None
            return state or self.outcomes.get(key, "the recorded probes (rank 0's) have no such module")
        outcome = self.outcomes[key] = probe()
        return outcome


ALREADY_REPLACED = "its forward is already replaced on the instance"
OURS = "fused already"  # a module patch_backbone fused (in this model, or in the model it was deep-copied from)


def _forward_state(module: nn.Module) -> str | None:
    """OURS when fusedrl fused the module, ALREADY_REPLACED when another library replaced its forward, else None."""
    if module.__dict__.get("_fusedrl_backbone"):
        return OURS
    if "forward" in module.__dict__:
        return ALREADY_REPLACED
    return None


def _agree(module: nn.Module, fused: Callable, width: int, scales: tuple[float, ...] = (1.0,),
           input_dtype: torch.dtype | None = None, exact: bool = False) -> str | None:
    """Run the stock forward and the fused one on the same two rows (in `input_dtype`, default the weights'), at
    each input scale (an MLP that clamps its gate shows only on large inputs); None when they agree (`_differs`),
    else why not. A module whose forward another library replaced on the instance is left alone unprobed; one
    fusedrl fused is OURS."""
    state = _forward_state(module)
    if state is not None:
        return state
    where = _probe_dtype_device(module)
    if isinstance(where, str):
        return where
    dtype, device = where
    trials = [(scale, input_dtype or dtype) for scale in scales]
    modes = {m: m.training for m in module.modules()}
    module.eval()  # no dropout in the probe
    try:
        for scale, x_dtype in trials:
            gen = torch.Generator(device=device).manual_seed(0)
            x = (scale * torch.randn((2, width), generator=gen, device=device)).to(x_dtype)
            with torch.no_grad():
                expected = type(module).forward(module, x)
                got = fused(module, x)
            if scale != 1.0 and not torch.isfinite(expected).all():
                continue  # fp16 overflows at x100 in the stock forward too: that trial shows nothing
            reason = _differs(expected, got, "its forward", exact=exact)
            if reason is not None:
                return reason
    except Exception as exc:  # a module whose forward takes other inputs: not what we patch
        return f"its forward could not be probed ({type(exc).__name__}: {exc})"
    finally:
        for m, mode in modes.items():
            m.training = mode
    return None


def _differs(expected, got, what: str, exact: bool = False) -> str | None:
    """Why the fused outputs `got` are not the stock ones, or None: other shapes or dtypes, or an element past
    PROBE_TOLERANCE of its own magnitude plus the output's mean magnitude (element by element: a (1 + weight) norm
    whose weights have one large channel differs by x-hat in every other channel, which a bound relative to the
    largest output hid). exact: also the same values up to fp32 rounding in all but 1% of the elements (a rounding
    step taken in another order, such as a norm's x-hat rounded to a bf16 input's dtype or not, shows in most)."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    if len(expected) != len(got) or not all(isinstance(e, torch.Tensor) and e.shape == g.shape and e.dtype == g.dtype
                                            for e, g in zip(expected, got)):
        return f"{what} returns other shapes or dtypes than the fused one"
    for e, g in zip(expected, got):
        e, g = e.double(), g.double()
        rel = (g - e).abs() / (e.abs() + e.abs().mean() + 1e-12)
        worst = rel.max().item() if rel.numel() else 0.0
        if not worst <= PROBE_TOLERANCE:
            return f"{what} computes another formula (probe differs by {worst:.3g} of an output's magnitude)"
        if exact and rel.numel() and rel.flatten().kthvalue(max(1, int(0.99 * rel.numel()))).values.item() > 1e-5:
            return f"{what} rounds in another order (probe differs past fp32 rounding in over 1% of the outputs)"
    return None


def _rotary_agrees(stock: Callable, attention: nn.Module) -> str | None:
    """Probe a modeling module's rotary function against the fused one on an attention module's head dim."""
    where = _probe_dtype_device(attention)
    if isinstance(where, str):
        return where
    dtype, device = where
    D = getattr(attention, "head_dim", None)
    if not isinstance(D, int) or D % 2:
        return f"the attention's head_dim is {D!r}"
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, cos, sin = (torch.randn(shape, generator=gen, device=device).to(dtype)
                      for shape in ((1, 2, 3, D), (1, 1, 3, D), (1, 3, D), (1, 3, D)))
    try:
        with torch.no_grad():
            expected, got = stock(q, k, cos, sin), _fused_rotary_pos_emb(q, k, cos, sin)
    except Exception as exc:
        return f"its {ROTARY_NAME} could not be probed ({type(exc).__name__}: {exc})"
    return _differs(expected, got, f"its {ROTARY_NAME}")


def patch_rotary(model: nn.Module, probes: ProbeLog | None = None) -> tuple[int, dict[str, str], Callable[[], None]]:
    """Put the rotary dispatcher in the modeling modules of the model's attention classes and hook the attention
    modules. Returns (attention modules now on the fused rotary, {module name: why not}, release)."""
    probes = probes if probes is not None else ProbeLog()
    by_module: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        modeling = sys.modules.get(type(module).__module__)
        if type(module).__name__.endswith("Attention") and callable(getattr(modeling, ROTARY_NAME, None)):
            by_module.setdefault(modeling.__name__, []).append((name, module))
    covered, skipped, held, hooks = 0, {}, [], []
    for mod_name, attentions in by_module.items():
        modeling = sys.modules[mod_name]
        hold = _ROTARY_HOLDS.get(mod_name)
        if hold is None:
            stock = getattr(modeling, ROTARY_NAME)
            reason = probes(f"{mod_name}:rotary", functools.partial(_rotary_agrees, stock, attentions[0][1]))
            if reason is not None:
                for name, _ in attentions:
                    skipped[name] = f"rotary: {reason}"
                continue
            hold = _ROTARY_HOLDS[mod_name] = [stock, 0]
            setattr(modeling, ROTARY_NAME, _rotary_dispatcher(stock))
        hold[1] += 1
        held.append(mod_name)
        for _, attention in attentions:
            hooks.append(attention.register_forward_pre_hook(_enter_attention))
            hooks.append(attention.register_forward_hook(_leave_attention, always_call=True))
        covered += len(attentions)
    return covered, skipped, weakref.finalize(model, _release_rotary, held, hooks)


def _release_rotary(held: list[str], hooks: list) -> None:
    for hook in hooks:
        hook.remove()
    for mod_name in held:
        hold = _ROTARY_HOLDS[mod_name]
        hold[1] -= 1
        if hold[1] == 0:
            setattr(sys.modules[mod_name], ROTARY_NAME, hold[0])
            del _ROTARY_HOLDS[mod_name]


Candidate = tuple[str, str, nn.Module, "Callable | None", "str | None"]


def candidates(model: nn.Module, kinds: tuple[str, ...], probes: ProbeLog | None = None) -> list[Candidate]:
    """(module name, kind, module, fused forward, reason it is left alone or None) for every module of a kind."""
    probes = probes if probes is not None else ProbeLog()
    lora_cls = _lora_linear_class() if "lora" in kinds else None
    found = []
    for name, module in model.named_modules():
        if "rms_norm" in kinds and type(module).__name__.endswith("RMSNorm"):
            weight, eps = getattr(module, "weight", None), _eps_attribute(module)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or eps is None:
                found.append((name, "rms_norm", module, None, "no 1-D weight and eps attribute"))
                continue
            if getattr(module, "bias", None) is not None:  # diffusers' RMSNorm can add one (zeros at init)
                found.append((name, "rms_norm", module, None, "it adds a bias"))
                continue
            forward = _rms_norm_forward(eps)
            reason = probes(f"{name}:rms_norm", functools.partial(_agree, module, forward, weight.shape[0]), module)
            mixed = torch.bfloat16 if weight.dtype == torch.float32 else torch.float32
            if reason is None and probes(f"{name}:rms_norm:mixed", functools.partial(
                    _agree, module, forward, weight.shape[0], input_dtype=mixed, exact=True), module) is not None:
                # transformers' order (x-hat rounded to x's dtype, times the weight) holds for any input dtype;
                # a norm that casts otherwise (diffusers', Olmo2's) differs with other inputs: those run stock
                forward = _rms_norm_forward(eps, same_dtype_only=True)
            found.append((name, "rms_norm", module, forward, reason))
        elif "swiglu" in kinds and all(isinstance(getattr(module, p, None), nn.Module)
                                       for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = type(module.act_fn).__name__
            reason = None if act in ("SiLU", "SiLUActivation") else f"its activation is {act}, not silu"
            width = getattr(module.gate_proj, "in_features", None)
            if reason is None and not isinstance(width, int):
                reason = "gate_proj has no in_features"
            # x 100: gates far past the limits of the MLPs that clamp them (DeepSeek-V4, GLM-5-Next: 10)
            probe = functools.partial(_agree, module, _swiglu_forward, width, scales=(1.0, 100.0))
            found.append((name, "swiglu", module, _swiglu_forward, reason or probes(f"{name}:swiglu", probe, module)))
        elif lora_cls is not None and type(module) is lora_cls:
            base = module.get_base_layer()  # GPT-2's Conv1D (fan_in_fan_out) among others: not ours
            reason = None if type(base) is nn.Linear else f"its base layer is {type(base).__name__}, not nn.Linear"
            if reason is None and module.lora_A and all(_peft_runs(module, name) for name in module.lora_A):
                reason = "its adapters are DoRA / other peft variants or have a bias: peft's forward runs them"
            found.append((name, "lora", module, _lora_forward, reason or probes(
                f"{name}:lora", functools.partial(_agree, module, _lora_forward, base.in_features), module)))
    return found


def patch_model(model: nn.Module, kinds: tuple[str, ...], *, adopt: bool = True, probes: ProbeLog | None = None
                ) -> tuple[dict[str, int], dict[str, str], Callable]:
    """Patch every qualifying module. Returns (kind -> modules patched, module name -> why it was left alone, undo).
    Modules fused already (a deep copy of a patched model carries its fused forwards) are adopted: counted and
    restored by this undo; with adopt=False (adding to a model's active patch, whose undo restores them) they are
    passed over. `probes` records the probes' outcomes, or replays another process's (see `ProbeLog`)."""
    probes = probes if probes is not None else ProbeLog()
    patched = {kind: 0 for kind in kinds}
    skipped: dict[str, str] = {}
    done: list[nn.Module] = []
    release_rotary: Callable[[], object] = lambda: None
    if "rotary" in kinds:
        patched["rotary"], rotary_skipped, release_rotary = patch_rotary(model, probes)
        skipped.update(rotary_skipped)
    try:
        found = candidates(model, kinds, probes)
    except BaseException:
        release_rotary()
        raise
    for name, kind, module, forward, reason in found:
        if reason is OURS:
            if adopt:
                patched[kind] += 1
                done.append(module)
            continue
        if reason is not None:
            skipped[name or type(module).__name__] = f"{kind}: {reason}"
            continue
        module.forward = types.MethodType(forward, module)
        module._fusedrl_backbone = True
        patched[kind] += 1
        done.append(module)

    def undo(_model) -> None:
        release_rotary()  # once: a weakref.finalize, also run when the model is collected
        for module in done:
            if module.__dict__.get("_fusedrl_backbone"):
                del module.forward
                del module._fusedrl_backbone

    return patched, skipped, undo
