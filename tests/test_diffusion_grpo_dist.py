"""Diffusion GRPO on several processes, on the CPU with gloo (2 processes via torch.multiprocessing.spawn): DDP for
LoRA, FSDP2 (`fully_shard` of every transformer block and of the denoiser, reference copy too) for full
fine-tuning.

- Two processes, each sampling half of a step's images, take the same steps as one process with the whole batch:
  the same samples (each image's noise is seeded by its place in the step, not by its process), the same gathered
  rewards and group advantages, the same gradients at every optimizer step (averaged by DDP / FSDP2), the same
  weights after; and both processes hold the same weights (gradients synchronized).
- `fusedrl train diffusion-grpo` run by two processes writes one run folder (rank 0), builds the embedded default
  once, and resumes; under FSDP2 the checkpoint and the saved denoiser hold whole tensors.
"""

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


def _config(model_dir: str, strategy: str, text_encoder: bool | str = False, **over):
    """text_encoder: True puts LoRA on the CLIP text encoders too, "only" on them alone (TexForce)."""
    from fusedrl.engine.config import build_config
    from fusedrl.engine.diffusion.grpo import DiffusionGRPOConfig

    return build_config(DiffusionGRPOConfig, {
        "model.model": model_dir, "lora.enabled": strategy == "ddp", "prompts.per_step": 2,
        "sampling.group_size": 2, "sampling.steps": 3, "sampling.micro_batch": 2, "optim.lr": 1e-2,
        "grpo.beta": 0.05, "grpo.clip_range": 1e-3, "run.seed": 5, "memory.gradient_checkpointing": "full",
        "lora.text_encoder": bool(text_encoder), "lora.denoiser": text_encoder != "only", **over})


def _train(model_dir: str, strategy: str, text_encoder: bool | str = False, pareto: str = "none") -> dict:
    """STEPS steps of GRPOTrainer in this process (or this process's part); the gradients at each optimizer step
    and the weights after, whole."""
    from fusedrl.engine.diffusion.grpo import GRPOTrainer
    from fusedrl.engine.distributed import full_tensor

    trainer = GRPOTrainer(_config(model_dir, strategy, text_encoder, **{"reward.pareto": pareto}), None)
    grads, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: full_tensor(p.grad).clone() for n, p in trainer.params.items()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    metrics = [trainer.train_step(s) for s in range(1, STEPS + 1)]
    params = {n: full_tensor(p.detach()).clone() for n, p in trainer.params.items()}
    return {"metrics": metrics, "grads": grads, "params": params, "strategy": trainer.policy.strategy}


def _worker(rank: int, world: int, port: int, model_dir: str, strategy: str, text_encoder: bool | str, pareto: str,
            out: str) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(model_dir, strategy, text_encoder, pareto), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from fusedrl.engine.diffusion import tiny_model_dir

    return str(tiny_model_dir("sd3", tmp_path_factory.mktemp("tiny_dist")))


@pytest.mark.parametrize(("strategy", "text_encoder", "pareto"),
                         [("ddp", False, "none"), ("ddp", True, "none"), ("ddp", "only", "none"),
                          ("fsdp", False, "none"), ("ddp", False, "batch")],
                         ids=["ddp-lora", "ddp-lora-text-encoder", "ddp-lora-text-encoder-only", "fsdp-full",
                              "ddp-lora-pareto"])
def test_two_processes_equal_one_process_with_the_same_batch(model_dir, tmp_path, strategy, text_encoder, pareto,
                                                             monkeypatch):
    """ddp-lora-text-encoder: LoRA on the CLIP text encoders too, whose gradients lie outside the DDP wrapper and
    are averaged by the trainer; -only: on them alone (no DDP wrapper at all, the trainer averages everything).
    ddp-lora-pareto: only the step's brightest image is trained on (one reward), on one of the two processes: its
    weight counts every process's kept samples."""
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    torch.set_num_threads(1)
    single = _train(model_dir, strategy, text_encoder, pareto)  # one process, the whole batch
    mp.spawn(_worker, args=(2, free_port(), model_dir, strategy, text_encoder, pareto, str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert any(n.startswith("text_encoder") for n in single["grads"][0]) == bool(text_encoder)
    assert any(n.startswith("denoiser") for n in single["grads"][0]) == (text_encoder != "only")
    assert single["strategy"] is None and all(r["strategy"] == strategy for r in ranks)
    for r in ranks:
        for i, (want, got) in enumerate(zip(single["metrics"], r["metrics"])):
            assert got["skipped"] == 0 and want["skipped"] == 0
            if i == 0:  # the same images (seeded per sample) from the same weights, rewards gathered
                assert got["reward_mean"] == want["reward_mean"]
            else:  # the weights after the first update differ in the last bits (gradient sums in another order)
                assert got["reward_mean"] == pytest.approx(want["reward_mean"], rel=1e-5)
            assert got["updates"] == want["updates"] == 1
            for k in ("kl", "ratio_mean", "logp_mean"):
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9), k
            for k in ("loss", "policy_loss"):  # on policy: -mean(A) + beta KL, zero up to the advantages' rounding
                assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert_same_updates(single, ranks, STEPS)


def _nan_worker(rank: int, world: int, port: int, model_dir: str, strategy: str, out: str) -> None:
    """Process 1 sees NaN rewards at step 1 and NaN sampled log-probs at step 2; process 0 sees none."""
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fusedrl.engine.diffusion.grpo import GRPOTrainer

        trainer = GRPOTrainer(_config(model_dir, strategy), None)
        sample_and_score = trainer.sample_and_score

        def poisoned(step):
            traj, raw, micro, bad = sample_and_score(step)
            if rank == 1 and step == 1:
                raw = {n: r * float("nan") for n, r in raw.items()}
            if rank == 1 and step == 2:
                traj.log_probs[0, 0] = float("nan")
            return traj, raw, micro, bad

        trainer.sample_and_score = poisoned
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        skipped = [trainer.train_step(s)["skipped"] for s in (1, 2)]
        unchanged = all(torch.equal(before[n], p.detach()) for n, p in trainer.params.items())
        last = trainer.train_step(3)["skipped"]
        torch.save({"skipped": skipped + [last], "unchanged": unchanged}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_on_one_process_skips_the_step_on_all(model_dir, tmp_path, strategy):
    """The guards decide on every process together: a NaN reward or log-prob on one process skips the step on
    both (nothing applied anywhere, nobody left waiting in a collective), and the next step trains."""
    mp.spawn(_nan_worker, args=(2, free_port(), model_dir, strategy, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got == {"skipped": [1.0, 1.0, 0.0], "unchanged": True}, (r, got)


@pytest.mark.parametrize("lora", [True, False], ids=["ddp-lora", "fsdp-full"])
def test_two_process_cli_run_and_resume(tmp_path, lora):
    from fusedrl.engine.runs import read_checkpoint, read_metrics

    out, cache = tmp_path / "run", str(tmp_path / "cache")
    argv = ["train", "diffusion-grpo", "--out", str(out), "--prompts.per_step", "2", "--sampling.group_size", "2",
            "--sampling.steps", "2", "--run.steps", "2", "--run.checkpoint_every", "1", "--run.eval_every", "2",
            "--prompts.num_eval", "1", "--no-run.progress", "--no-run.tensorboard", "--grpo.beta", "0.05",
            "--lora.enabled" if lora else "--no-lora.enabled"]
    mp.spawn(cli_worker, args=(2, free_port(), argv, cache), nprocs=2, join=True)
    mp.spawn(cli_worker, args=(2, free_port(), ["train", "diffusion-grpo", "--out", str(out), "--resume",
                                                   "--run.steps", "3", "--no-run.progress"], cache),
             nprocs=2, join=True)
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3] and all(r.get("skipped", 0) == 0 for r in rows)
    log = (out / "train.log").read_text()
    assert "resumed at step=2" in log and f"x 2 processes ({'ddp' if lora else 'fsdp'})" in log
    ckpt = read_checkpoint(out / "checkpoints" / "step-00000003")
    if lora:
        assert all("lora_" in k for k in ckpt.tensors) and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:  # whole tensors, not shards, in the checkpoint, the optimizer state and the saved denoiser
        from diffusers import SD3Transformer2DModel

        saved = dict(SD3Transformer2DModel.from_pretrained(out / "denoiser").named_parameters())
        for k, v in ckpt.tensors.items():
            name = k.removeprefix("param/denoiser.")
            assert torch.equal(saved[name], v), k
        assert len(ckpt.tensors) == len(saved)
        state = ckpt.objects["optim"]["state"]
        assert len(state) == len(ckpt.tensors)
        for k, v in state.items():
            assert not hasattr(v["exp_avg"], "placements") and v["exp_avg"].shape == saved[k].shape, k
