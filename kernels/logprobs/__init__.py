"""Token log-probabilities and entropies (LLM GRPO), without [N, V] temporaries.

- `api.py`: `logprobs_from_logits`, `token_logprobs` (from hidden states and the LM head)
- `reference.py`: the naive torch formula (oracle) and the chunked torch path (CPU)
- `triton_kernels.py`: one-pass online log-sum-exp forward, recompute backward
- `op.py`: custom ops and their autograd pairing
- `hidden_reference.py`, `hidden_triton.py`, `hidden_op.py`: the same three for `token_logprobs`
  ("fused" strategy: logits tiles by `tl.dot` inside the kernels); `hidden_chunked_triton.py`: the
  kernels of its "chunked" strategy (each vocabulary chunk's logits by cuBLAS, reduced in Triton)
"""

from .api import logprobs_from_logits, token_logprobs

__all__ = ["logprobs_from_logits", "token_logprobs"]
