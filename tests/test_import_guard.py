"""From a source checkout (repository root on sys.path, as `python -m pytest` or a script run there puts
it), the top-level `kernels/` and `engine/` folders are importable as bare `kernels` / `engine`.
transformers imports `kernels` to probe for Hugging Face's package of that name; that must neither
register fusedrl's ops a second time nor make transformers think the package is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import torch
import fusedrl.kernels as fk
import kernels, engine
assert kernels.__version__ == "N/A" and engine.__version__ == "N/A"
try:
    kernels.flow_sde_step
except AttributeError as exc:
    assert "fusedrl.kernels.flow_sde_step" in str(exc)
else:
    raise AssertionError("bare kernels exposed an op")
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()
x = torch.randn(2, 3)
out = fk.flow_sde_step(x, x, 0.5, 0.4, prev_sample=x)  # the custom ops still work after the probe
assert torch.isfinite(out.logp).all()
print("ok")
"""


def test_bare_kernels_import_is_inert():
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
