"""Reward backpropagation (engine.diffusion.reward_backprop / differentiable): one step of every method on tiny
SD1.5-, SD3- and Flux-shaped models; gradients only through the last K steps (against the loop written plainly);
checkpointed and plain steps give the same gradients; ReFL's one-step x0; a non-finite reward, loss or gradient
skips the step; out-of-memory advice; config errors before anything loads; --help documents every option."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.checkpointing import POLICIES  # noqa: E402
from fusedrl.engine.config import ConfigError, build_config, iter_fields  # noqa: E402
from fusedrl.engine.diffusion import LoraOptions, load_policy, tiny_model_dir  # noqa: E402
from fusedrl.engine.diffusion import differentiable as D  # noqa: E402
from fusedrl.engine.diffusion.reward_backprop import (  # noqa: E402
    OutOfMemory,
    RewardBackprop,
    RewardBackpropConfig,
    build_policy,
    build_reward,
)
from fusedrl.engine.rewards import CombinedReward  # noqa: E402

FAMILIES = ("sd", "sd3", "flux")
METHODS = ("alignprop", "draft", "draft-lv", "refl")


@pytest.fixture(autouse=True)
def _torch_backend_one_thread(monkeypatch):
    # The step kernels' Triton interpreter (TRITON_INTERPRET=1 in tests) costs seconds per DDIM step on the CPU;
    # the kernels have their own tests, these test the engine around them. One thread: the tiny models' ops are
    # too small to gain from two (a denoiser call: 4 ms on one thread, 20 ms on two, measured on 2 cores).
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """One tiny policy per family (LoRA rank 4), loaded lazily; `get(family)` resets its LoRA to a seeded random
    state (B != 0, so that both A and B get gradients) and sets the 2 CPU threads back."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_policy(tiny_model_dir(family, root), lora=LoraOptions(rank=4))
        policy = cache[family]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in policy.denoiser.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.3))
        policy.train()
        return policy

    return get


def make_cfg(**overrides) -> RewardBackpropConfig:
    base = {"sampling.num_steps": 3, "sampling.batch_size": 2, "optim.lr": 1e-2, "prompts.num_eval": 2,
            "backprop.truncation_k": 2}
    return build_config(RewardBackpropConfig, {**base, **overrides})


def make_trainer(policy, **overrides) -> RewardBackprop:
    cfg = make_cfg(**overrides)
    return RewardBackprop(cfg, policy, build_reward(cfg))


def lora_params(policy) -> dict[str, torch.Tensor]:
    return {n: p for n, p in policy.denoiser.named_parameters() if p.requires_grad}


def grads_of(policy, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = lora_params(policy)
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


def setup_batch(policy, steps: int = 3, batch: int = 2, seed: int = 0):
    emb = policy.encode_prompts(["a red apple", "a blue sky"][:batch])
    schedule = policy.schedule(steps)
    gens = D.noise_generators(batch, seed)
    return emb, schedule, gens, D.initial_latents(policy, batch, gens)


def guidance(policy) -> float:
    return 2.0 if policy.family == "sd" else float(policy.defaults["guidance_scale"])  # SD: exercise CFG


# ---------------------------------------------------------------------------------------------- one step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_of_each_method(policies, family, method):
    policy = policies(family)
    trainer = make_trainer(policy, method=method, **{"sampling.guidance_scale": guidance(policy)})
    before = {n: p.detach().clone() for n, p in lora_params(policy).items()}
    k = trainer.choose_k(1, 0)
    out = trainer.forward(["a red apple", "a blue sky"], seed=0, k=k)
    n_images = 2 * (1 + trainer.cfg.backprop.lv_samples) if method == "draft-lv" else 2
    assert out.rewards.shape == (n_images,) and out.rewards.requires_grad and out.loss.requires_grad
    assert out.images.shape == (n_images, 3, 32, 32) and torch.isfinite(out.images).all()
    if method == "refl":
        assert 2 <= k <= 2  # the last quarter of 3 steps: the last step
    elif method == "draft":
        assert k == 2
    metrics = trainer.train_step(1)
    assert metrics["skipped"] == 0 and all(v == v for v in metrics.values()), metrics
    assert metrics["grad_norm"] > 0 and metrics["loss"] == pytest.approx(-metrics["reward_mean"])
    changed = [n for n, p in lora_params(policy).items() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # AdamW moved every LoRA tensor
    assert trainer.optimizer.state  # the update was applied


@pytest.mark.parametrize("family", ("sd", "flux"))
def test_text_encoder_only_lora_trains_through_the_frozen_denoiser(tmp_path, family):
    """TexForce: --no-lora.denoiser --lora.text_encoder; the reward's gradient passes the frozen denoiser and moves
    the text encoders' LoRA only (Flux: its CLIP encoder, never T5)."""
    cfg = make_cfg(model=str(tiny_model_dir(family, tmp_path)), **{
        "lora.denoiser": False, "lora.text_encoder": True, "lora.rank": 4, "sampling.guidance_scale": 2.0})
    policy = build_policy(cfg)
    trainer = RewardBackprop(cfg, policy, build_reward(cfg))
    assert trainer.named_params and all(n.startswith("text_encoder_") and "lora_" in n
                                        for n, _ in trainer.named_params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for n, p in trainer.named_params:
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in n else 0.3))
    before = {n: p.detach().clone() for n, p in trainer.named_params}
    metrics = trainer.train_step(1)
    assert metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert all(not torch.equal(p, before[n]) for n, p in trainer.named_params)
    assert not any(p.requires_grad for p in policy.denoiser.parameters())


def test_draft_lv_renoises_the_final_sample_for_extra_last_steps(policies, monkeypatch):
    policy = policies("sd3")
    trainer = make_trainer(policy, method="draft-lv", **{"backprop.lv_samples": 3})
    calls = []
    orig = policy.predict
    monkeypatch.setattr(policy, "predict", lambda x, t, e, g=1.0: calls.append(float(t)) or orig(x, t, e, g))
    out = trainer.forward(["a red apple", "a blue sky"], seed=0, k=1)
    t = trainer.schedule.timesteps.tolist()
    assert calls == [*t, t[-1], t[-1], t[-1]]  # S steps, then 3 more last steps
    assert out.rewards.shape == (8,) and out.k == 1
    # the extra samples are different (fresh noise) but close to the first (noise at the last, smallest level)
    first, extra = out.images[:2], out.images[2:4]
    assert not torch.equal(first, extra) and (first - extra).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------- gradient window


def plain_loss(policy, emb, schedule, x, k: int, g: float) -> torch.Tensor:
    """The loop as research repositories write it: no checkpointing, no_grad before the window, the Euler / DDIM
    (eta = 0, epsilon) step formulas by hand, VAE decode, mean pixel as the reward."""
    S = len(schedule)
    for i in range(S):
        ctx = torch.no_grad() if i < S - k else contextlib.nullcontext()
        with ctx:
            out = policy.predict(x, schedule.timesteps[i], emb, g)
            if policy.is_flow:
                x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * out
            else:
                a, a_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * out
    return -policy.decode(x).mean()


def engine_loss(policy, emb, schedule, x, k: int, g: float, checkpointing: str = "full", vae: str = "full",
                **kw) -> torch.Tensor:
    lat = D.denoise(policy, emb, schedule, x, grad_steps=k, guidance_scale=g, checkpointing=checkpointing, **kw)
    return -D.decode(policy, lat, checkpointing=vae).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_only_through_the_last_k_steps(policies, family, monkeypatch):
    policy = policies(family)
    g = guidance(policy)
    emb, schedule, _, x = setup_batch(policy, steps=4)
    t = schedule.timesteps.tolist()
    calls = []
    orig = policy.predict

    def spy(x_, t_, e, g_=1.0):
        # recorded before the call: a recompute in backward stops inside the model once it has what it needs
        calls.append([float(t_), torch.is_grad_enabled(), None])
        out = orig(x_, t_, e, g_)
        calls[-1][2] = out.requires_grad
        return out

    monkeypatch.setattr(policy, "predict", spy)
    grads = {}
    for k in (1, 2, 4):
        calls.clear()
        loss = engine_loss(policy, emb, schedule, x, k, g)
        forward = list(calls)
        assert [c[0] for c in forward] == t
        assert [c[2] for c in forward] == [False] * (4 - k) + [True] * k  # no graph before the window
        grads[k] = grads_of(policy, loss)
        recomputed = [c[0] for c in calls[len(forward):]]
        assert sorted(recomputed) == sorted(t[4 - k:])  # backward reruns exactly the K checkpointed steps
        monkeypatch.setattr(policy, "predict", orig)
        ref = grads_of(policy, plain_loss(policy, emb, schedule, x, k, g))
        monkeypatch.setattr(policy, "predict", spy)
        for n in ref:
            torch.testing.assert_close(grads[k][n], ref[n], rtol=1e-4, atol=1e-7, msg=f"K={k} {n}")
    for a, b in ((1, 2), (2, 4)):
        assert any(not torch.allclose(grads[a][n], grads[b][n]) for n in grads[a]), (a, b)


@pytest.mark.parametrize("family", ("sd", "sd3"))
@pytest.mark.parametrize("noise_level", (0.0, 0.7))
def test_checkpointed_steps_give_the_same_gradients(policies, family, noise_level):
    policy = policies(family)
    g = guidance(policy)
    emb, schedule, _, x = setup_batch(policy, steps=3)

    def loss(ckpt: str, vae: str):
        gens = D.noise_generators(2, 5)  # the same step noise each time (drawn outside the checkpoints)
        return engine_loss(policy, emb, schedule, x, 3, g, ckpt, vae, generators=gens, noise_level=noise_level)

    plain_value = loss("none", "none")
    plain = grads_of(policy, plain_value)
    for ckpt in POLICIES:
        value = loss(ckpt, "none" if ckpt == "none" else "full")
        torch.testing.assert_close(value, plain_value, rtol=0, atol=0)
        got = grads_of(policy, value)
        for n in plain:
            torch.testing.assert_close(got[n], plain[n], rtol=1e-5, atol=1e-8, msg=f"{ckpt} {n}")
    assert any(v.abs().sum() > 0 for v in plain.values())


@pytest.mark.parametrize("family", ("sd", "sd3"))
def test_refl_predicts_x0_in_one_step_with_gradient(policies, monkeypatch, family):
    policy = policies(family)
    emb, schedule, _, x = setup_batch(policy, steps=4)
    calls = []
    orig = policy.predict
    monkeypatch.setattr(policy, "predict", lambda x_, t_, e, g_=1.0: calls.append(
        (float(t_), torch.is_grad_enabled())) or orig(x_, t_, e, g_))
    x0 = D.denoise(policy, emb, schedule, x, grad_steps=0, stop_at=2, guidance_scale=1.0)
    t = schedule.timesteps.tolist()
    assert [c[0] for c in calls] == t[:3] and [c[1] for c in calls] == [False, False, True]
    assert x0.requires_grad
    # x0 prediction inverts the forward noising: renoise(x0, i, z) with the exact model output gives x0 back
    clean, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    xt = D.renoise(policy, schedule, clean, 1, z)
    exact = (z - clean) if policy.is_flow else z  # flow velocity / DDIM epsilon
    torch.testing.assert_close(D.predict_x0(policy, schedule, 1, xt, exact), clean, rtol=1e-5, atol=1e-5)


def test_seeded_forward_is_deterministic(policies):
    policy = policies("sd3")
    trainer = make_trainer(policy, method="draft", **{"sampling.noise_level": 0.5})
    a = trainer.forward(["a red apple", "a blue sky"], seed=3, k=2)
    b = trainer.forward(["a red apple", "a blue sky"], seed=3, k=2)
    c = trainer.forward(["a red apple", "a blue sky"], seed=4, k=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


# ---------------------------------------------------------------------------------------------- robustness


class _BadGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("kind", ("nan_reward", "inf_reward", "nan_gradient"))
def test_non_finite_reward_or_gradient_skips_the_step(policies, kind, caplog):
    policy = policies("sd3")
    trainer = make_trainer(policy, method="draft")

    def bad(images, prompts=None):
        r = images.mean(dim=(1, 2, 3))
        if kind == "nan_gradient":
            return _BadGradient.apply(r)
        return r * (float("nan") if kind == "nan_reward" else float("inf"))

    good = trainer.reward
    trainer.reward = CombinedReward({"bad": bad}, normalize=None)
    before = {n: p.detach().clone() for n, p in lora_params(policy).items()}
    metrics = trainer.train_step(1)
    assert metrics["skipped"] == 1 and trainer.skipped_total == 1
    assert trainer.last_skip_reason == {"nan_reward": "non-finite reward", "inf_reward": "non-finite reward",
                                        "nan_gradient": "non-finite gradient"}[kind]
    assert "step 1 skipped" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in lora_params(policy).items())  # nothing applied
    assert not trainer.optimizer.state and all(p.grad is None for p in lora_params(policy).values())
    trainer.reward = good  # the next good step is applied
    assert trainer.train_step(2)["skipped"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in lora_params(policy).items())


def test_non_finite_images_skip_the_step(policies):
    policy = policies("sd3")
    trainer = make_trainer(policy, method="draft")
    with torch.no_grad():
        next(p for n, p in lora_params(policy).items() if "proj_out" in n or "to_out" in n).fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in lora_params(policy).items()}
    metrics = trainer.train_step(1)
    assert metrics["skipped"] == 1 and trainer.last_skip_reason == "non-finite image"
    after = lora_params(policy)
    assert all(torch.equal(after[n], b) or (b.isnan().all() and after[n].isnan().all()) for n, b in before.items())


def test_out_of_memory_names_the_settings_to_lower(policies, monkeypatch):
    policy = policies("sd3")
    trainer = make_trainer(policy, method="draft", **{"memory.checkpointing": "none"})

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward", oom)
    with pytest.raises(OutOfMemory) as info:
        trainer.train_step(7)
    msg = str(info.value)
    assert "step 7" in msg and "backprop.truncation_k (K = 2" in msg and "sampling.batch_size (2" in msg
    assert "memory.checkpointing ('none' -> 'full'" in msg and "--resume --allow-change" in msg
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("overrides, expected", [
    ({"backprop.truncation_k": 9}, "backprop.truncation_k = 9 exceeds sampling.num_steps = 3"),
    ({"backprop.k_range": [2, 5]}, "backprop.k_range = [2, 5] exceeds sampling.num_steps = 3"),
    ({"backprop.k_range": [3, 2]}, "backprop.k_range: must be [lo, hi] with 1 <= lo <= hi"),
    ({"backprop.refl_range": [1, 3]}, "backprop.refl_range = [1, 3]: steps are 0 .. sampling.num_steps - 1 = 2"),
    ({"reward.names": ["brightnes"]}, "unknown reward 'brightnes'"),
    ({"reward.names": ["jpeg_compressibility"]}, "reward 'jpeg_compressibility' is not differentiable"),
    ({"reward.names": ["brightness"], "reward.weights": [1.0, 2.0]}, "weights: 2 weights for 1 rewards"),
    ({"method": "draftlv"}, "method: must be one of 'alignprop', 'draft', 'draft-lv', 'refl'; got 'draftlv' "
                            "(did you mean 'draft-lv'?)"),
    ({"memory.checkpointing": "ful"}, "memory.checkpointing: must be one of"),
    ({"optim.lr": -1}, "optim.lr: must be > 0; got -1.0"),
    ({"sampling.batchsize": 2}, "sampling.batchsize: unknown key; did you mean 'sampling.batch_size'?"),
    ({"prompts.train": "/no/such/prompts.jsonl"}, "prompts.train: prompt file '/no/such/prompts.jsonl' does not "
                                                  "exist"),
    ({"model": "/no/such/model"}, "model: no folder '/no/such/model'"),
    ({"reward.names": ["target_color"], "reward.options": {"target_color": {"target": [0, 2, 0]}}},
     "options.target_color: target must be 3 numbers in [0, 1]"),
    ({"reward.options": {"aesthetic": {}}}, "options: ['aesthetic'] name no reward in names (['brightness'])"),
    ({"lora.denoiser": False}, "lora.denoiser: false leaves LoRA on nothing"),
    ({"lora.denoiser": False, "lora.text_encoder": True, "lora.target_modules": ["to_q"]},
     "lora.target_modules: names denoiser modules, but lora.denoiser is false"),
    ({"lora.text_encoder": True, "lora.text_encoder_target_modules": []}, "lora.text_encoder_target_modules: give"),
])
def test_bad_config_names_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        make_cfg(**overrides)
    assert expected in str(info.value)


def test_image_size_the_model_cannot_take_names_the_field(policies):
    with pytest.raises(ConfigError, match=r"sampling.height / sampling.width: height must be a positive multiple of 8"):
        make_trainer(policies("sd3"), **{"sampling.height": 36})


def test_train_stops_on_out_of_memory_with_advice(policies, tmp_path, monkeypatch, capsys):
    from fusedrl.engine.diffusion import reward_backprop as rb
    from fusedrl.engine.runs import Run

    cfg = make_cfg(method="alignprop", **{"run.eval_every": 0, "run.progress": False, "run.tensorboard": False})
    trainer = RewardBackprop(cfg, policies("sd3"), build_reward(cfg))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "forward", oom)
    monkeypatch.setattr(rb.RewardBackprop, "build", classmethod(lambda cls, c, device=None: trainer))
    with Run(tmp_path / "run", cfg) as run:
        assert rb.train(cfg, run) == 3
    assert "backprop.k_range (the largest K is 3)" in capsys.readouterr().err
    assert "out of memory in reward-backprop step 1" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_bad_config_fails_before_the_run_folder(tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("fusedrl.engine.diffusion.policy.load_policy", lambda *a, **k: loaded.append(1))
    out = tmp_path / "run"
    assert main(["train", "reward-backprop", "--out", str(out), "--sampling.num_steps", "4",
                 "--backprop.truncation_k", "6", "--reward.names", "jpeg_compressibility"]) == 2
    err = capsys.readouterr().err
    assert "reward 'jpeg_compressibility' is not differentiable" in err
    assert not out.exists() and not loaded


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "reward-backprop", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fi in iter_fields(RewardBackpropConfig):
        if not fi.is_section:
            assert f"--{fi.path}" in text, fi.path
            assert fi.help and " ".join(fi.help.split())[:40] in text, fi.path
    assert "embedded default" in text and "alignprop" in text


def test_cli_resume_on_another_process_count_is_refused_cleanly(tmp_path, capsys, monkeypatch):
    """sampling.batch_size is per process: a checkpoint saved by 2 processes resumed by 1 would halve the global
    batch. The refusal comes before the model is built, as a message and exit code 2, naming the batch that keeps
    the global one."""
    import json

    out = tmp_path / "run"
    argv = ["train", "reward-backprop", "--out", str(out), "--sampling.num_steps", "2", "--run.eval_every", "0",
            "--run.checkpoint_every", "1", "--no-run.progress", "--no-run.tensorboard"]
    assert main([*argv, "--run.steps", "1"]) == 0
    state = out / "checkpoints" / "step-00000001" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["world_size"] == 1 and meta["config"]["sampling.batch_size"] >= 1
    state.write_text(json.dumps({**meta, "world_size": 2}))  # as if two processes had saved it
    capsys.readouterr()
    loaded = []
    monkeypatch.setattr("fusedrl.engine.diffusion.policy.load_policy", lambda *a, **k: loaded.append(1))
    assert main([*argv, "--run.steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    batch = meta["config"]["sampling.batch_size"]
    assert f"--sampling.batch_size {2 * batch} --allow-change sampling.batch_size to keep them" in err
    assert not loaded and "stopped by" not in (out / "train.log").read_text()


def test_options_the_method_does_not_read_are_named():
    assert make_cfg(method="alignprop").unused_options() == ["backprop.truncation_k (for method draft)"]
    assert make_cfg(method="draft").unused_options() == []
    assert make_cfg(**{"method": "draft", "backprop.lv_samples": 5, "backprop.refl_margin": 2.0}).unused_options() == [
        "backprop.lv_samples (for method draft-lv)", "backprop.refl_margin (for method refl)"]
    assert make_cfg(**{"method": "draft", "backprop.k_range": [1, 2]}).unused_options() == [
        "backprop.truncation_k (backprop.k_range replaces it)"]
