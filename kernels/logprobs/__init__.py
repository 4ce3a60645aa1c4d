"""Token log-probabilities and entropies (LLM GRPO), without [N, V] temporaries.

- `api.py`: `logprobs_from_logits`
- `reference.py`: the naive torch formula (oracle) and the chunked torch path (CPU)
- `triton_kernels.py`: one-pass online log-sum-exp forward, recompute backward
- `op.py`: custom ops and their autograd pairing
"""

from .api import logprobs_from_logits

__all__ = ["logprobs_from_logits"]
