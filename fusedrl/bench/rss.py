"""Peak resident memory of one call, measured in a fresh child process (CPU).

torch keeps no allocator statistics on the CPU, so memory claims there are read from the kernel:
a child process imports torch, builds the inputs, records its peak RSS (`ru_maxrss`), runs the call,
and reports the growth of the peak. A fresh process per measurement keeps one run's freed memory
from hiding the next one's.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
exec(spec["setup"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
exec(spec["call"])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_kb": after - before, "peak_kb": after}))
"""


def peak_growth_mb(setup: str, call: str, env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """MB by which the peak RSS of a fresh process grows while `call` runs (after `setup`)."""
    import os

    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"setup": setup, "call": call})],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_kb"] / 1024
