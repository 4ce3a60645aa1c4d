"""LLM GRPO on several processes, on the CPU with gloo (2 processes via torch.multiprocessing.spawn): DDP for LoRA,
FSDP2 (`fully_shard`) for full fine-tuning.

- The gradient of an update split over two processes (each with half the rows, its own micro-batches) equals the
  single-process gradient of the whole mini-batch, for loss types normalised per sequence, per token and per
  generation batch: DDP / FSDP2 average gradients, and the engine scales each process's loss so that the average
  is the global loss's gradient. Under FSDP2 the LM head is sharded and gathered for the fused loss.
- `fusedrl train llm-grpo` run by two processes writes one run folder (rank 0), keeps the ranks in step, and
  resumes; under FSDP2 the checkpoint holds the whole (gathered) model and optimizer state.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .dist_helpers import free_port, setup_process

pytest.importorskip("transformers")
pytest.importorskip("peft")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

PROMPTS = ["1+1=", "12 3+45=", "9", "7+7+7="]
G = 2


def _grad_worker(rank: int, world: int, port: int, model_dir: str, strategy: str) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fusedrl.engine.advantages import group_advantages
        from fusedrl.engine.config import build_config
        from fusedrl.engine.llm.config import LLMGRPOConfig
        from fusedrl.engine.llm.data import PromptRecord
        from fusedrl.engine.llm.generation import generate_completions
        from fusedrl.engine.llm.policy import LoraSpec, Policy, SeqBatch
        from fusedrl.engine.llm.trainer import LLMGRPOTrainer

        torch.manual_seed(0)
        lora = LoraSpec(rank=4) if strategy == "ddp" else None
        policy = Policy.from_pretrained(model_dir, lora=lora)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # The same batch on both processes (same seed), 8 rows = 4 groups; each process trains on its half.
        ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=G, max_new_tokens=5)
        batch = SeqBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        adv = group_advantages(torch.tensor([float(t.count("1")) + 0.1 * len(t) for t in ro.texts]), G)
        old = ro.old_logp + 0.2 * torch.randn(ro.old_logp.shape, generator=g) * ro.completion_mask
        n = ro.num_rows
        half = list(range(rank * n // world, (rank + 1) * n // world))

        def cfg(loss_type, budget):
            return build_config(LLMGRPOConfig, {
                "model.name_or_path": model_dir, "lora.enabled": lora is not None, "sampling.group_size": G,
                "prompts.per_step": len(PROMPTS), "sampling.max_completion_length": 5, "grpo.loss_type": loss_type,
                "memory.token_budget": budget, "optim.max_grad_norm": None, "reward.names": ["numeric_answer"]})

        def grads(trainer, rows, b, a, o):
            sgd = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
            sgd.zero_grad = lambda set_to_none=True: None
            trainer.optimizer, trainer.params = sgd, policy.trainable_parameters()
            policy.model.zero_grad()
            out, reason = trainer.update(b, rows, a, o, None, b.completion_mask)
            assert reason is None
            return out["loss"], {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                                 for k, p in policy.model.named_parameters() if p.requires_grad}

        cases = [("grpo", None), ("bnpo", 12), ("dapo", 12), ("dr_grpo", None)]
        records = [PromptRecord(p) for p in PROMPTS]
        want = {}
        for loss_type, _ in cases:  # the single-process gradient of all rows, one micro-batch
            single = LLMGRPOTrainer(policy, [], records, cfg(loss_type, None))
            single.world_size, single.rank = 1, 0
            want[loss_type] = grads(single, list(range(n)), batch, adv, old)

        policy.parallelize(strategy, torch.device("cpu"))
        if strategy == "fsdp":  # the head and every layer are sharded: each process holds part of the weights
            head = policy.model.get_output_embeddings().weight
            assert hasattr(head, "placements") and head.to_local().shape[0] < head.shape[0]
        sub = batch.select(torch.tensor(half))
        for loss_type, budget in cases:
            trainer = LLMGRPOTrainer(policy, [], records, cfg(loss_type, budget))
            assert trainer.world_size == world and trainer.rank == rank
            loss, got = grads(trainer, list(range(len(half))), sub, adv[half], old[half])
            want_loss, want_grads = want[loss_type]
            assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), (loss_type, loss, want_loss)
            assert max(v.abs().max() for v in want_grads.values()) > 0
            for k in want_grads:
                torch.testing.assert_close(got[k], want_grads[k], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=k, t=loss_type: f"{t} {k}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fusedrl.engine.llm.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("dist") / "llama", arch="llama", hidden_size=32, seed=3))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gradient_equals_single_process(model_dir, strategy):
    mp.spawn(_grad_worker, args=(2, free_port(), model_dir, strategy), nprocs=2, join=True)


def _cli_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    setup_process(rank, world, port)
    from fusedrl.cli import main
    from fusedrl.engine.llm import grpo

    seen = []

    def record(step, trainer):  # every process's trainable weights after each step (ranks must agree)
        from fusedrl.engine.distributed import full_tensor

        seen.append({k: full_tensor(v).detach().cpu().clone() for k, v in trainer.policy.trainable_state().items()})
        gathered = trainer.policy.full_state()  # what a checkpoint writes: host copies on rank 0 only
        assert gathered.keys() == (seen[-1].keys() if rank == 0 else set())

    grpo._after_step = record
    try:
        assert main(argv) == 0
        if seen:
            torch.save(seen[-1], os.path.join(argv[argv.index("--out") + 1], f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("lora", [True, False], ids=["ddp-lora", "fsdp-full"])
def test_two_process_cli_run_and_resume(tmp_path, lora):
    from fusedrl.engine.runs import read_checkpoint, read_metrics

    out = tmp_path / "run"
    argv = ["train", "llm-grpo", "--out", str(out), "--prompts.per_step", "4", "--sampling.group_size", "2",
            "--run.steps", "2", "--run.checkpoint_every", "1", "--no-run.progress", "--no-run.tensorboard",
            "--grpo.beta", "0.05", "--lora.enabled" if lora else "--no-lora.enabled"]
    if not lora:  # FSDP2 with activation checkpointing of the (sharded) decoder layers
        argv += ["--memory.gradient_checkpointing", "full"]
    mp.spawn(_cli_worker, args=(2, free_port(), argv), nprocs=2, join=True)
    mp.spawn(_cli_worker, args=(2, free_port(), ["train", "llm-grpo", "--out", str(out), "--resume",
                                                   "--run.steps", "3", "--no-run.progress"]), nprocs=2, join=True)
    rows = read_metrics(out / "metrics.csv")
    trained = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in trained] == [1, 2, 3] and all(r["skipped"] == 0 for r in trained)
    # evaluations (run.eval_every: before the first step and after the last of each run), the 25 prompts shared
    # out as 13 + 12 (one padded) and gathered back in order
    assert [r["step"] for r in rows if "eval/reward_mean" in r] == [0, 2, 3]
    samples = (out / "samples" / "step-00000000.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in samples] == list(range(25))
    assert "resumed at step=2" in (out / "train.log").read_text() and "x 2 processes" in (out / "train.log").read_text()
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the processes stay in step
    ckpt = read_checkpoint(out / "checkpoints" / "step-00000003")
    assert ckpt.tensors.keys() == a.keys() and all(torch.equal(ckpt.tensors[k], a[k]) for k in a)
    if lora:
        assert all("lora_" in k for k in a) and (out / "final" / "adapter_model.safetensors").is_file()
    else:  # whole tensors, not shards, in the checkpoint and in the saved model
        import transformers

        head = ckpt.tensors.get("lm_head.weight")
        model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
        state = model.state_dict()
        for k, v in ckpt.tensors.items():
            assert torch.equal(state[k], v), k
        assert head is None or head.shape == state["lm_head.weight"].shape
        optim_state = ckpt.objects["optim"]["state"]  # keyed by parameter name, whole tensors
        assert optim_state.keys() == ckpt.tensors.keys()
        for k, v in optim_state.items():
            assert v["exp_avg"].shape == ckpt.tensors[k].shape and not hasattr(v["exp_avg"], "placements"), k


def test_full_finetuning_saved_by_one_process_resumes_on_two(tmp_path):
    """One process saves the optimizer state numbered by parameter (optimizer.state_dict()); FSDP2 loads it by
    parameter name: the resume maps one onto the other (it failed with KeyError 'state.0.step'), and train.log says
    that the samples now differ from an uninterrupted one-process run."""
    from fusedrl.engine.runs import read_checkpoint, read_metrics

    out = tmp_path / "run"
    argv = ["train", "llm-grpo", "--out", str(out), "--prompts.per_step", "4", "--sampling.group_size", "2",
            "--run.steps", "1", "--run.checkpoint_every", "1", "--no-run.progress", "--no-run.tensorboard",
            "--no-lora.enabled", "--run.eval_every", "0"]
    mp.spawn(_cli_worker, args=(1, free_port(), argv), nprocs=1, join=True)
    saved = read_checkpoint(out / "checkpoints" / "step-00000001")
    assert saved.world_size == 1 and all(isinstance(k, int) for k in saved.objects["optim"]["state"])
    mp.spawn(_cli_worker, args=(2, free_port(), ["train", "llm-grpo", "--out", str(out), "--resume",
                                                   "--run.steps", "2", "--no-run.progress"]), nprocs=2, join=True)
    assert [r["step"] for r in read_metrics(out / "metrics.csv") if "skipped" in r] == [1, 2]
    log = (out / "train.log").read_text()
    assert "resumed on 2 processes; checkpoint step-00000001 was saved by 1" in log and "differ" in log
    resumed = read_checkpoint(out / "checkpoints" / "step-00000002")
    assert resumed.world_size == 2
    # Adam's step count went on from the saved one: the moments were taken over, not restarted
    steps = {float(v["step"]) for v in resumed.objects["optim"]["state"].values()}
    assert steps == {2.0}
