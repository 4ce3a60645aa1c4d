"""`fusedrl train diffusion-grpo` end to end on the embedded default (the tiny SD3-shaped model built from configs):
the run folder (config, metrics CSV, TensorBoard events, reward-curve PNG, sample grids, a LoRA that diffusers'
`load_lora_weights` loads), resume after a crash equal to an uninterrupted run, and the reward rising."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.config import build_config, read_config_file  # noqa: E402
from fusedrl.engine.diffusion import LoraOptions, load_policy, tiny_model_dir  # noqa: E402
from fusedrl.engine.diffusion.grpo import TINY_LORA_TARGETS, DiffusionGRPOConfig, GRPOTrainer  # noqa: E402
from fusedrl.engine.runs import read_checkpoint, read_metrics  # noqa: E402

FAST = ["--run.steps", "4", "--run.eval_every", "2", "--run.checkpoint_every", "2", "--prompts.per_step", "2",
        "--sampling.group_size", "4", "--sampling.steps", "4", "--no-run.progress"]


@pytest.fixture(scope="module", autouse=True)
def _embedded_model_cache(tmp_path_factory):
    # the embedded default is built on first use into $FUSEDRL_CACHE; keep it out of the home folder
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEDRL_CACHE", str(tmp_path_factory.mktemp("fusedrl_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    # The kernels' own tests run them under TRITON_INTERPRET=1 (80x slower than torch here: 20 s per step of the
    # embedded default); the trainer's tests take the torch path, as CPU tensors do outside the test suite.
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    before = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(before)


def _rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in read_metrics(out / "metrics.csv")]


@pytest.mark.slow
def test_cli_embedded_default_fills_the_run_folder(tmp_path):
    import diffusers

    out = tmp_path / "run"
    assert main(["train", "diffusion-grpo", "--out", str(out), *FAST]) == 0
    saved = read_config_file(out / "config.yaml")
    assert saved["model"]["model"] is None and saved["run"]["steps"] == 4 and saved["reward"]["names"] == ["brightness"]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/reward_mean" in r] == [0, 2, 4]
    assert all(r["skipped"] == 0 and r["onpolicy_ratio_err"] <= 1e-5 for r in rows[1:])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "metrics.png").stat().st_size > 1000
    assert [p.name for p in sorted((out / "samples").glob("*.png"))] == \
        ["step-00000000.png", "step-00000002.png", "step-00000004.png"]
    log = (out / "train.log").read_text()
    assert "reward_mean: first 1 steps" in log and "diffusion-grpo: sd3 model on cpu, LoRA" in log
    assert (out / "checkpoints" / "step-00000004" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # diffusers loads the LoRA; the loaded pipeline computes what the trained policy computes
    tiny = tiny_model_dir("sd3")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(out / "lora")
    loaded = load_policy(pipe, lora=False)
    trained = load_policy(tiny, lora=LoraOptions(target_modules=TINY_LORA_TARGETS))
    ckpt = read_checkpoint(out / "checkpoints" / "step-00000004")
    params = dict(trained.denoiser.named_parameters())
    with torch.no_grad():
        for key, value in ckpt.tensors.items():
            params[key.removeprefix("param/denoiser.")].copy_(value)
    assert any(v.abs().sum() > 0 for k, v in ckpt.tensors.items() if "lora_B" in k)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained.predict(x, 500.0, trained.encode_prompts(["a cat", "a dog"]))
        theirs = loaded.predict(x, 500.0, loaded.encode_prompts(["a cat", "a dog"]))
        base = load_policy(tiny, lora=False)
        untrained = base.predict(x, 500.0, base.encode_prompts(["a cat", "a dog"]))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - untrained).abs().max() > 1e-4


def _crash_at(step: int, out, args: list[str], monkeypatch) -> None:
    """`fusedrl train diffusion-grpo` into `out`, killed by an exception at the start of training step `step`."""
    real = GRPOTrainer.train_step

    def crashing(self, s):
        if s == step:
            raise RuntimeError(f"simulated crash at step {step}")
        return real(self, s)

    with monkeypatch.context() as m:
        m.setattr(GRPOTrainer, "train_step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(["train", "diffusion-grpo", "--out", str(out), *args])


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = [*FAST, "--run.steps", "6", "--run.eval_every", "3", "--run.keep_checkpoints", "0"]
    ref, out = tmp_path / "ref", tmp_path / "crashed"
    assert main(["train", "diffusion-grpo", "--out", str(ref), *args]) == 0

    _crash_at(6, out, args, monkeypatch)
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4, 5]  # step 5 logged, never checkpointed
    assert main(["train", "diffusion-grpo", "--out", str(out), "--resume"]) == 0
    log = (out / "train.log").read_text()
    assert "resumed at step=4" in log and "dropped 1 metric rows" in log
    assert _rows(out) == _rows(ref)
    for step in ("step-00000004", "step-00000006"):
        a, b = read_checkpoint(ref / "checkpoints" / step), read_checkpoint(out / "checkpoints" / step)
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_per_prompt_statistics_carry_over_steps_and_through_a_resume(tmp_path, monkeypatch):
    """grpo.prompt_stats_buffer (DDPO's per-prompt stat tracking) with two prompts seen at every step: from the
    second step on, each prompt's advantages use its earlier rewards too; a run resumed from step 2's checkpoint
    restores those buffers and logs what the uninterrupted run logged."""
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red apple\na blue sky\n")
    args = [*FAST, "--prompts.train", str(prompts), "--grpo.prompt_stats_buffer", "8", "--grpo.prompt_stats_min_count",
            "4", "--run.keep_checkpoints", "0"]
    ref, out = tmp_path / "ref", tmp_path / "crashed"
    assert main(["train", "diffusion-grpo", "--out", str(ref), *args]) == 0
    ckpt = read_checkpoint(ref / "checkpoints" / "step-00000002")
    assert sorted(ckpt.state["prompt_stats"]) == ["a blue sky", "a red apple"]
    assert all(len(buf) == 8 for buf in ckpt.state["prompt_stats"].values())  # 4 images per prompt and step

    _crash_at(4, out, args, monkeypatch)
    assert main(["train", "diffusion-grpo", "--out", str(out), "--resume"]) == 0
    assert _rows(out) == _rows(ref)  # without the restored buffers, step 3 would normalize by its own rewards alone


@pytest.mark.slow
def test_embedded_default_reward_rises():
    """The embedded default's settings (model, reward, LoRA targets, lr, batch), fewer steps."""
    torch.set_num_threads(1)
    cfg = build_config(DiffusionGRPOConfig, {"run.steps": 80})
    trainer = GRPOTrainer(cfg)
    rewards = [trainer.train_step(step)["reward_mean"] for step in range(1, 81)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\n[embedded default] reward_mean: first 5 steps {first:.4f} -> last 5 steps {last:.4f}")
    assert last > first + 0.02  # measured: 0.517 -> 0.602 (the std of one sample: 0.006)
