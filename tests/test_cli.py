"""The `fusedrl` command line: info lists every op with a verdict per backend; help works."""

from __future__ import annotations

import subprocess
import sys

from fusedrl.cli import main
from fusedrl.kernels import dispatch


def test_info_lists_versions_devices_and_each_op_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "triton", "nvcc", "CUDA extension", "FUSEDRL_BACKEND", "FUSEDRL_TOKEN_LOGPROBS auto"):
        assert needle in out
    assert dispatch.OPS, "no op registered"
    for op, spec in dispatch.OPS.items():
        order = ", ".join(b.value for b in spec.auto_order if b in spec.backends)
        header = f"  {op}  (auto: {order})\n"
        assert header in out
        block = out.split(header, 1)[1]
        for backend in ("torch", "triton", "cuda"):
            line = next(li for li in block.splitlines() if li.strip().startswith(backend))
            verdict = line.split(None, 1)[1]
            assert verdict == "yes" or verdict.startswith("no: "), line
    # the torch backend always serves; on a CPU-only machine cuda says why not
    assert "    torch   yes" in out


def test_info_reports_a_bad_token_logprobs_strategy(monkeypatch, capsys):
    monkeypatch.setenv("FUSEDRL_TOKEN_LOGPROBS", "tiles")
    assert main(["info"]) == 2
    assert "FUSEDRL_TOKEN_LOGPROBS='tiles' is not a token_logprobs strategy" in capsys.readouterr().out


def test_info_reports_a_bad_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv("FUSEDRL_BACKEND", "tpu")
    assert main(["info"]) == 2
    assert "FUSEDRL_BACKEND='tpu' is not a backend" in capsys.readouterr().out


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fusedrl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("info", "build-ext", "bench"):
        assert command in out.stdout

