"""fusedrl.engine: the training engine (rewards, diffusion and LLM GRPO, reward backpropagation).

So far: `prepare_backends()` builds or loads the CUDA extension before training starts, so that no
step ever waits for a compile, and `group_advantages()` normalizes rewards within groups (GRPO).
"""

from .advantages import group_advantages
from .startup import prepare_backends

__all__ = ["group_advantages", "prepare_backends"]
