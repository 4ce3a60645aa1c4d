"""Smoke tests of the scripts in examples/: each runs at tiny size (a model built from a small config, saved
and loaded with from_pretrained; nothing downloaded) for one or two steps, in this process, so that the
fusedrl calls they make can be counted.

What is checked: the script finishes; the metrics it prints and returns are finite; the trained weights
moved; and the fusedrl code the example is about was really called (TRL's patch -> token_logprobs and
grpo_loss; the Flow-GRPO drop-in -> flow_sde_step; the checkpoint policy -> fusedrl's checkpoint). One
script also runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["trl_grpo_fused", "flow_grpo_loop", "alignprop_loop"]

# transformers 5 deprecates the `gradient_checkpointing` names that TRL uses; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fusedrl_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    """The tiny diffusion model (built on first use by tiny_model_dir) goes to a temporary cache, shared by
    the tests of this module, not to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEDRL_CACHE", str(tmp_path_factory.mktemp("fusedrl_cache")))
        yield


def counting(monkeypatch, owner, name: str, calls: list):
    """Replace owner.name by a wrapper that appends its keyword arguments to `calls`, then calls it."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def check_result(result: dict, steps: int, keys: tuple[str, ...]) -> None:
    history = result["history"]
    assert len(history) == steps
    for entry in history:
        for key in keys:
            assert math.isfinite(entry[key]), (key, entry)
    assert result["param_change"] > 0, "no trained weight moved"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--tiny" in out and "--model" in out


@pytest.mark.slow
def test_trl_grpo_fused(monkeypatch, tmp_path, capsys):
    pytest.importorskip("trl")
    import fusedrl.kernels
    from fusedrl.integrations import trl as fused_trl

    try:
        fused_trl.check_trl_version()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    calls = {"token_logprobs": [], "grpo_loss": []}
    for name, log in calls.items():  # the integration looks both up in fusedrl.kernels at each call
        counting(monkeypatch, fusedrl.kernels, name, log)

    result = load_example("trl_grpo_fused").main(["--tiny", "--max-steps", "2", "--output-dir", str(tmp_path)])

    check_result(result, 2, ("loss", "reward", "kl", "entropy"))
    # policy + reference log-probs each step, and the loss each step, through fusedrl
    assert len(calls["token_logprobs"]) >= 4 and len(calls["grpo_loss"]) == 2
    assert fused_trl.patched_state() is None  # the script unpatches TRL when done
    out = capsys.readouterr().out.splitlines()
    printed = [line for line in out if line.startswith("step ")]
    assert len(printed) == 2 and "reward" in printed[0]
    assert "fused backbone: 5 rms_norm, 2 swiglu, 2 rotary" in out  # the tiny Qwen2: 2 layers, fully fine-tuned


@pytest.mark.slow
def test_flow_grpo_loop(monkeypatch, capsys):
    import fusedrl.integrations.flow_grpo as flow_grpo

    steps = []
    counting(monkeypatch, flow_grpo, "flow_sde_step", steps)  # what the drop-in sde_step_with_logprob calls

    S = 3
    result = load_example("flow_grpo_loop").main(
        ["--tiny", "--steps", "1", "--group-size", "2", "--prompts-per-step", "2", "--num-inference-steps", str(S)])

    check_result(result, 1, ("reward_mean", "reward_std", "loss", "kl", "grad_norm"))
    # sampling (noise drawn) + the policy's and the reference's recomputation (given prev_sample), per timestep
    assert len(steps) == 3 * S
    assert sum(call["prev_sample"] is None for call in steps) == S
    assert all(call["noise_level"] == 0.7 and call["sde_type"] == "sde" for call in steps)
    out = capsys.readouterr().out
    assert "reward_mean" in out and "fused backbone: " in out and " lora" in out  # the LoRA linears fused


@pytest.mark.slow
def test_flow_grpo_loop_cps_with_a_kl_term_trains(capsys):
    """--sde-type cps with the default beta: the last (noiseless) step is not trained, so the KL stays finite (a NaN
    loss wrote NaN into the LoRA at step 1 and the next sampling failed)."""
    S = 3
    result = load_example("flow_grpo_loop").main(
        ["--tiny", "--steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--num-inference-steps", str(S),
         "--sde-type", "cps"])
    check_result(result, 2, ("reward_mean", "loss", "kl"))  # finite at both steps


@pytest.mark.slow
@pytest.mark.parametrize("policy, scope, guidance", [("save_attention", "step", 1.0), ("full", "blocks", 2.0)])
def test_alignprop_loop(monkeypatch, policy, scope, guidance):
    import torch

    import fusedrl.engine.checkpointing as checkpointing

    example = load_example("alignprop_loop")
    script_calls = []  # the script's own checkpoint calls: (denoiser or vae, policy, grad enabled)
    original = example.checkpoint

    def recording(fn, *args, **kwargs):
        kind = "denoiser" if "hidden_states" in kwargs else "vae"
        script_calls.append((kind, kwargs["policy"], torch.is_grad_enabled()))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(example, "checkpoint", recording)
    wrapper_calls = []  # the CheckpointWrappers' calls (scope "blocks"), looked up in fusedrl.engine.checkpointing
    counting(monkeypatch, checkpointing, "checkpoint", wrapper_calls)

    S, K = 3, 2
    result = example.main(["--tiny", "--steps", "2", "--batch-size", "2", "--num-inference-steps", str(S),
                           "--backprop-steps", str(K), "--policy", policy, "--checkpoint-scope", scope,
                           "--guidance-scale", str(guidance)])

    check_result(result, 2, ("reward_mean", "loss", "grad_norm"))
    assert all(entry["grad_norm"] > 0 for entry in result["history"])
    # per step: S denoiser calls, the last K of them with a graph, then the VAE decode with one
    step_policy = policy if scope == "step" else "none"
    one_step = [("denoiser", step_policy, False)] * (S - K) + [("denoiser", step_policy, True)] * K
    assert script_calls == (one_step + [("vae", policy, True)]) * 2
    if scope == "blocks":
        # each of the 2 transformer blocks, at every denoiser call, ran in fusedrl's checkpoint with the policy
        assert [c["policy"] for c in wrapper_calls] == [policy] * (2 * S * 2)
    else:
        assert not wrapper_calls


@pytest.mark.slow
def test_alignprop_runs_as_a_script(tmp_path):
    """As a user runs it: a fresh interpreter, `python examples/alignprop_loop.py ...`, exit status 0."""
    # os.environ holds the module's FUSEDRL_CACHE, so the tiny model built by the tests above is reused.
    command = [sys.executable, str(EXAMPLES / "alignprop_loop.py"), "--steps", "1", "--num-inference-steps", "2",
               "--backprop-steps", "1", "--policy", "full"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("step 1 "))
    values = dict(re.findall(r"(\w+) (\S+)", line))
    assert math.isfinite(float(values["reward_mean"])) and math.isfinite(float(values["loss"]))
    assert "done: 1 steps" in proc.stdout
