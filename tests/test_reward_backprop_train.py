"""`fusedrl train reward-backprop` end to end on the embedded default (the tiny SD3-shaped model, brightness):
the run folder is filled and its LoRA loads with diffusers' `load_lora_weights`; a run killed after its last
checkpoint and resumed equals the uninterrupted run exactly; the reward rises."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.config import build_config  # noqa: E402
from fusedrl.engine.diffusion import LoraOptions, load_policy, tiny_model_dir  # noqa: E402
from fusedrl.engine.diffusion.reward_backprop import RewardBackprop, RewardBackpropConfig  # noqa: E402
from fusedrl.engine.diffusion.reward_backprop_config import EMBEDDED_LORA_TARGETS  # noqa: E402
from fusedrl.engine.runs import Run, read_checkpoint, read_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    # the embedded model is built into a test cache, not ~/.cache; the Triton interpreter stays out of the way
    monkeypatch.setenv("FUSEDRL_CACHE", str(tmp_path_factory.getbasetemp() / "fusedrl-cache"))
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the embedded default runs (train() sets it, then restores the caller's)
    yield
    torch.set_num_threads(threads)


FAST = ["--no-run.progress", "--no-run.tensorboard"]


def _rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "step_time")} for r in read_metrics(out / "metrics.csv")]


@pytest.mark.slow
def test_embedded_default_fills_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "reward-backprop", "--out", str(out), "--run.steps", "4", "--run.eval_every", "2",
                 "--run.checkpoint_every", "2", "--no-run.progress"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "train.log", "metrics.csv", "metrics.png", "tensorboard", "samples", "checkpoints",
            "lora"} <= names
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step-0000000{i}.png" for i in (0, 2, 4)]
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000002", "step-00000004"]
    assert (out / "checkpoints" / "step-00000004" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/reward_mean" in rows[0] and "reward_mean" in rows[1] and rows[4]["skipped"] == 0
    text = (out / "config.yaml").read_text()
    assert "method: alignprop" in text and "names: [brightness]" in text and "model: null" in text
    assert "reward-backprop: method=alignprop model=embedded tiny SD3" in (out / "train.log").read_text()

    # the LoRA file loads into a fresh pipeline with diffusers' own loader, and gives the trained model
    from diffusers import StableDiffusion3Pipeline

    model_dir = tiny_model_dir("sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out / "lora"))
    trained = load_policy(model_dir, lora=LoraOptions(target_modules=EMBEDDED_LORA_TARGETS))
    tensors = read_checkpoint(out / "checkpoints" / "step-00000004").tensors
    with torch.no_grad():
        for name, p in trained.denoiser.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"denoiser.{name}"])
    emb = trained.encode_prompts(["a red apple"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    with torch.no_grad():
        got = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb.embeds,
                               pooled_projections=emb.pooled).sample
        pipe.transformer.disable_adapters()
        base = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb.embeds,
                                pooled_projections=emb.pooled).sample
    torch.testing.assert_close(got, trained.predict(x, t, emb), rtol=1e-5, atol=1e-6)
    assert (got - base).abs().max() > 1e-4  # the adapter is not the identity after training


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["train", "reward-backprop", "--run.steps", "6", "--run.checkpoint_every", "2", "--run.eval_every", "3",
            "--run.keep_checkpoints", "0", "--sampling.batch_size", "4", "--method", "draft-lv", *FAST]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main([*args, "--out", str(full)]) == 0

    real_log = Run.log

    def dying_log(self, step, metrics):
        real_log(self, step, metrics)
        if step == 5:  # after step 5 is logged; the last checkpoint is step 4's
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(Run, "log", dying_log)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main([*args, "--out", str(killed)])
    monkeypatch.setattr(Run, "log", real_log)
    assert [r["step"] for r in read_metrics(killed / "metrics.csv")][-1] == 5
    assert main([*args, "--out", str(killed), "--resume"]) == 0

    assert _rows(killed) == _rows(full)  # steps 5 and 6 recomputed, logged once, with the same numbers
    for step in (4, 6):
        a = read_checkpoint(full / "checkpoints" / f"step-0000000{step}")
        b = read_checkpoint(killed / "checkpoints" / f"step-0000000{step}")
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert "resumed at step=4" in (killed / "train.log").read_text()
    state = json.loads((killed / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["state"]["skipped_total"] == 0


@pytest.mark.slow
def test_embedded_default_reward_rises():
    cfg = build_config(RewardBackpropConfig, {"prompts.num_eval": 4})
    trainer = RewardBackprop.build(cfg)
    before, _, _ = trainer.evaluate()
    rewards = [trainer.train_step(step)["reward_mean"] for step in range(1, 31)]
    after, _, _ = trainer.evaluate()
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # the tiny model's images vary by ~0.005 in brightness at the start; 30 steps move them by ~0.1
    assert last > first + 0.05, rewards
    assert after["eval/reward_mean"] > before["eval/reward_mean"] + 0.05, (before, after)
    assert all(b >= a - 0.01 for a, b in zip(rewards[5:], rewards[10:]))  # no collapse along the way
