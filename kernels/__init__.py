"""fusedrl.kernels: fused ops for RL trainers, each with torch, Triton and CUDA C++ backends.

One subpackage per op family; `dispatch` picks the backend per call (see DESIGN.md).
"""

if __name__ != "fusedrl.kernels":
    # This folder was imported as a bare top-level `kernels`: the repository root is on sys.path (e.g.
    # `python -m pytest` or a script run from the checkout) and something asked for Hugging Face's
    # `kernels` package - transformers does, to see whether it is installed. Loading the ops here would
    # register fusedrl's custom ops a second time and break the first registration (seen as
    # "vector::reserve" errors and crashes). Stay an empty module whose version says "not that package".
    __version__ = "N/A"

    def __getattr__(name):
        raise AttributeError(f"this is fusedrl's kernels folder imported as `kernels`: use `fusedrl.kernels.{name}`")

else:
    from .attention import flash_attention
    from .diffusion_step import StepOutput, ddim_step, flow_sde_step
    from .fused_linear_grpo import fused_linear_grpo_loss
    from .grpo_loss import grpo_loss
    from .logprobs import logprobs_from_logits, token_logprobs
    from .rms_norm import rms_norm
    from .rotary import apply_rotary
    from .swiglu import silu_mul

    __all__ = [
        "StepOutput", "apply_rotary", "ddim_step", "flash_attention", "flow_sde_step", "fused_linear_grpo_loss",
        "grpo_loss", "logprobs_from_logits", "rms_norm", "silu_mul", "token_logprobs",
    ]
