"""engine.runs: the run folder (config, metrics CSV, log, plot, image grids, TensorBoard), atomic checkpoints with
pruning, RNG capture/restore, and resume rules (truncated metrics, config comparison, ranks)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from fusedrl.engine.config import ConfigError, field, section
from fusedrl.engine.runs import (
    Run,
    RunConfig,
    RunError,
    capture_rng,
    latest_checkpoint,
    plot_metrics,
    read_checkpoint,
    read_metrics,
    restore_rng,
    save_image_grid,
    seed_everything,
)
from fusedrl.engine.runs import checkpoint as ckpt_io


@dataclass
class Cfg:
    lr: float = field(0.1, "learning rate")
    run: RunConfig = section(RunConfig, "run")


def _cfg(steps: int = 10, **run) -> Cfg:
    return Cfg(run=RunConfig(steps=steps, tensorboard=False, progress=False, **run))


def _rng_draw(gen: torch.Generator) -> list[float]:
    return [torch.rand(1).item(), float(np.random.rand()), random.random(), torch.rand(1, generator=gen).item()]


def test_capture_restore_rng_is_json_and_exact():
    seed_everything(3)
    gen = torch.Generator().manual_seed(5)
    state = json.loads(json.dumps(capture_rng({"g": gen})))
    first = _rng_draw(gen)
    restore_rng(state, {"g": gen})
    assert _rng_draw(gen) == first
    with pytest.raises(KeyError, match="no state for generator 'h'"):
        restore_rng(state, {"h": gen})


def test_run_folder_files(tmp_path):
    out = tmp_path / "r"
    with Run(out, _cfg(), progress=True) as run:
        assert run.start_step == 0 and run.load_checkpoint() is None
        for step in run.steps():
            metrics = {"loss": torch.tensor(1.0 / step), "reward_mean": step * 0.1}
            if step >= 5:
                metrics["eval/reward"] = np.float32(step)  # a column that appears later
            run.log(step, metrics)
        run.save_checkpoint(10, {"w": torch.ones(2)})
        grid = run.save_image_grid(10, torch.rand(3, 3, 16, 20), ["a red cube", "b", "a very long caption " * 4])
    assert (out / "config.yaml").read_text().startswith("lr: 0.1\nrun:\n")
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[2]["reward_mean"] == 0.30000000000000004 and "eval/reward" not in rows[3]
    assert rows[9]["eval/reward"] == 10.0
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,time,loss,reward_mean,eval/reward"
    text = (out / "train.log").read_text()
    assert " step=3 loss=0.333333 reward_mean=0.3\n" in text and "checkpoint step=10" in text
    from PIL import Image

    img = Image.open(grid)
    assert grid == out / "samples" / "step-00000010.png"
    assert img.size[0] == 2 + 2 * (7 * 20 + 2)  # 2 per row, 20 px enlarged 7x to reach 128, pad 2
    assert (out / "metrics.png").stat().st_size > 1000
    with pytest.raises(RunError, match="already holds a run"):
        Run(out, _cfg())


def test_a_run_that_saved_nothing_is_started_over_and_says_so(tmp_path):
    """A run that stopped before its first checkpoint (a bad option found after start-up) leaves config.yaml,
    metrics and a log: the same command starts over in that folder (it was refused as 'already holds a run', and
    its advice to --resume could only fail the same way); a folder with a checkpoint is still refused; --resume of a
    folder with no config.yaml is refused (a mistyped --out started a whole new run)."""
    out = tmp_path / "r"
    with pytest.raises(RuntimeError), Run(out, _cfg()) as run:
        run.log(1, {"loss": 1.0})
        run.save_image_grid(1, torch.rand(1, 3, 8, 8))
        raise RuntimeError("no such LoRA target: to_qq")
    log = (out / "train.log").read_text()
    assert "no checkpoint was saved: run the command again" in log and "--resume" not in log.split("to_qq")[-1]
    with Run(out, _cfg(steps=3)) as run:
        assert run.start_step == 0
        run.save_checkpoint(1, {"w": torch.ones(1)})
    assert read_metrics(out / "metrics.csv") == [] and not (out / "samples").exists()
    assert "started over: " in (out / "train.log").read_text()
    with pytest.raises(RunError, match="already holds a run"):
        Run(out, _cfg())
    with pytest.raises(RunError, match=r"nothing to resume in .*typo \(no config.yaml\)"):
        Run(tmp_path / "typo", _cfg(), resume=True)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.csv").write_text("a user's own file")  # no config.yaml: not a run folder
    with pytest.raises(RunError, match="already holds a run"):
        Run(tmp_path / "mine", _cfg())


def test_bad_metrics_are_refused(tmp_path):
    with Run(tmp_path, _cfg()) as run:
        with pytest.raises(ValueError, match="reserved"):
            run.log(1, {"step": 1})
        with pytest.raises(ValueError, match="3 elements"):
            run.log(1, {"x": torch.ones(3)})
        with pytest.raises(TypeError, match="'x' must be a number"):
            run.log(1, {"x": "a"})
        with pytest.raises(TypeError, match=r"state\['t'\] is not JSON-serializable"):
            run.save_checkpoint(1, state={"t": torch.ones(1)})


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with Run(tmp_path, _cfg(), tensorboard=True) as run:
        run.log(1, {"reward": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_contents_and_pruning(tmp_path):
    w = torch.randn(3, 4)
    opt_state = torch.optim.SGD([torch.nn.Parameter(w.clone())], lr=0.1, momentum=0.9).state_dict()
    with Run(tmp_path, _cfg(keep_checkpoints=2)) as run:
        for step in (2, 4, 6):
            path = run.save_checkpoint(step, {"w": w * step, "tied": w * step}, {"pos": step * 8},
                                       {"optim": opt_state},
                                       write_extra=lambda d: (d / "lora.safetensors").write_bytes(b"x"))
    assert [p.name for _, p in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004",
                                                                                        "step-00000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000006\n"
    ckpt = read_checkpoint(path)
    assert ckpt.step == 6 and ckpt.state == {"pos": 48} and torch.equal(ckpt.tensors["w"], w * 6)
    assert ckpt.objects["optim"]["param_groups"][0]["momentum"] == 0.9 and (path / "lora.safetensors").exists()
    assert set(ckpt.rng) >= {"torch", "numpy", "python"}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt_io.write_checkpoint(root, 1, {"w": torch.ones(1)})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.write_checkpoint(root, 2, {"w": torch.zeros(1)})
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no partial folder left
    # a half-written folder (no state.json, e.g. copied by hand) does not count as a checkpoint
    (root / "step-00000003").mkdir()
    assert latest_checkpoint(root)[0] == 1


def test_resume_truncates_metrics_and_restores_rng(tmp_path):
    gen = torch.Generator().manual_seed(0)
    seed_everything(0)
    with Run(tmp_path, _cfg(checkpoint_every=3)) as run:
        for step in run.steps():
            run.log(step, {"x": _rng_draw(gen)[0]})
            if step == 3:
                run.save_checkpoint(step, {"w": torch.ones(1)}, {"pos": 3}, generators={"g": gen})
                expected = _rng_draw(gen)
                restore_rng(read_checkpoint(tmp_path / "checkpoints" / "step-00000003").rng, {"g": gen})
            if step == 5:
                break  # "killed" after step 5: steps 4 and 5 are not checkpointed
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3, 4, 5]
    seed_everything(123)
    with Run(tmp_path, _cfg(steps=12, checkpoint_every=3), resume=True) as run:  # steps is resume_ok
        assert run.start_step == 3 and run.total_steps == 12
        ckpt = run.load_checkpoint(generators={"g": gen})
        assert ckpt.state == {"pos": 3} and _rng_draw(gen) == expected
        assert list(run.steps()) == list(range(4, 13))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3]
    log = (tmp_path / "train.log").read_text()
    assert "resumed at step=3" in log and "dropped 2 metric rows" in log and "run.steps: 10 -> 12" in log


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path):
    with Run(tmp_path, _cfg()) as run:
        run.save_checkpoint(1, {"w": torch.ones(1)})
    changed = replace(_cfg(), lr=0.2, run=replace(_cfg().run, seed=1))
    with pytest.raises(ConfigError) as info:
        Run(tmp_path, changed, resume=True)
    assert dict(info.value.errors) == {"lr": "saved 0.1, now 0.2", "run.seed": "saved 0, now 1"}
    assert "cannot resume" in str(info.value)
    with Run(tmp_path, changed, resume=True, allow_changed=["lr", "run.seed"]) as run:
        assert run.start_step == 1
    with pytest.raises(ConfigError, match=r"--allow-change: 'run.sed' is no field of the config; did you mean "
                                          r"'run.seed'\?"):
        Run(tmp_path, changed, resume=True, allow_changed=["lr", "run.sed"])
    assert "lr: 0.2" in (tmp_path / "config.yaml").read_text()


@dataclass
class BatchCfg:
    batch: int = field(4, "samples per process")
    run: RunConfig = section(RunConfig, "run")


def test_resume_on_another_process_count(tmp_path, monkeypatch):
    """Checkpoints record the process count; a trainer whose batch is per process refuses a resume on another
    count unless the batch field may change (and says which value keeps the global batch); others note it."""
    cfg = BatchCfg(run=_cfg().run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with Run(tmp_path, cfg) as run:
        run.save_checkpoint(1, {"w": torch.ones(1)})
    monkeypatch.setenv("WORLD_SIZE", "1")
    with Run(tmp_path, cfg, resume=True) as run:
        assert run.load_checkpoint().world_size == 2
        with pytest.raises(ConfigError, match=r"batch = 4 per process made 8 samples per step, 4 now; pass "
                                              r"--batch 8 --allow-change batch to keep them"):
            run.check_world_size(per_process_batch="batch")
        run.check_world_size()
        run.check_world_size(samples_follow_rank=True)
    log = (tmp_path / "train.log").read_text()
    assert "resumed on 1 process; checkpoint step-00000001 was saved by 2: same global batch and samples" in log
    assert "differ from those of an uninterrupted run on 2" in log
    with Run(tmp_path, replace(cfg, batch=8), resume=True, allow_changed=["batch"]) as run:
        run.check_world_size(per_process_batch="batch")  # 2 x 4 = 1 x 8
    assert (tmp_path / "train.log").read_text().count("same global batch and samples") == 2
    with Run(tmp_path, cfg, resume=True, allow_changed=["batch"]) as run:
        run.check_world_size(per_process_batch="batch")  # allowed, and said: the global batch halves
    assert "8 -> 4 samples per step (batch 4 -> 4 per process)" in (tmp_path / "train.log").read_text()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with Run(tmp_path, replace(cfg, batch=8), resume=True, allow_changed=["batch"]) as run:
        run.check_world_size(per_process_batch="batch")  # the same count: nothing to say


def test_a_resumed_optimizer_keeps_its_state_and_takes_the_configs_hyperparameters():
    """`--resume --allow-change optim.lr`: the moments and step counts come from the checkpoint, the learning rate
    (and betas, eps, weight decay) from the config the optimizer is built from now, not the saved one."""
    from fusedrl.engine.distributed import load_optimizer_state

    w = torch.nn.Parameter(torch.ones(3))
    saved_opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    w.grad = torch.tensor([1.0, -2.0, 3.0])
    saved_opt.step()
    saved = saved_opt.state_dict()
    opt = torch.optim.AdamW([w], lr=5e-3, betas=(0.8, 0.9), weight_decay=0.0)
    load_optimizer_state(opt, saved)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-3, (0.8, 0.9), 0.0)
    state = opt.state[w]
    assert torch.equal(state["exp_avg"], saved_opt.state[w]["exp_avg"]) and float(state["step"]) == 1.0


def test_resume_without_checkpoint_restarts(tmp_path):
    with Run(tmp_path, _cfg()) as run:
        run.log(1, {"x": 1})
    with Run(tmp_path, _cfg(), resume=True) as run:
        assert run.start_step == 0 and run.load_checkpoint() is None
    assert read_metrics(tmp_path / "metrics.csv") == []


def test_other_ranks_write_nothing(tmp_path):
    out = tmp_path / "r"
    with Run(out, _cfg(), rank=1) as run:
        assert not run.is_main
        run.log(1, {"x": 1.0})
        assert run.save_checkpoint(1, {"w": torch.ones(1)}) is None
        assert run.save_image_grid(1, torch.rand(1, 3, 4, 4)) is None
    assert not out.exists()


def test_plot_and_grid_helpers(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("step,time,loss,reward_mean\n1,0.0,1.0,0.1\n2,0.0,0.5,\n3,0.0,0.25,0.3\n")
    assert plot_metrics(csv, tmp_path / "p.png").stat().st_size > 1000
    assert plot_metrics(csv, tmp_path / "q.png", keys=["nothing"]) is None
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        save_image_grid(tmp_path / "g.png", torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="captions has 1 entries for 2 images"):
        save_image_grid(tmp_path / "g.png", torch.rand(2, 3, 8, 8), ["a"])


def test_every_and_is_last(tmp_path):
    with Run(tmp_path, _cfg(steps=10)) as run:
        assert [s for s in range(1, 11) if run.every(s, 4)] == [4, 8, 10]
        assert not any(run.every(s, 0) for s in range(1, 11))
        assert [s for s in range(1, 11) if run.is_last(s)] == [10]


def test_atomic_write_dir_replaces_a_folder_whole(tmp_path):
    from fusedrl.engine.runs.atomic import atomic_write_dir

    target = tmp_path / "model"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one"))
    atomic_write_dir(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    def fails(d):
        (d / "c.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, fails)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
