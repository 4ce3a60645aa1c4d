"""Attention processors that run diffusers' attention through `fusedrl.kernels.flash_attention`.

diffusers' attention-backend registry does not take outside names, so these are installed with
`model.set_attn_processor(...)`, one per attention module, each replacing a stock processor it knows and keeping it
for the calls it cannot serve:

- `FusedRLAttnProcessor` replaces `AttnProcessor2_0` (UNet2DConditionModel / SD1.5-family self- and cross-attention
  and every other `Attention` that uses it),
- `FusedRLJointAttnProcessor` replaces `JointAttnProcessor2_0` (SD3Transformer2DModel joint image+text attention,
  `context_pre_only` blocks included),
- `FusedRLFluxAttnProcessor` replaces `FluxAttnProcessor` (FluxTransformer2DModel joint and single blocks, rotary
  embeddings).

Each `__call__` is the stock processor's code step for step (norms, projections, rope, residual, output projections,
dtype casts), with only the attention call swapped; the signatures are the stock ones too, because diffusers filters
the kwargs it forwards by the processor's signature. Processors of other classes (IP-adapter, fused-projection,
added-KV, ... processors) are left alone and reported.

Masks: the UNet turns `encoder_attention_mask` (1 = real token) into an additive bias (1 - m) * -10000 [B, 1, Nkv];
a bias that is 0 or <= -1000 on every key is a key padding mask (exp(-1000) is 0 in fp32, so the stock softmax gives
those keys exactly zero weight), with one subtlety kept: a row whose keys are all masked gets the same bias on every
key, which cancels in the stock softmax, so it attends to all of them. Bool key masks (True = attend) are used as
they are. Any other mask (per-query masks, general biases, shapes that need diffusers' mask padding) falls back to the
stock processor for that call, and says why once on the "fusedrl" logger. SD3's stock joint processor ignores
`attention_mask`; so does this one.
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger("fusedrl")

_MASKED_BIAS = -1000.0  # an additive bias at or below this removes the key exactly (fp32 exp underflows)
# The last float mask checked, (weakref to it, its version, result): one forward hands the same bias tensor to every
# attention layer, and each processor would otherwise check it again (a host sync each).
_last_mask_check: tuple | None = None
_said: set[str] = set()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N, D] attention with an optional [B, Nkv] key mask; the stock processors use SDPA's default scale."""
    from fusedrl.kernels import attention as fused

    return fused.flash_attention(q, k, v, key_padding_mask=keys)


class _Base:
    """Holds the stock processor it replaced (for undo and for the calls it cannot serve)."""

    def __init__(self, stock, *, fallback_log: bool = True):
        self.stock = stock
        self.fallback_log = fallback_log

    def _say_once(self, reason: str, *, fallback: bool = True) -> None:
        if torch.compiler.is_compiling():  # no logging inside a traced graph (it would break it)
            return
        key = f"{type(self).__name__}: {reason}"
        if self.fallback_log and key not in _said:
            _said.add(key)
            if fallback:
                logger.info("fusedrl attention (diffusers): %s uses the stock %s for calls with %s",
                            type(self).__name__, type(self.stock).__name__, reason)
            else:
                logger.info("fusedrl attention (diffusers): %s: %s", type(self).__name__, reason)

    def _key_mask(self, mask: torch.Tensor | None, batch: int, n_kv: int) -> tuple[torch.Tensor | None, str | None]:
        """(key padding mask [B, Nkv] bool or None, None) when `mask` is a key mask, else (None, why not)."""
        global _last_mask_check
        if mask is None:
            return None, None
        given = mask
        if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
            mask = mask[:, 0]
        if mask.ndim == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim != 2 or tuple(mask.shape) != (batch, n_kv):
            return None, f"an attention mask of shape {tuple(mask.shape)} (not a [B, 1, Nkv] key mask)"
        if mask.dtype == torch.bool:
            return mask, None
        if not mask.is_floating_point():
            return None, f"a {mask.dtype} attention mask"
        if torch.compiler.is_compiling():  # its values cannot be read while tracing: the stock processor serves it
            return None, "a float attention mask under torch.compile (a 0 / -inf key mask is only known at run time)"
        # The same bias tensor reaches every attention layer of one forward: check it once (a host sync).
        try:
            version = given._version
        except RuntimeError:  # inference-mode tensors have no version counter: no caching
            version = None
        cached = _last_mask_check
        if version is not None and cached is not None and cached[0]() is given and cached[1] == version:
            return cached[2], cached[3]
        keep = mask == 0
        if bool((keep | (mask <= _MASKED_BIAS)).all()):
            keys, why = keep | ~keep.any(-1, keepdim=True), None  # all-masked rows: stock softmax sees no mask
        else:
            keys, why = None, "an additive attention bias that is not a 0 / -inf-like key mask"
        if version is not None:
            _last_mask_check = (weakref.ref(given), version, keys, why)
        return keys, why


class FusedRLAttnProcessor(_Base):
    """`diffusers.models.attention_processor.AttnProcessor2_0` with the attention on `flash_attention`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        batch_size, sequence_length = (hidden_states.shape[0], None)
        if attention_mask is not None:
            kv_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            sequence_length = kv_states.shape[1] if kv_states.ndim == 3 else kv_states.shape[2] * kv_states.shape[3]
        keys, why = self._key_mask(attention_mask, batch_size, sequence_length)
        if why is None and (args or kwargs.get("scale") is not None):
            why = "the deprecated `scale` argument"
        if why is not None:
            self._say_once(why)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = _attention(query, key, value, keys)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


class FusedRLJointAttnProcessor(_Base):
    """`diffusers.models.attention_processor.JointAttnProcessor2_0` (SD3) with the attention on `flash_attention`.
    Like the stock processor, it ignores `attention_mask`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        if attention_mask is not None:
            self._say_once("attention_mask is ignored, as the stock JointAttnProcessor2_0 ignores it", fallback=False)
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        hidden_states = _attention(query, key, value, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class FusedRLFluxAttnProcessor(_Base):
    """`diffusers.models.transformers.transformer_flux.FluxAttnProcessor` with the attention on `flash_attention`.
    Context parallelism (`_parallel_config`) goes to the stock processor."""

    _attention_backend = None  # set by model.set_attention_backend(); this processor is the backend, so unused
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        keys, why = None, None
        if self._parallel_config is not None:
            why = "context parallelism"
        elif attention_mask is not None:
            n_kv = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
            keys, why = self._key_mask(attention_mask, hidden_states.shape[0], n_kv)
        if why is not None:
            self._say_once(why)
            self.stock._attention_backend = self._attention_backend
            self.stock._parallel_config = self._parallel_config
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # [B, N, H, D] (diffusers' dispatch layout) <-> [B, H, N, D] (flash_attention's)
        hidden_states = _attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), keys)
        hidden_states = hidden_states.transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _replacements() -> dict[type, type]:
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    table: dict[type, type] = {AttnProcessor2_0: FusedRLAttnProcessor, JointAttnProcessor2_0: FusedRLJointAttnProcessor}
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # pragma: no cover - diffusers without Flux
        pass
    else:
        table[FluxAttnProcessor] = FusedRLFluxAttnProcessor
    return table


def patch_model(model, *, fallback_log: bool = True):
    """Install fusedrl processors on a diffusers model (UNet2DConditionModel, SD3Transformer2DModel,
    FluxTransformer2DModel, or any model with `attn_processors` / `set_attn_processor`).

    Returns (patched {name: stock class}, skipped {name: why}, undo(model)). Raises TypeError when the model has no
    attention processors or none that fusedrl knows."""
    if not (hasattr(model, "attn_processors") and hasattr(model, "set_attn_processor")):
        raise TypeError(f"{type(model).__name__} has no diffusers attention processors (attn_processors / "
                        "set_attn_processor)")
    current = dict(model.attn_processors)
    if not current:
        raise TypeError(f"{type(model).__name__} has no attention modules")
    table = _replacements()
    new, patched, skipped = {}, {}, {}
    for name, proc in current.items():
        cls = table.get(type(proc))  # exact class: a subclass may compute something else
        if isinstance(proc, _Base):
            new[name] = proc  # already patched
            patched[name] = type(proc.stock).__name__
        elif cls is not None:
            new[name] = cls(proc, fallback_log=fallback_log)
            patched[name] = type(proc).__name__
        else:
            new[name] = proc
            skipped[name] = f"{type(proc).__name__} is not a processor fusedrl knows; left as it is"
    if not patched:
        kinds = sorted({type(p).__name__ for p in current.values()})
        raise TypeError(f"{type(model).__name__}: none of its attention processors ({kinds}) is one fusedrl can replace"
                        " (AttnProcessor2_0, JointAttnProcessor2_0, FluxAttnProcessor)")
    if skipped:
        logger.info("fusedrl attention (diffusers): %d attention modules left alone: %s", len(skipped), skipped)
    model.set_attn_processor(dict(new))
    return patched, skipped, unpatch_model


def unpatch_model(model) -> None:
    """Put back the stock processor of every module that still has a fusedrl one (processors changed since are
    kept)."""
    current = model.attn_processors
    model.set_attn_processor({name: proc.stock if isinstance(proc, _Base) else proc for name, proc in current.items()})
