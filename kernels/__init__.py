"""fusedrl.kernels: fused ops for RL trainers, each with torch, Triton and CUDA C++ backends.

One subpackage per op family; `dispatch` picks the backend per call (see DESIGN.md).
"""

from .diffusion_step import StepOutput, ddim_step, flow_sde_step
from .fused_linear_grpo import fused_linear_grpo_loss
from .grpo_loss import grpo_loss
from .logprobs import logprobs_from_logits, token_logprobs

__all__ = [
    "StepOutput", "ddim_step", "flow_sde_step", "fused_linear_grpo_loss", "grpo_loss", "logprobs_from_logits",
    "token_logprobs",
]
