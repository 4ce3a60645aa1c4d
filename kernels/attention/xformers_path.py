"""xformers' memory-efficient attention as the torch backend's first choice on CUDA, when it works here.

An xformers wheel can be installed with a C++/CUDA library built for another torch or CUDA (the
0.0.35 wheel is built for torch 2.10 + cu128 and fails with libcudart.so.12 under cu130): the Python
package imports, its kernels do not. So "installed" is not enough: `unavailable_reason()` also needs
the C++ library loaded (`xformers._has_cpp_library`) and the cutlass forward op present. Checked once,
on first use, never at import of fusedrl.

Served: CUDA tensors, fp16/bf16/fp32, no key padding mask (a padding bias must be a materialized
[B, H, Nq, Nkv] tensor in xformers; SDPA's boolean mask is the better fallback), lse not asked for.
GQA runs without copies in xformers' 5-D layout [B, N, G, H/G, D]; causal aligns bottom-right
(`LowerTriangularFromBottomRightMask`), as fusedrl's kernels do.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def unavailable_reason() -> str | None:
    """None when xformers can run attention here, else why not (one line)."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a broken install must not break attention
        return f"xformers failed to import: {type(exc).__name__}: {exc}"
    if not getattr(xformers, "_has_cpp_library", False):
        return ("xformers' C++/CUDA library did not load (the wheel is built for another torch or CUDA); "
                "reinstall xformers for this torch")
    return None


def why_not(q: torch.Tensor, key_padding_mask, return_lse: bool) -> str | None:
    """None when this call can go to xformers, else why not."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if q.device.type != "cuda":
        return f"xformers runs on CUDA tensors, these are on {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers does not take {q.dtype}"
    if key_padding_mask is not None:
        return "a key padding mask goes to SDPA (xformers needs it as a dense [B, H, Nq, Nkv] bias)"
    if return_lse:
        return "xformers' public function does not return the log-sum-exp"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nkv, D] -> out [B, Hq, Nq, D], through
    `xformers.ops.memory_efficient_attention` (layout [B, N, G, Hq/G, D])."""
    import xformers.ops as xops

    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    q5 = q.view(B, Hkv, groups, Nq, D).permute(0, 3, 1, 2, 4)
    k5 = k.permute(0, 2, 1, 3).unsqueeze(3).expand(B, Nkv, Hkv, groups, D)
    v5 = v.permute(0, 2, 1, 3).unsqueeze(3).expand(B, Nkv, Hkv, groups, D)
    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Hq, Nq, D)
    if causal and Nq > Nkv:
        # the first Nq - Nkv queries see no key: 0, as on every other path
        out = out.clone()
        out[:, :, : Nq - Nkv] = 0
    return out
