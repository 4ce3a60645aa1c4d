"""TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`, TRL 1.16) as a benchmark peer.

Its backward imports `maybe_gather_lm_head_ctx` from `trl.trainer.utils` at call time, and that module imports
pandas and datasets at its top. The GPU image lacked datasets, so there TRL's forward ran and its backward failed
("No module named 'datasets'", 2026-11-27 H200 run); benchmarks/fetch_wheels.sh now carries it. Without
DeepSpeed ZeRO-3 that helper is a null context (its docstring: "Returns a null context when ZeRO-3 is not
enabled"); where `trl.trainer.utils` still cannot be imported for want of datasets, pandas or pyarrow,
`chunked_logprob_function()` registers a stand-in module holding only that null context, so that the code timed
is TRL's own kernel, forward and backward.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

from .providers import require

UTILS = "trl.trainer.utils"
MISSING_ON_GPU_IMAGE = ("datasets", "pandas", "pyarrow")


def chunked_logprob_function():
    """`trl.kernels.ChunkedLogProbFunction`, its backward importable; Skip when trl is not installed."""
    require("trl")
    from trl.kernels import ChunkedLogProbFunction

    if UTILS not in sys.modules:
        try:
            importlib.import_module(UTILS)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in MISSING_ON_GPU_IMAGE:
                raise
            sys.modules[UTILS] = _stand_in(exc.name)
    return ChunkedLogProbFunction


def _stand_in(missing: str) -> types.ModuleType:
    module = types.ModuleType(UTILS, f"fusedrl's stand-in for {UTILS} ({missing} is not installed): only "
                                     "maybe_gather_lm_head_ctx, a null context as TRL's is without DeepSpeed ZeRO-3")
    module.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    return module
