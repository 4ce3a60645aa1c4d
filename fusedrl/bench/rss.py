"""Peak resident memory of one call, measured in a fresh child process (CPU).

torch keeps no allocator statistics on the CPU, so memory claims there are read from the kernel:
a child process imports torch, builds the inputs, notes its memory, runs the call, and reports how far
the call lifted the peak. A fresh process per measurement keeps one run's freed memory from hiding
the next one's.

On Linux the child resets its peak after the setup (`echo 5 > /proc/self/clear_refs` sets VmHWM to
the current RSS) and reads VmHWM after the call: the growth is the call's peak above the memory it
started with. Elsewhere it compares `ru_maxrss` before and after the call; that figure is unreliable
under a large parent, because a fork + exec'd child's `ru_maxrss` starts at the parent's peak (a pytest
process that has loaded models reads every growth as 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
exec(spec["setup"])

def peak_kb():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None

try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = peak_kb()
except OSError:
    before = None
if before is None:
    read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = read()
else:
    read = peak_kb
exec(spec["call"])
after = read()
print(json.dumps({"peak_growth_kb": after - before, "peak_kb": after}))
"""


def peak_growth_mb(setup: str, call: str, env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """MB by which `call` lifts the peak RSS of a fresh process above its memory after `setup`."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"setup": setup, "call": call})],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_kb"] / 1024
