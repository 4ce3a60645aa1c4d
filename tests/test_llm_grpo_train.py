"""`fusedrl train llm-grpo` end to end: the embedded default learns its task (the reward clearly rises), and a run
killed mid-way resumes from its checkpoint and ends exactly where the uninterrupted run ends (metrics, weights,
the LoRA adapter), with the run folder every fusedrl trainer writes.

These runs use the torch backend of the kernels: the Triton interpreter (TRITON_INTERPRET=1 in the tests) would
take minutes; the kernels' parity with it is tested in their own files and in test_llm_grpo*.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.llm import grpo as llm_grpo  # noqa: E402
from fusedrl.engine.runs import read_checkpoint, read_metrics  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

QUIET = ["--no-run.progress"]


def _rows(out):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}
            for r in read_metrics(out / "metrics.csv")]


def test_embedded_default_learns(tmp_path, use_backend):
    """No options but the length: the tiny model learns "a+b=" -> a + b; the mean reward of the last 10 steps is
    far above the first 10 (measured here: ~0.1 -> ~0.65 at step 150, seeds 0-3; the full default of 400 steps
    ends near 0.9-0.99)."""
    use_backend("torch")
    out = tmp_path / "run"
    assert main(["train", "llm-grpo", "--out", str(out), "--run.steps", "150", "--no-run.tensorboard", *QUIET]) == 0
    rows = read_metrics(out / "metrics.csv")
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == 150
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 0.2 and last > first + 0.3, (first, last)
    for name in ("config.yaml", "train.log", "metrics.png", "base_model/config.json", "base_model/tokenizer.json",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step-00000150/model/config.json",
                 "samples/step-00000000.jsonl", "samples/step-00000100.jsonl", "samples/step-00000150.jsonl"):
        assert (out / name).is_file(), name
    assert "llm-grpo: done" in (out / "train.log").read_text()
    evals = {r["step"]: r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r}  # run.eval_every 100
    assert sorted(evals) == [0, 100, 150] and evals[150] > evals[0] + 0.2, evals
    samples = [json.loads(line) for line in (out / "samples" / "step-00000150.jsonl").read_text().splitlines()]
    assert len(samples) == 25 and {"prompt", "completion", "answer", "reward", "rewards"} <= samples[0].keys()
    assert sum(r["reward"] for r in samples) / 25 == pytest.approx(evals[150])


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, use_backend, monkeypatch):
    """A run killed at step 5 resumes from step 3 to the uninterrupted run's metrics and weights, evaluations
    included; and evaluating (every 2 steps here) changes nothing in training (its own seed, the training RNG
    streams restored): the same training metrics as a run that never evaluates."""
    use_backend("torch")
    args = ["--lora.enabled", "--lora.rank", "4", "--optim.lr", "0.02", "--grpo.beta", "0.05", "--run.steps", "6",
            "--run.checkpoint_every", "3", "--run.keep_checkpoints", "0", "--run.eval_every", "2", *QUIET]
    whole, killed, plain = tmp_path / "whole", tmp_path / "killed", tmp_path / "plain"
    assert main(["train", "llm-grpo", "--out", str(whole), *args]) == 0
    assert main(["train", "llm-grpo", "--out", str(plain), *args, "--run.eval_every", "0"]) == 0
    training = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows if r["step"]]
    assert training(_rows(whole)) == training(_rows(plain))
    assert [r["step"] for r in _rows(whole) if "eval/reward_mean" in r] == [0, 2, 4, 6]

    def kill_at_5(step, trainer):
        if step == 5:
            raise KeyboardInterrupt

    real_after_step = llm_grpo._after_step
    monkeypatch.setattr(llm_grpo, "_after_step", kill_at_5)
    assert main(["train", "llm-grpo", "--out", str(killed), *args]) == 130
    assert [r["step"] for r in read_metrics(killed / "metrics.csv")] == [0, 1, 2, 3, 4, 5]
    assert not (killed / "checkpoints" / "step-00000006").exists()
    monkeypatch.setattr(llm_grpo, "_after_step", real_after_step)  # (not undo(): it would also unset the backend)
    assert main(["train", "llm-grpo", "--out", str(killed), "--resume", *QUIET]) == 0
    assert "resumed at step=3" in (killed / "train.log").read_text()

    want, got = _rows(whole), _rows(killed)
    assert [r["step"] for r in got] == list(range(0, 7))
    diff = {(r["step"], k): (r[k], w[k]) for r, w in zip(got, want) for k in r if r[k] != w.get(k)}
    assert got == want, diff  # every metric of every step, bit for bit
    assert all(math.isfinite(r["kl"]) for r in got if r["step"]) and any(r.get("kl", 0) > 0 for r in got)
    a = read_checkpoint(whole / "checkpoints" / "step-00000006")
    b = read_checkpoint(killed / "checkpoints" / "step-00000006")
    assert a.tensors.keys() == b.tensors.keys() and all("lora_" in k for k in a.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k

    # The adapter in peft's format loads onto the base model with the real from_pretrained.
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(killed / "base_model")
    adapter = killed / "checkpoints" / "step-00000006" / "lora"
    model = peft.PeftModel.from_pretrained(base, adapter)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded and all(torch.equal(loaded[n], b.tensors[n]) for n in loaded)
    assert (killed / "final" / "adapter_model.safetensors").is_file()
