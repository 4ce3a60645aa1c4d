"""RMSNorm as Llama, Qwen2/3 and Mistral compute it, fused: one pass over each row forward, one backward.

- `api.py`: `rms_norm`
- `reference.py`: the transformers formula (oracle and CPU path)
- `triton_kernels.py`: forward (one row per program), backward (rows in blocks, dW summed per block)
- `op.py`: the custom ops and their autograd pairing
"""

from .api import rms_norm

__all__ = ["rms_norm"]
