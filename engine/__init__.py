"""fusedrl.engine: the training engine (rewards, diffusion and LLM GRPO, reward backpropagation).

Only start-up exists so far: `prepare_backends()` builds or loads the CUDA extension before training
starts, so that no step ever waits for a compile.
"""

from .startup import prepare_backends

__all__ = ["prepare_backends"]
