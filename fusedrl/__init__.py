"""fusedrl: fused kernels and a thin engine for RL post-training of generative models.

    from fusedrl.kernels import flow_sde_step, ddim_step
    from fusedrl.integrations.flow_grpo import sde_step_with_logprob
    from fusedrl.integrations.ddpo import ddim_step_with_logprob
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusedrl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
