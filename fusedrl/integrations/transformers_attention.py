"""`fusedrl.kernels.flash_attention` as a transformers (>= 5) attention implementation named "fusedrl".

transformers builds the attention mask once per forward through the mask function registered for the model's
`config._attn_implementation` (`AttentionMaskInterface`) and hands it to every attention call (`AttentionInterface`).
Registering only the attention function is not enough: for a name without a mask function,
`masking_utils._preprocess_mask_arguments` returns `attention_mask=None`, so a left-padded batch (the normal GRPO
case) would attend to its padding. Both are registered here:

- the mask function returns what `flash_attention` can take, in the same convention transformers uses for
  flash-attention 2: `None` (no padding; causality comes from the module's `is_causal`) or a bool key-padding mask
  [B, L] (True = a real key) with L <= kv_length; L < kv_length means the keys past L are unused slots of a
  static cache, which the attention function drops so that the bottom-right causal alignment is right. Anything
  else (sliding window, chunked or packed-sequence masks, custom mask functions, callers that ask for a
  materialized mask) gets the 4D bool mask that the stock `sdpa` mask function would build.
- the attention function runs `flash_attention` for None / [B, L] masks and falls back to the stock `sdpa`
  attention (or the model's own eager attention, for logit softcapping and attention sinks, which SDPA does not
  have) for anything `flash_attention` cannot express: 4D or float masks, dropout > 0, a binding sliding window,
  softcapping, sinks, position biases, a value head dim that differs from the query's. It says why once, at INFO
  level, on the "fusedrl" logger.

Use `fusedrl.patch_attention(model)` (which calls `patch_model` here), or `register()` and then
`from_pretrained(..., attn_implementation="fusedrl")` / `model.set_attn_implementation("fusedrl")`.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

NAME = "fusedrl"
logger = logging.getLogger("fusedrl")

_said: set[str] = set()
_quiet_configs: set[int] = set()  # id() of configs whose model was patched with fallback_log=False


def _say_once(reason: str, config: Any = None) -> None:
    if config is not None and id(config) in _quiet_configs:
        return
    if reason not in _said:
        _said.add(reason)
        logger.info("fusedrl attention (transformers): using the stock attention for calls with %s", reason)


def _is_tracing(t: torch.Tensor) -> bool:
    try:
        from transformers.utils.import_utils import is_tracing
    except ImportError:  # pragma: no cover - older layouts
        return torch.compiler.is_compiling()
    return is_tracing(t)


# ---------------------------------------------------------------------------------------------------------------
# Mask function (AttentionMaskInterface)
# ---------------------------------------------------------------------------------------------------------------


def _sliding_window_of(mask_function: Callable, mu) -> int | None:
    """The window w of `masking_utils.sliding_window_causal_mask_function(w)` (an `and_masks` of the sliding overlay
    and `causal_mask_function`), None for any other function. A window no query reaches past is plain causal, which
    is the usual case for Mistral/Qwen-style windows of thousands of tokens. Unrecognized -> None -> the stock 4D mask,
    so a change in transformers' internals costs speed, never correctness."""
    for cell in getattr(mask_function, "__closure__", None) or ():
        fns = cell.cell_contents
        if isinstance(fns, tuple) and len(fns) == 2 and mu.causal_mask_function in fns:
            other = fns[0] if fns[1] is mu.causal_mask_function else fns[1]
            if getattr(other, "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask":
                sizes = [c.cell_contents for c in other.__closure__ or () if isinstance(c.cell_contents, int)]
                return sizes[0] if len(sizes) == 1 else None
    return None


def fusedrl_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function registered as "fusedrl" in `transformers.masking_utils.AttentionMaskInterface`.

    Receives what `sdpa_mask` receives (`create_causal_mask` / `create_bidirectional_mask` call it): the 2D padding
    mask `attention_mask` [B, past + q_length] (True/1 = real token) and the query/key ranges. Returns:
    - None: no padding, keys [0, kv_length) all attendable (causality is the attention module's `is_causal`);
    - a bool [B, L] key-padding mask, L <= kv_length: keys >= L are dropped by the attention function (static
      cache slots not written yet), which makes `flash_attention`'s bottom-right causal alignment exact;
    - a 4D bool mask [B, 1, q_length, kv_length] (the stock `sdpa_mask` one) for patterns flash_attention cannot
      express; the attention function then falls back to the stock attention.
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    window = _sliding_window_of(mask_function, mu)
    causal = mask_function is mu.causal_mask_function or window is not None
    reason = None
    if isinstance(q_offset, torch.Tensor):  # static caches keep it as a tensor to avoid graph breaks
        if _is_tracing(q_offset):
            reason = "a traced query offset (compiled static cache)"
        else:
            q_offset = int(q_offset)
    if reason is not None:
        pass
    elif not (causal or mask_function is mu.bidirectional_mask_function):
        reason = "a mask pattern other than plain causal/bidirectional + padding (chunked or packed-sequence " \
                 "attention, a custom mask function)"
    elif causal and not allow_is_causal_skip:
        # The caller asked for a materialized mask (to add alibi or another mask onto it, or a compiled static-cache
        # decoding step): give it the stock 4D mask.
        reason = "a caller that asks for a materialized 4D mask (allow_is_causal_skip=False)"
    elif window is not None and q_offset + q_length - kv_offset > window:
        reason = "a sliding window that binds (some query sees keys further back than the window)"
    if reason is None:
        # Valid keys: causal query i (absolute position q_offset + i) sees absolute key positions <= q_offset + i,
        # i.e. key index j <= i + (q_offset - kv_offset). flash_attention aligns bottom-right (j <= i + Nkv - Nq),
        # so keep exactly Nkv = q_offset - kv_offset + q_length keys: the rest are unused static-cache slots.
        valid = q_offset - kv_offset + q_length if causal else kv_length
        if not q_length <= valid <= kv_length:
            reason = f"a cache layout flash_attention cannot align (q_offset={q_offset}, kv_offset={kv_offset}, " \
                     f"q_length={q_length}, kv_length={kv_length})"
    if reason is not None:
        _say_once(reason, kwargs.get("config"))
        kwargs.pop("allow_is_causal_skip", None)
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, **kwargs)

    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        if valid == kv_length:
            return None
        return torch.ones(batch_size, valid, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    keys = padding[:, kv_offset:kv_offset + valid].to(torch.bool)
    if keys.shape[0] != batch_size:
        keys = keys.expand(batch_size, -1)
    if valid == kv_length and not _is_tracing(keys) and bool(keys.all()):
        return None  # lets flash_attention skip the mask
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Attention function (AttentionInterface)
# ---------------------------------------------------------------------------------------------------------------


def _unsupported(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, s_aux, kwargs):
    if attention_mask is not None and (attention_mask.ndim != 2 or attention_mask.dtype != torch.bool):
        return f"a {attention_mask.ndim}D {attention_mask.dtype} attention mask (custom masks, sliding window, " \
               "packed sequences or other patterns flash_attention cannot express)"
    if dropout:
        return "attention dropout > 0"
    if softcap is not None:
        return "attention logit softcapping"
    if s_aux is not None:
        return "attention sinks (s_aux)"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or scaling <= 0):
        return f"a scaling of type {type(scaling).__name__}"
    if sliding_window is not None:
        kv = attention_mask.shape[-1] if attention_mask is not None else key.shape[2]
        if kv > sliding_window:  # the window binds: some query would see a key sliding_window or more behind
            return "a sliding window shorter than the keys"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "query, key and value head dims that differ"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return "a query head count that is not a multiple of the key/value heads"
    if query.dtype != key.dtype or query.dtype != value.dtype:
        return "query, key and value of different dtypes"
    return None


def _explicit_mask(query, key, keys, causal, sliding_window):
    """Our compact mask (None or [B, L] key padding, bottom-right causal) as a 4D bool mask, with k/v trimmed to L."""
    from fusedrl.kernels.attention import reference

    Nq, Nkv = query.shape[2], key.shape[2] if keys is None else keys.shape[-1]
    mask = reference.visible(Nq, Nkv, causal=causal, key_padding_mask=keys, device=query.device)
    if sliding_window is not None:
        q_pos = torch.arange(Nq, device=query.device)[:, None] + (Nkv - Nq)
        k_pos = torch.arange(Nkv, device=query.device)[None, :]
        window = ((q_pos - k_pos) < sliding_window) & ((k_pos - q_pos) < sliding_window)
        mask = window[None, None] if mask is None else mask & window
    return mask, Nkv


def _fallback(module, query, key, value, attention_mask, *, dropout, scaling, is_causal, sliding_window, softcap,
              s_aux, kwargs):
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is None or (attention_mask.ndim == 2 and attention_mask.dtype == torch.bool):
        # our compact form (None / [B, L] key padding, bottom-right causal): make it explicit for the stock code
        attention_mask, Nkv = _explicit_mask(query, key, attention_mask, causal, sliding_window)
        key, value = key[:, :, :Nkv], value[:, :, :Nkv]  # explicit (never None when causal): no top-left is_causal
    if softcap is not None or s_aux is not None:
        # SDPA has neither: the model's own eager attention does (gemma2/3 softcapping, gpt-oss sinks).
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"fusedrl attention: {type(module).__name__} needs softcapping or attention "
                                      "sinks and its modeling module has no eager_attention_forward to fall back to")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        extra = {k: v for k, v in (("softcap", softcap), ("s_aux", s_aux), ("sliding_window", sliding_window))
                 if v is not None}
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def fusedrl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "fusedrl" in `transformers.AttentionInterface`.

    Args (as transformers passes them to every attention implementation):
        module: the calling attention module (`is_causal`, `config`, ...).
        query: [B, Hq, Nq, D]; key, value: [B, Hkv, Nkv, D] (the whole KV cache when decoding).
        attention_mask: what `fusedrl_mask` returned (None or bool [B, L]), or a 4D mask someone else built.
        dropout, scaling, is_causal, sliding_window, softcap, s_aux: as for the stock implementations.

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None): the layout transformers' modules reshape to [B, Nq, Hq * D].
    """
    reason = _unsupported(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, s_aux,
                          kwargs)
    if reason is not None:
        _say_once(reason, getattr(module, "config", None))
        return _fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, sliding_window=sliding_window, softcap=softcap, s_aux=s_aux,
                         kwargs=kwargs)
    from fusedrl.kernels import attention as fused

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    keys = attention_mask
    if keys is not None:
        L = keys.shape[-1]
        if key.shape[2] != L:  # L < Nkv: unused static-cache slots
            key, value = key[:, :, :L], value[:, :, :L]
        if keys.device != query.device:
            keys = keys.to(query.device)
    out = fused.flash_attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=keys)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------------------------
# Registration and model patching
# ---------------------------------------------------------------------------------------------------------------


def register() -> None:
    """Register "fusedrl" with transformers' AttentionInterface and AttentionMaskInterface (idempotent). After this,
    `from_pretrained(..., attn_implementation="fusedrl")` and `model.set_attn_implementation("fusedrl")` work."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, fusedrl_attention_forward)
    AttentionMaskInterface.register(NAME, fusedrl_mask)


def _configs(model) -> dict[int, Any]:
    """Every config whose `_attn_implementation` set_attn_implementation may change: submodels' and sub-configs."""
    from transformers import PreTrainedModel

    found: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        stack.extend(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})
    return found


def patch_model(model, *, fallback_log: bool = True) -> tuple[list[str], dict[str, str], Callable[[Any], None]]:
    """Switch a transformers PreTrainedModel (and its submodels) to the "fusedrl" attention implementation through
    `set_attn_implementation`. Returns (patched config class names, skipped {name: why}, undo(model))."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    configs = _configs(model)
    previous = {key: (cfg, cfg._attn_implementation) for key, cfg in configs.items()}
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise TypeError(f"{type(model).__name__} does not take attention implementations through transformers' "
                        "AttentionInterface (set_attn_implementation left it at "
                        f"{model.config._attn_implementation!r}), so fusedrl cannot install its attention")
    patched, skipped = [], {}
    for key, (cfg, _) in previous.items():
        name = type(cfg).__name__
        if cfg._attn_implementation == NAME:
            if name not in patched:
                patched.append(name)
            if not fallback_log:
                _quiet_configs.add(key)
                weakref.finalize(cfg, _quiet_configs.discard, key)  # ids are reused after garbage collection
        else:
            skipped[name] = f"kept {cfg._attn_implementation!r} (the submodel does not use AttentionInterface)"
    if skipped:
        logger.info("fusedrl attention (transformers): left alone: %s", skipped)

    top_key = id(model.config)

    def undo(model) -> None:
        model.set_attn_implementation(previous[top_key][1])
        for key, (cfg, impl) in previous.items():
            if cfg._attn_implementation != impl:  # sub-configs that had their own implementation
                cfg._attn_implementation_internal = impl
            _quiet_configs.discard(key)

    return patched, skipped, undo
