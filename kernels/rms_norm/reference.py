"""RMSNorm exactly as transformers' LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm write it: the statistics in
fp32, the normalized row rounded to the input's dtype before the weight multiplies it (so a bf16 model's output
is bf16, and fp32 weights over bf16 activations give fp32)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)
