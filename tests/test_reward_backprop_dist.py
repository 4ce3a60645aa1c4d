"""Reward backpropagation on several processes, on the CPU with gloo (2 processes via torch.multiprocessing.spawn):
each process differentiates its half of every micro-batch and the gradients are averaged (LoRA) or
reduce-scattered by FSDP2 (full fine-tuning), so two processes with sampling.batch_size b take the same steps as
one process with 2b (same prompts, same noise per sample, same gradient, same weights after);
`fusedrl train reward-backprop` under two processes writes one run folder and resumes (FSDP2: whole tensors in
the checkpoint, the optimizer state and the saved denoiser)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .dist_helpers import assert_same_updates, cli_worker, free_port, setup_process

pytest.importorskip("diffusers")
pytest.importorskip("peft")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

STEPS = 2


def _train(model_dir: str, lora: bool, batch: int) -> dict:
    from fusedrl.engine.config import build_config
    from fusedrl.engine.diffusion.reward_backprop import RewardBackprop, RewardBackpropConfig
    from fusedrl.engine.distributed import full_tensor

    cfg = build_config(RewardBackpropConfig, {
        "model": model_dir, "lora.enabled": lora, "sampling.num_steps": 3, "sampling.batch_size": batch,
        "optim.lr": 1e-2, "optim.grad_accum": 2, "backprop.truncation_k": 2, "run.seed": 3})
    torch.manual_seed(0)
    trainer = RewardBackprop.build(cfg)
    grads, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: full_tensor(p.grad).clone() for n, p in trainer.named_params})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    metrics = [trainer.train_step(s) for s in range(1, STEPS + 1)]
    params = {n: full_tensor(p.detach()).clone() for n, p in trainer.named_params}
    return {"metrics": metrics, "grads": grads, "params": params, "strategy": trainer.policy.strategy}


def _worker(rank: int, world: int, port: int, model_dir: str, lora: bool, out: str) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(model_dir, lora, 1), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from fusedrl.engine.diffusion import tiny_model_dir

    return str(tiny_model_dir("sd3", tmp_path_factory.mktemp("tiny_rb_dist")))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_processes_equal_one_process_with_twice_the_batch(model_dir, tmp_path, lora, monkeypatch):
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    torch.set_num_threads(1)
    single = _train(model_dir, lora, 2)
    mp.spawn(_worker, args=(2, free_port(), model_dir, lora, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert single["strategy"] is None and all(r["strategy"] == (None if lora else "fsdp") for r in ranks)
    for r in ranks:
        for i, (want, got) in enumerate(zip(single["metrics"], r["metrics"])):
            assert got["skipped"] == want["skipped"] == 0 and got["k"] == want["k"]
            rel = 1e-6 if i == 0 else 1e-5  # after the first update the weights differ in the last bits
            for k in ("reward_mean", "loss", "reward_std"):
                assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-7), (i, k)
    assert_same_updates(single, ranks, STEPS)


def _nan_worker(rank: int, world: int, port: int, model_dir: str, lora: bool, out: str) -> None:
    """Process 1's first micro-batch of step 1 has a NaN reward; process 0's are all finite."""
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fusedrl.engine.config import build_config
        from fusedrl.engine.diffusion.reward_backprop import RewardBackprop, RewardBackpropConfig

        cfg = build_config(RewardBackpropConfig, {
            "model": model_dir, "lora.enabled": lora, "sampling.num_steps": 3, "sampling.batch_size": 1,
            "optim.grad_accum": 2, "backprop.truncation_k": 2, "run.seed": 3})
        trainer = RewardBackprop.build(cfg)
        forward, calls = trainer.forward, []

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(1)
            if rank == 1 and len(calls) == 1:
                out.rewards = out.rewards * float("nan")
            return out

        trainer.forward = poisoned
        before = {n: p.detach().clone() for n, p in trainer.named_params}
        first = trainer.train_step(1)["skipped"]
        unchanged = all(torch.equal(before[n], p.detach()) for n, p in trainer.named_params)
        second = trainer.train_step(2)["skipped"]
        torch.save({"skipped": [first, second], "unchanged": unchanged, "calls": len(calls)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "fsdp-full"])
def test_a_nan_on_one_process_skips_the_step_on_all(model_dir, tmp_path, lora):
    """A NaN reward on one process stops the step's micro-batches on both at the same point (one forward each,
    not two), applies nothing, and the next step trains (2 micro-batches)."""
    mp.spawn(_nan_worker, args=(2, free_port(), model_dir, lora, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got == {"skipped": [1.0, 0.0], "unchanged": True, "calls": 3}, (r, got)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "fsdp-full"])
def test_two_process_cli_run_and_resume(tmp_path, lora):
    from fusedrl.engine.runs import read_checkpoint, read_metrics

    out, cache = tmp_path / "run", str(tmp_path / "cache")
    argv = ["train", "reward-backprop", "--out", str(out), "--sampling.batch_size", "1", "--sampling.num_steps", "3",
            "--run.steps", "2", "--run.checkpoint_every", "1", "--run.eval_every", "2", "--prompts.num_eval", "1",
            "--no-run.progress", "--no-run.tensorboard", "--lora.enabled" if lora else "--no-lora.enabled"]
    mp.spawn(cli_worker, args=(2, free_port(), argv, cache), nprocs=2, join=True)
    mp.spawn(cli_worker, args=(2, free_port(), ["train", "reward-backprop", "--out", str(out), "--resume",
                                                   "--run.steps", "3", "--no-run.progress"], cache),
             nprocs=2, join=True)
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3] and all(r.get("skipped", 0) == 0 for r in rows)
    assert [r["step"] for r in rows if "eval/reward_mean" in r] == [0, 2, 3]  # every 2 steps and the last
    log = (out / "train.log").read_text()
    assert "resumed at step=2" in log and f"x 2 processes ({'gradients averaged' if lora else 'FSDP2'})" in log
    if lora:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
        return
    from diffusers import SD3Transformer2DModel  # whole tensors in the checkpoint, optimizer state, saved model

    ckpt = read_checkpoint(out / "checkpoints" / "step-00000003")
    saved = dict(SD3Transformer2DModel.from_pretrained(out / "denoiser").named_parameters())
    assert len(ckpt.tensors) == len(saved)
    for k, v in ckpt.tensors.items():
        assert torch.equal(saved[k.removeprefix("denoiser.")], v), k
    for k, v in ckpt.objects["optim"]["state"].items():
        assert not hasattr(v["exp_avg"], "placements") and v["exp_avg"].shape == saved[k].shape, k
