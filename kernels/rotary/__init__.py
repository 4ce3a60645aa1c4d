"""Rotary position embedding as transformers' Llama / Qwen2 / Qwen3 / Mistral `apply_rotary_pos_emb` computes it,
fused: one pass over the queries and one over the keys, forward and backward.

- `api.py`: `apply_rotary`
- `reference.py`: the transformers formula (oracle and CPU path)
- `triton_kernels.py`: one program per token, all heads
- `op.py`: the custom ops and their autograd pairing
"""

from .api import apply_rotary

__all__ = ["apply_rotary"]
