"""`fusedrl train`: the trainer list (without importing torch), per-trainer options, config errors before any
work, and a toy trainer (a linear model learning a target) that resumes after an exception and after SIGKILL
with exactly the metrics and parameters of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedrl import train_registry
from fusedrl.cli import main
from fusedrl.engine.config import between, field, gt, section
from fusedrl.engine.runs import Run, RunConfig, Trainer, read_checkpoint, read_metrics, seed_everything


@dataclass
class ToyOptim:
    lr: float = field(0.05, "learning rate", check=gt(0))
    momentum: float = field(0.9, "SGD momentum", check=between(0, 1))


@dataclass
class ToyConfig:
    dim: int = field(5, "input features", check=gt(0))
    batch: int = field(8, "examples per step", check=gt(0))
    noise: float = field(0.1, "label noise std")
    crash_at: int = field(0, "raise RuntimeError after logging this step (0: never)", resume_ok=True)
    kill_at: int = field(0, "SIGKILL this process after logging this step (0: never)", resume_ok=True)
    optim: ToyOptim = section(ToyOptim, "optimizer")
    run: RunConfig = section(RunConfig, "run length and cadence")


def toy_train(cfg: ToyConfig, run: Run) -> None:
    """Uses every RNG that resume must restore: torch global, a torch.Generator, numpy and random."""
    seed_everything(cfg.run.seed)
    model = torch.nn.Linear(cfg.dim, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    target = torch.linspace(-1, 1, cfg.dim)
    data = torch.Generator().manual_seed(cfg.run.seed + 1)
    pos = 0
    ckpt = run.load_checkpoint(generators={"data": data})
    if ckpt is not None:
        model.load_state_dict(ckpt.tensors)
        opt.load_state_dict(ckpt.objects["optim"])
        pos = ckpt.state["pos"]
    for step in run.steps():
        x = torch.randn(cfg.batch, cfg.dim, generator=data)
        noise = torch.randn(cfg.batch) + torch.from_numpy(np.random.standard_normal(cfg.batch)).float()
        y = x @ target + cfg.noise * noise + 0.01 * random.random()
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pos += cfg.batch
        metrics = {"loss": loss, "reward": -loss.item()}
        if step % 4 == 0:
            metrics["eval/err"] = (model.weight[0] - target).abs().max()
        if run.every(step, cfg.run.log_every):
            run.log(step, metrics)
        if step == cfg.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        if step == cfg.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if run.every(step, cfg.run.checkpoint_every) or run.is_last(step):
            run.save_checkpoint(step, model.state_dict(), {"pos": pos}, {"optim": opt.state_dict()},
                                generators={"data": data})


TOY = Trainer("toy", ToyConfig, toy_train, "a linear model learning a target (test)",
              description="Fits y = x . linspace(-1, 1, dim) with SGD.")
FAST = ["--run.steps", "14", "--run.checkpoint_every", "5", "--run.keep_checkpoints", "0", "--no-run.tensorboard",
        "--no-run.progress"]


@pytest.fixture
def toy():
    train_registry.register(TOY)
    yield TOY
    train_registry.unregister("toy")


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(out / "metrics.csv")]


def _final(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "checkpoints" / "step-00000014").tensors


def test_train_help_lists_trainers_without_importing_torch():
    code = ("import sys; from fusedrl.cli import main; rc = main(['train', '--help']); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for name in ("diffusion-grpo", "reward-backprop", "llm-grpo"):
        assert f"  {name}  " in out.stdout or f"  {name} " in out.stdout


def test_missing_and_unknown_trainers(capsys):
    assert main(["train"]) == 2
    assert main(["train", "reward-backprop-x"]) == 2
    err = capsys.readouterr().err
    assert "Trainers:" in err and "did you mean 'reward-backprop'?" in err
    if "llm" not in os.listdir(Path(__file__).parents[1] / "engine"):
        assert main(["train", "llm-grpo"]) == 2
        assert "trainer 'llm-grpo' is not available yet" in capsys.readouterr().err


def test_trainer_help_documents_every_option(toy, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "toy", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: fusedrl train toy") and "Fits y = x . linspace" in out
    for opt in ("--config FILE", "--out DIR", "--resume", "--allow-change", "--dim INT", "--optim.lr FLOAT",
                "--run.steps INT", "--run.progress, --no-run.progress"):
        assert opt in out
    assert "learning rate (default: 0.05)" in out


def test_bad_config_fails_before_the_run_folder(toy, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr = -1\nmomentun = 0.5\n")
    assert main(["train", "toy", "--config", str(cfg), "--out", str(tmp_path / "r"), "--dim", "0"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: must be > 0; got -1.0" in err and "did you mean 'optim.momentum'" in err
    assert "dim: must be > 0; got 0" in err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_the_resolved_config(toy, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: {lr: 0.5}\nrun: {steps: 7}\n")
    assert main(["train", "toy", "--config", str(cfg), "--optim.lr", "0.25", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "optim:\n  lr: 0.25\n" in out and "  steps: 7\n" in out


def test_resume_after_an_exception_equals_an_uninterrupted_run(toy, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "crash"
    assert main(["train", "toy", "--out", str(ref), *FAST]) == 0
    with pytest.raises(RuntimeError, match="simulated crash at step 8"):
        main(["train", "toy", "--out", str(out), "--crash_at", "8", *FAST])
    assert [r["step"] for r in _metrics(out)] == list(range(1, 9))
    assert "stopped by RuntimeError: simulated crash" in (out / "train.log").read_text()
    # the saved config is the base; crash_at is resume_ok; a changed lr is refused unless allowed
    assert main(["train", "toy", "--out", str(out), "--resume", "--optim.lr", "0.1"]) == 2
    assert "optim.lr: saved 0.05, now 0.1" in capsys.readouterr().err
    assert main(["train", "toy", "--out", str(out), "--resume", "--crash_at", "0"]) == 0
    assert _metrics(out) == _metrics(ref)
    ref_w, got_w = _final(ref), _final(out)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert _metrics(ref)[-1]["loss"] < _metrics(ref)[0]["loss"]


def test_resume_after_sigkill_equals_an_uninterrupted_run(toy, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main(["train", "toy", "--out", str(ref), *FAST]) == 0
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('toy_cli_train', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['toy_cli_train'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "from fusedrl import train_registry; from fusedrl.cli import main\n"
        "train_registry.register(mod.TOY)\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, "train", "toy", "--out", str(out), "--kill_at", "12",
                           *FAST], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [r["step"] for r in _metrics(out)][-1] == 12  # steps 11, 12 logged but never checkpointed
    assert main(["train", "toy", "--out", str(out), "--resume", "--kill_at", "0"]) == 0
    assert _metrics(out) == _metrics(ref)
    ref_w, got_w = _final(ref), _final(out)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    log = (out / "train.log").read_text()
    assert "resumed at step=10" in log and "dropped 2 metric rows" in log


def test_resume_without_out_takes_the_newest_run(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "toy", "--resume"]) == 2
    assert "no run folder runs/toy-*" in capsys.readouterr().err
    assert main(["train", "toy", *FAST, "--run.steps", "3"]) == 0
    (first,) = (tmp_path / "runs").iterdir()
    assert main(["train", "toy", "--resume", "--run.steps", "4"]) == 0
    assert [r["step"] for r in _metrics(first)] == [1, 2, 3, 4]
