"""SwiGLU's gate, silu(gate) * up, as the MLPs of Llama, Qwen2/3 and Mistral compute it, fused: one pass forward
(no silu(gate) tensor), one backward that recomputes silu from gate.

- `api.py`: `silu_mul`
- `reference.py`: the transformers formula (oracle and CPU path)
- `triton_kernels.py`: elementwise forward and backward
- `op.py`: the custom ops and their autograd pairing
"""

from .api import silu_mul

__all__ = ["silu_mul"]
