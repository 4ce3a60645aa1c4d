"""The GRPO loss family (TRL 1.16's formulas): grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo.

- `api.py`: `grpo_loss`
- `reference.py`: TRL's `_compute_loss` restated in torch (oracle and CPU path)
- `triton_kernels.py`: one program per sequence: per-token loss, derivative, row sums
- `op.py`: the custom op and the autograd pairing (normalizations, GSPO row term)
"""

from .api import grpo_loss

__all__ = ["grpo_loss"]
