"""fusedrl.engine: the training engine (rewards, diffusion and LLM GRPO, reward backpropagation).

So far: `prepare_backends()` builds or loads the CUDA extension before training starts, so that no
step ever waits for a compile, `group_advantages()` normalizes rewards within groups (GRPO) and
`PromptRewardStats` over each prompt's recent rewards (DDPO's per-prompt stat tracking).
"""

if __name__ != "fusedrl.engine":
    # Imported as a bare top-level `engine` from a source checkout: load nothing (see kernels/__init__.py).
    __version__ = "N/A"

    def __getattr__(name):
        raise AttributeError(f"this is fusedrl's engine folder imported as `engine`; use `fusedrl.engine.{name}`")

else:
    from .advantages import PromptRewardStats, group_advantages
    from .startup import prepare_backends

    __all__ = ["PromptRewardStats", "group_advantages", "prepare_backends"]
