"""benchmarks/gpu_check.sh parses (its mistakes would otherwise show only on the GPU machine, where each
minute is counted): syntax, --help, --list with its parts and caps, a refused argument."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_syntax_help_and_list():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=60).returncode == 0
    help_text = _run("--help")
    assert help_text.returncode == 0 and "--tests FILE[::TEST]" in help_text.stdout and "--no-tests" in help_text.stdout
    assert "--profile runs each" in help_text.stdout
    listed = _run("--list", "--budget", "500")
    assert listed.returncode == 0, listed.stderr
    for part in ("tests", "all", "engine", "token_logprobs", "train_step", "diffusion_memory", "llm_vs_trl"):
        assert f"  {part} " in listed.stdout, part
    assert "token_logprobs  <=  90 s" in listed.stdout  # BENCH_PLAN: 18% of 500 s


def test_unknown_argument_is_refused():
    out = _run("--budjet", "10")
    assert out.returncode == 2 and "unknown argument --budjet" in out.stderr


@pytest.mark.parametrize("args,message", [
    (("--part",), "--part needs a value"),
    (("--part", "--list"), "--part needs a value"),  # --list is no part name: it started a whole run
    (("--tests",), "--tests needs a value"),
    (("--budget", "abc", "--list"), "--budget must be a whole number of seconds, got 'abc'"),
    (("--part", "bogus"), "unknown part 'bogus'; parts: all tests engine"),  # refused before install and build
    (("--part", "__init__"), "unknown part '__init__'"),
])
def test_bad_values_are_refused_before_any_work(args, message):
    out = _run(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "gpu_check: part=" not in out.stdout  # nothing started


def test_case_module_parts_are_accepted():
    assert _run("--part", "rewards", "--list").returncode == 0
    assert _run("--part", "llm_vs_trl", "--list").returncode == 0
