"""fusedrl.engine.diffusion.grpo (`fusedrl train diffusion-grpo`), fast parts: --help documents every option, a
bad config fails before any model loads, one GRPO step on tiny SD1.5-, SD3- and Flux-shaped models with the
on-policy ratio exactly 1 in fp32, off-policy updates under the clip, NaN/inf rewards and log-probs skipped with the
weights and optimizer state untouched, the KL to the adapter-off reference, EMA, gradient checkpointing giving the
same step, background rewards giving the same numbers, and the out-of-memory message."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.config import ConfigError, build_config, iter_fields  # noqa: E402
from fusedrl.engine.diffusion import tiny_model_dir  # noqa: E402
from fusedrl.engine.diffusion.grpo import (  # noqa: E402
    DiffusionGRPOConfig,
    DiffusionGRPOOutOfMemory,
    GRPOTrainer,
)

FAMILIES = ("sd3", "sd", "flux")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models_grpo")
    return {fam: tiny_model_dir(fam, root) for fam in FAMILIES}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # The kernels' own tests run them under TRITON_INTERPRET=1 (80x slower than torch here: 20 s per step of the
    # embedded default); the trainer's tests take the torch path, as CPU tensors do outside the test suite.
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    # The tiny models' ops are too small to share out; two threads spin-wait on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's masked 1 / std of DDIM eta = 0 steps
        yield
    torch.set_num_threads(before)


def _cfg(model: Path | None, **over) -> DiffusionGRPOConfig:
    base = {"model.model": str(model) if model is not None else None, "prompts.per_step": 2,
            "sampling.group_size": 2, "sampling.steps": 3, "sampling.micro_batch": 2, "optim.lr": 1e-2,
            "run.seed": 7}
    return build_config(DiffusionGRPOConfig, {**base, **over})


def _snapshot(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.params.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ config and CLI


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "diffusion-grpo", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: fusedrl train diffusion-grpo") and "embedded default" in out
    leaves = [fi for fi in iter_fields(DiffusionGRPOConfig) if not fi.is_section]
    assert len(leaves) > 60
    for fi in leaves:
        assert fi.help, f"{fi.path} has no help text"
        assert f"--{fi.path}" in out, f"--{fi.path} missing from --help"
    for text in ("PPO clip range", "LoRA rank", "(default: 0.0001)", "--grpo.ema, --no-grpo.ema",
                 "{none,full,save_attention,save_attention_and_matmuls,offload}"):
        assert text in out


def test_bad_config_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import fusedrl.engine.diffusion.policy as policy_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(policy_mod, "load_policy", refuse)
    out = tmp_path / "run"
    rc = main(["train", "diffusion-grpo", "--out", str(out), "--sampling.group_size", "1", "--optim.lr", "-1",
               "--reward.names", "brightnes", "--prompts.train", str(tmp_path / "missing.txt"),
               "--grpo.clip_range", "0", "--model.model", str(tmp_path / "nope")])
    assert rc == 2
    err = capsys.readouterr().err
    for text in ("sampling.group_size: must be >= 2", "optim.lr: must be > 0; got -1.0", "reward.names:",
                 "unknown reward 'brightnes'", "prompts.train: the prompt file", "missing.txt",
                 "grpo.clip_range: must be > 0", "model.model: the folder"):
        assert text in err, text
    assert not out.exists()


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = build_config(DiffusionGRPOConfig, {"grpo": {"beta": 0.04}, "lora.rank": 4})
    assert cfg.grpo.beta == 0.04 and cfg.lora.rank == 4 and cfg.reward.names == ["brightness"]
    with pytest.raises(ConfigError, match=r"grpo.clip: unknown key; did you mean 'grpo.clip_range'"):
        build_config(DiffusionGRPOConfig, {"grpo.clip": 0.1})
    with pytest.raises(ConfigError, match=r"sampling.sde_window: must satisfy 0 <= start < end <= "
                       r"sampling.steps = 10; got \[2, 20\]"):
        build_config(DiffusionGRPOConfig, {"sampling.sde_window": [2, 20]})
    dashed = build_config(DiffusionGRPOConfig, {"reward.names": ["brightness", "jpeg-compressibility"],
                                                "reward.options.jpeg-compressibility": {"quality": 90}})
    assert dashed.reward.options == {"jpeg-compressibility": {"quality": 90}}  # dotted keys with a dashed name
    with pytest.raises(ConfigError, match="reference_ema_decay is for full fine-tuning"):
        build_config(DiffusionGRPOConfig, {"grpo.reference_ema_decay": 0.9})
    with pytest.raises(ConfigError, match=r"grpo.prompt_stats_min_count \(16\) exceeds grpo.prompt_stats_buffer \(8\)"):
        build_config(DiffusionGRPOConfig, {"grpo.prompt_stats_buffer": 8})
    with pytest.raises(ConfigError, match="grpo.std 'none' has no effect with grpo.prompt_stats_buffer"):
        build_config(DiffusionGRPOConfig, {"grpo.prompt_stats_buffer": 16, "grpo.std": "none"})
    with pytest.raises(ConfigError, match="does not combine with reward.normalize per_reward"):
        build_config(DiffusionGRPOConfig, {"grpo.prompt_stats_buffer": 16, "reward.normalize": "per_reward",
                                           "reward.names": ["brightness", "jpeg_compressibility"]})
    with pytest.raises(ConfigError, match=r"reward.names: \['brightness'\] listed more than once"):
        build_config(DiffusionGRPOConfig, {"reward.names": ["brightness", "brightness"], "reward.weights": [1, -1]})


def test_reward_device_goes_to_the_rewards_that_take_one():
    """reward.device with a rule-based reward that takes no device (JPEG) beside one that does: each loads (the
    device was passed to every reward, and the JPEG one's refusal blamed reward.options)."""
    from fusedrl.engine.diffusion.grpo import build_rewards

    cfg = build_config(DiffusionGRPOConfig, {"reward.names": ["brightness", "jpeg_compressibility"],
                                            "reward.device": "cpu"})
    scorer = build_rewards(cfg, "cpu")
    assert set(scorer.rewards) == {"brightness", "jpeg_compressibility"}


def test_sde_window_moves_over_training_and_stops_at_either_end():
    def windows(window, every, stride, steps=6):
        cfg = build_config(DiffusionGRPOConfig, {"sampling.steps": steps, "sampling.sde_window": window,
                                                 "sampling.window_shift_every": every,
                                                 "sampling.window_shift_stride": stride})
        return [cfg.sampling.window_at(step) for step in range(1, 13)]

    # MixGRPO: forwards by 1 every 2 steps, then held at the last steps
    assert windows([0, 2], 2, 1) == [(0, 2)] * 2 + [(1, 3)] * 2 + [(2, 4)] * 2 + [(3, 5)] * 2 + [(4, 6)] * 4
    # B2-DiffuRL: from the last steps backwards by 2 every 3 steps, then held at the first steps
    assert windows([3, 6], 3, -2) == [(3, 6)] * 3 + [(1, 4)] * 3 + [(0, 3)] * 6
    assert windows([1, 3], 0, 1) == [(1, 3)] * 12  # no shift: the window stays
    assert build_config(DiffusionGRPOConfig, {}).sampling.window_at(5) is None  # every step is an SDE step
    with pytest.raises(ConfigError, match="window_shift_every: moves sampling.sde_window, which is not set"):
        build_config(DiffusionGRPOConfig, {"sampling.window_shift_every": 2})
    with pytest.raises(ConfigError, match="window_shift_stride: must not be 0"):
        build_config(DiffusionGRPOConfig, {"sampling.window_shift_stride": 0})


def test_random_window_as_flow_grpo_fast():
    """sampling.window_random_range: each step puts sde_window's size at a random start in [lo, hi - size], drawn
    from the run's seed and the step (every process the same window); bad ranges are refused."""
    cfg = build_config(DiffusionGRPOConfig, {"sampling.steps": 10, "sampling.sde_window": [0, 2],
                                             "sampling.window_random_range": [1, 6]})
    windows = [cfg.sampling.window_at(step, seed=7) for step in range(1, 41)]
    assert all(a >= 1 and b == a + 2 and b <= 6 for a, b in windows)
    assert {a for a, _ in windows} == {1, 2, 3, 4}  # every start is drawn
    assert windows == [cfg.sampling.window_at(step, seed=7) for step in range(1, 41)]  # seeded
    assert windows != [cfg.sampling.window_at(step, seed=8) for step in range(1, 41)]
    for over, match in [({"sampling.window_random_range": [0, 4]}, "places sampling.sde_window"),
                        ({"sampling.sde_window": [0, 3], "sampling.window_random_range": [2, 4]}, "hi - 3"),
                        ({"sampling.sde_window": [0, 2], "sampling.window_random_range": [0, 11]}, "hi <= "),
                        ({"sampling.sde_window": [0, 2], "sampling.window_random_range": [0, 4],
                          "sampling.window_shift_every": 1}, "does not also slide"),
                        ({"sampling.sde_type": "cps", "sampling.sde_window": [0, 1],
                          "sampling.window_random_range": [5, 10]}, "can reach the last step")]:
        with pytest.raises(ConfigError, match=match):
            build_config(DiffusionGRPOConfig, {"sampling.steps": 10, **over})


def test_training_samples_the_moved_window_and_evaluation_the_configured_one(tiny_dirs, monkeypatch):
    cfg = _cfg(tiny_dirs["sd3"], **{"sampling.steps": 4, "sampling.sde_window": [0, 2],
                                    "sampling.window_shift_every": 1})
    trainer = GRPOTrainer(cfg)
    seen = []
    sample = trainer._sample

    def spy(prompts, group_size, window=None, **randomness):
        traj = sample(prompts, group_size, window, **randomness)
        seen.append(traj.sde_steps.tolist())
        return traj

    monkeypatch.setattr(trainer, "_sample", spy)
    metrics = [trainer.train_step(step) for step in (1, 2, 3)]
    assert [m["sde_window_start"] for m in metrics] == [0.0, 1.0, 2.0]
    assert seen == [[0, 1]] * 2 + [[1, 2]] * 2 + [[2, 3]] * 2  # two sample calls per step (micro_batch 2 of 4)
    assert all(m["skipped"] == 0 and m["onpolicy_ratio_err"] <= 1e-5 for m in metrics)
    seen.clear()
    trainer.evaluate(3)
    assert seen == [[0, 1]]  # evaluation grids stay comparable: the configured window


def test_pareto_selection_keeps_the_non_dominated_samples_and_trains_only_on_them(tiny_dirs):
    cfg = _cfg(tiny_dirs["sd3"], **{"reward.pareto": "batch"})
    trainer = GRPOTrainer(cfg)
    trainer.weights = {"a": 1.0, "b": -1.0, "off": 0.0}  # b: lower is better; a zero weight is no objective
    raw = {"a": torch.tensor([3.0, 1.0, 2.0, 0.0]), "b": torch.tensor([1.0, 0.0, 2.0, 1.0]),
           "off": torch.tensor([0.0, 9.0, 9.0, 9.0])}
    assert trainer.selected(raw).tolist() == [True, True, False, False]  # sample 0 beats samples 2 and 3
    trainer.cfg.reward.pareto = "group"  # groups {0, 1} and {2, 3}: nobody is beaten within their group
    assert trainer.selected(raw).tolist() == [True, True, True, True]
    trainer.cfg.reward.pareto = "none"
    assert trainer.selected(raw) is None  # no selection: every sample trains

    cfg = _cfg(tiny_dirs["sd3"], **{"reward.pareto": "batch"})  # (the one above was changed in place)
    m = GRPOTrainer(cfg).train_step(1)  # one reward (brightness): only the step's brightest image is kept
    assert m["skipped"] == 0 and m["pareto_frac"] == 0.25 and m["updates"] == 1
    # one update per micro-batch of 2: the one without the kept image is no update at all (AdamW would move)
    single = _cfg(tiny_dirs["sd3"], **{"reward.pareto": "batch", "optim.grad_accum": 1, "grpo.beta": 0.05})
    m = GRPOTrainer(single).train_step(1)
    assert m["skipped"] == 0 and m["updates"] == 1 and m["kl"] == pytest.approx(0.0, abs=1e-8)

    traj, _, micro, _ = GRPOTrainer(cfg).sample_and_score(1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    keep = torch.tensor([True, False, True, False])

    def update(adv, keep, **over):
        t = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"reward.pareto": "batch", **over}))
        metrics = t._optimize(1, traj, adv, micro, keep)
        return _snapshot(t), metrics

    kept, m = update(adv, keep)
    assert m["updates"] == 1
    # the samples not kept weigh nothing: other advantages for them give the same update
    same, _ = update(torch.tensor([1.0, 3.0, 0.5, 2.0]), keep)
    assert _same(kept, same)
    moved, _ = update(torch.tensor([1.0, -1.0, -0.5, -0.5]), keep)
    assert not _same(kept, moved)
    # keeping every sample is the unselected step (the mean over all samples)
    every, _ = update(adv, torch.ones(4, dtype=torch.bool))
    plain, _ = update(adv, None, **{"reward.pareto": "none"})
    assert every.keys() == plain.keys()
    for name in every:
        torch.testing.assert_close(every[name], plain[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("family", FAMILIES)
def test_one_grpo_step_updates_lora_on_policy(tiny_dirs, family):
    guidance = {"sd3": 2.0, "sd": 2.0, "flux": 3.5}[family]
    cfg = _cfg(tiny_dirs[family], **{"sampling.guidance_scale": guidance, "grpo.beta": 0.05,
                                     "grpo.timestep_fraction": 0.67})
    trainer = GRPOTrainer(cfg)
    assert trainer.policy.family == family and trainer.policy.has_lora
    before = _snapshot(trainer)
    m = trainer.train_step(1)
    assert m["skipped"] == 0 and m["updates"] == 1 and m["trained_timesteps"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    # the recorded log-probs equal the recomputed ones: one update per step, so every ratio is on policy
    assert m["onpolicy_ratio_err"] <= 1e-5 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-8)  # LoRA B starts at 0: the policy is the reference
    after = _snapshot(trainer)
    assert not _same(before, after)
    assert all(n.startswith("denoiser.") and "lora_" in n for n in after)
    # the next step starts from the updated policy: the KL to the adapter-off reference is now > 0
    m2 = trainer.train_step(2)
    assert m2["kl"] > 0 and m2["onpolicy_ratio_err"] <= 1e-5


def test_text_encoder_only_lora_step(tiny_dirs):
    """TexForce: LoRA on the CLIP text encoders alone. The step trains only them, on policy; the reference (adapter
    off) re-encodes the prompts without them, so the KL is 0 at first and > 0 once they have moved."""
    cfg = _cfg(tiny_dirs["sd3"], **{"lora.denoiser": False, "lora.text_encoder": True, "grpo.beta": 0.05,
                                    "sampling.guidance_scale": 2.0, "optim.lr": 5e-2})
    trainer = GRPOTrainer(cfg)
    assert trainer.policy.trained_part() == "LoRA on the text encoder(s)"
    before = _snapshot(trainer)
    assert before and all(n.startswith("text_encoder_") and "lora_" in n for n in before)
    m = trainer.train_step(1)
    assert m["skipped"] == 0 and m["updates"] == 1
    assert m["onpolicy_ratio_err"] <= 1e-5 and m["kl"] == pytest.approx(0.0, abs=1e-8)
    assert not _same(before, _snapshot(trainer))
    m2 = trainer.train_step(2)
    assert m2["kl"] > 0 and m2["onpolicy_ratio_err"] <= 1e-5


@pytest.mark.parametrize(("over", "message"), [
    ({"lora.denoiser": False}, "lora.denoiser: false leaves LoRA on nothing"),
    ({"lora.denoiser": False, "lora.text_encoder": True, "lora.target_modules": ["to_q"]},
     "lora.target_modules: names denoiser modules, but lora.denoiser is false"),
])
def test_lora_placement_errors_name_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        build_config(DiffusionGRPOConfig, over)


def test_several_updates_per_step_are_off_policy_and_clipped(tiny_dirs):
    cfg = _cfg(tiny_dirs["sd3"], **{"optim.grad_accum": 1, "sampling.micro_batch": 1, "prompts.per_step": 2,
                                    "optim.lr": 0.05, "grpo.clip_range": 1e-5})
    trainer = GRPOTrainer(cfg)
    m = trainer.train_step(1)
    assert m["updates"] == 4  # 4 micro-batches of one sample, one update each
    assert m["onpolicy_ratio_err"] <= 1e-5  # measured on the micro-batch before the first update
    assert m["clip_frac"] > 0  # later micro-batches see a moved policy; their ratios leave [1 - eps, 1 + eps]


def test_trained_timesteps_are_a_seeded_subset(tiny_dirs):
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"grpo.timestep_fraction": 0.5,
                                                   "grpo.timestep_selection": "random"}))
    picks = [trainer.trained_steps(s, list(range(10))) for s in (1, 2, 1)]
    assert all(len(p) == 5 and p == sorted(p) for p in picks)
    assert picks[0] == picks[2] and picks[0] != picks[1]


@pytest.mark.parametrize("fraction,count", [(0.99, 9), (0.3, 3), (0.5, 5), (0.05, 1), (1.0, 10)])
def test_trained_timesteps_count_and_order_as_flow_grpo(tiny_dirs, fraction, count):
    """Flow-GRPO trains the first int(num_steps x timestep_fraction) steps (its 0.99 leaves the last one out)."""
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"grpo.timestep_fraction": fraction}))
    assert trainer.trained_steps(1, list(range(10))) == list(range(count))


def test_nan_reward_skips_the_step_and_changes_nothing(tiny_dirs):
    calls = []

    def flaky(images, prompts):
        calls.append(1)
        r = images.mean(dim=(1, 2, 3))
        if len(calls) == 1:
            r[1] = float("nan")
        return r

    cfg = _cfg(tiny_dirs["sd3"], **{"grpo.max_consecutive_skips": 2})
    trainer = GRPOTrainer(cfg, rewards={"flaky": flaky})
    before = _snapshot(trainer)
    m = trainer.train_step(1)
    assert m["skipped"] == 1 and "loss" not in m and trainer.skipped_total == 1
    assert _same(before, _snapshot(trainer))
    assert not trainer.optimizer.state  # AdamW never stepped
    assert all(p.grad is None for p in trainer.params.values())
    m = trainer.train_step(2)  # finite again: the update is applied
    assert m["skipped"] == 0 and not _same(before, _snapshot(trainer)) and trainer.consecutive_skips == 0


def test_inf_reward_every_step_stops_after_max_consecutive_skips(tiny_dirs):
    cfg = _cfg(tiny_dirs["sd3"], **{"grpo.max_consecutive_skips": 2})
    trainer = GRPOTrainer(cfg, rewards={"bad": lambda images, prompts: torch.full((len(images),), float("inf"))})
    assert trainer.train_step(1)["skipped"] == 1
    with pytest.raises(RuntimeError, match="2 steps in a row were skipped"):
        trainer.train_step(2)


def test_nan_log_probs_skip_the_update(tiny_dirs, monkeypatch):
    import fusedrl.engine.diffusion.sampling as sampling

    real = sampling.recompute_logprobs
    seen = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == 2:  # the second (micro-batch, timestep): a gradient is already accumulated
            out.log_probs = out.log_probs * float("nan")
        return out

    monkeypatch.setattr(sampling, "recompute_logprobs", poisoned)
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"]))
    before = _snapshot(trainer)
    m = trainer.train_step(1)
    assert m["skipped"] == 1 and "reward_mean" in m
    assert _same(before, _snapshot(trainer)) and not trainer.optimizer.state
    assert all(p.grad is None for p in trainer.params.values())


@pytest.mark.parametrize(("blocks", "offload"), [(None, True), (1, False)])
def test_gradient_checkpointing_and_background_rewards_give_the_same_step(tiny_dirs, blocks, offload, monkeypatch):
    """Checkpointing every block with the inputs that require grad offloaded (memory.offload_block_inputs; CPU
    tensors count as offloadable here: block 1's), or only the first block (memory.checkpoint_blocks), changes
    nothing in the step."""
    from fusedrl.engine import input_offload
    from fusedrl.engine.checkpointing import iter_wrappers

    monkeypatch.setattr(input_offload, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(input_offload, "MIN_BYTES", 0)
    ref = GRPOTrainer(_cfg(tiny_dirs["sd3"]))
    m_ref = ref.train_step(1)
    other = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"memory.gradient_checkpointing": "full",
                                                 "memory.checkpoint_blocks": blocks, "reward.background": True,
                                                 "memory.offload_block_inputs": offload}))
    assert other.checkpointed == ["transformer_blocks.0", "transformer_blocks.1"][:blocks]
    assert all(w.offload_inputs == offload for _, w in iter_wrappers(other.policy.denoiser))
    assert other.params.keys() == ref.params.keys()  # names do not depend on the wrappers
    m = other.train_step(1)
    for key in ("reward_mean", "loss", "logp_mean"):
        assert m[key] == m_ref[key], key
    assert m["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-5)
    for n, p in ref.params.items():
        torch.testing.assert_close(other.params[n], p, rtol=1e-5, atol=1e-7)


def test_ema_and_full_finetuning_with_a_reference_copy(tiny_dirs):
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"grpo.ema": True, "grpo.ema_decay": 0.5}))
    trainer.train_step(1)
    trainer.train_step(2)
    name, p = next(iter(trainer.params.items()))
    shadow = trainer.ema.shadow[name]
    assert not torch.equal(shadow, p) and shadow.abs().sum() > 0
    with trainer.ema.swapped():
        assert torch.equal(p, shadow)
    assert not torch.equal(p, shadow)

    full = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"lora.enabled": False, "grpo.beta": 0.1, "optim.lr": 1e-3,
                                                "grpo.reference_ema_decay": 0.5}))
    assert not full.policy.has_lora and all("lora" not in n for n in full.params)
    full.train_step(1)
    m = full.train_step(2)
    assert m["skipped"] == 0 and m["kl"] > 0


def test_full_finetuning_with_a_bf16_reference_and_its_ema(tiny_dirs):
    """bf16 weights (what "auto" loads on CUDA): the trained denoiser is fp32 while the frozen reference copy stays
    bf16, which took fp32 inputs (a dtype error at the first KL); its EMA runs in fp32 (in bf16 most of each small
    step rounded away) and is checkpointed (a resume reset it to the loaded weights)."""
    over = {"lora.enabled": False, "grpo.beta": 0.1, "optim.lr": 1e-3, "grpo.reference_ema_decay": 0.9,
            "model.dtype": "bf16"}
    full = GRPOTrainer(_cfg(tiny_dirs["sd3"], **over))
    ref = full.policy._reference_model
    assert next(ref.parameters()).dtype == torch.bfloat16 and full.policy.compute_dtype == torch.float32
    before = [r.detach().float().clone() for r in ref.parameters()]
    assert full.train_step(1)["skipped"] == 0
    m = full.train_step(2)
    assert m["skipped"] == 0 and m["kl"] > 0
    master = full.policy.reference_state()
    assert master and all(t.dtype == torch.float32 for t in master)
    moved = sum(int((t != b).sum()) for t, b in zip(master, before))
    assert moved > 0.9 * sum(t.numel() for t in master)  # fp32: every element that the training moved
    state = full.state_tensors()
    assert sum(k.startswith("reference/") for k in state) == len(master)

    again = GRPOTrainer(_cfg(tiny_dirs["sd3"], **over))
    ckpt = types.SimpleNamespace(tensors=state, objects={"optim": full.policy.optimizer_state(full.optimizer)},
                                 state={}, path="memory")
    again.load_state(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(again.policy.reference_state(), master))
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(again.policy._reference_model.parameters(), master))


def test_fp16_weights_train_with_loss_scaling(tiny_dirs):
    """fp16 weights without fp16 autocast: the backward runs in fp16 all the same, so the loss is scaled (a GRPO
    step's per-element gradients underflowed to zero)."""
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"model.dtype": "fp16"}))
    assert trainer.policy.compute_dtype == torch.float16 and trainer.scaler is not None
    before = _snapshot(trainer)
    assert trainer.train_step(1)["skipped"] == 0
    assert not _same(before, _snapshot(trainer))


def test_full_finetuning_exports_its_ema(tiny_dirs, tmp_path):
    """Full fine-tuning with grpo.ema saves denoiser_ema/ beside denoiser/ (only LoRA's EMA was exported)."""
    import diffusers

    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"lora.enabled": False, "grpo.ema": True, "grpo.ema_decay": 0.5,
                                                   "optim.lr": 1e-3}))
    trainer.train_step(1)
    trainer.train_step(2)
    trainer.save_weights(tmp_path)
    load = lambda name: diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / name).state_dict()
    weights, ema = load("denoiser"), load("denoiser_ema")
    name = "denoiser.pos_embed.proj.weight"  # trainer.params are named "denoiser.<the model's own name>"
    key = name.removeprefix("denoiser.")
    torch.testing.assert_close(ema[key], trainer.ema.shadow[name].to(ema[key].dtype))
    torch.testing.assert_close(weights[key], trainer.params[name].detach().to(weights[key].dtype))
    assert not torch.equal(ema[key], weights[key])


def test_mixed_precision_bf16_step_runs(tiny_dirs):
    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"], **{"optim.mixed_precision": "bf16"}))
    m = trainer.train_step(1)
    assert m["skipped"] == 0 and torch.isfinite(torch.tensor(m["loss"]))
    print(f"\n[bf16 autocast, CPU] on-policy max |ratio - 1| = {m['onpolicy_ratio_err']:.3g}")
    assert m["onpolicy_ratio_err"] <= 1e-2


def test_out_of_memory_names_the_settings_to_lower(tiny_dirs, monkeypatch):
    import fusedrl.engine.diffusion.sampling as sampling

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = GRPOTrainer(_cfg(tiny_dirs["sd3"]))
    monkeypatch.setattr(sampling, "sample", oom)
    with pytest.raises(DiffusionGRPOOutOfMemory, match="while sampling") as info:
        trainer.train_step(1)
    msg = str(info.value)
    assert "sampling.micro_batch (now 2; e.g. 1)" in msg and "optim.mixed_precision" in msg
    assert "--resume" in msg


def test_unusable_prompt_file_names_the_field_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import fusedrl.engine.diffusion.policy as policy_mod

    monkeypatch.setattr(policy_mod, "load_policy", lambda *a, **k: pytest.fail("model loaded"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a cat"}\n')
    rc = main(["train", "diffusion-grpo", "--out", str(tmp_path / "run"), "--prompts.train", str(prompts),
               "--no-run.progress", "--no-run.tensorboard"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "prompts.train:" in err and "no field 'prompt'" in err
    assert "prompts.train:" in (tmp_path / "run" / "train.log").read_text()
