"""fusedrl.engine.diffusion.sampling: on-policy log-probs (recorded == recomputed), SDE windows, seeds, the
reference policy's log-probs and KL, gradients into LoRA, each family (SD1.5-shaped DDIM, SD3, Flux)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.engine.diffusion import load_policy, recompute_logprobs, sample, tiny_model_dir  # noqa: E402

FAMILIES = ("sd3", "sd", "flux")
PROMPTS = ["a red apple", "a blue sky"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models_sampling")
    return {fam: tiny_model_dir(fam, root) for fam in FAMILIES}


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # Under TRITON_INTERPRET=1 the DDIM kernel's eta = 0 step evaluates 1 / std in numpy (unused, masked).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _perturb_lora(policy, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _max_ratio_error(policy, traj) -> float:
    worst = 0.0
    for idx in traj.micro_batches():
        out = recompute_logprobs(policy, traj, traj.sde_steps, sample_indices=idx)  # with grad, as in training
        assert out.log_probs.requires_grad
        ratio = torch.exp(out.log_probs - traj.log_probs_at(traj.sde_steps)[idx])
        worst = max(worst, (ratio - 1).abs().max().item())
    return worst


@pytest.mark.parametrize("family,sde_type,guidance", [
    ("sd3", "sde", 3.0), ("sd3", "cps", 1.0), ("sd", "sde", 3.0), ("flux", "sde", 3.5), ("flux", "dance", 3.5),
])
def test_on_policy_logprobs_match_fp32(tiny_dirs, family, sde_type, guidance):
    policy = load_policy(tiny_dirs[family])
    _perturb_lora(policy)
    traj = sample(policy, PROMPTS, group_size=2, num_steps=4, guidance_scale=guidance, sde_type=sde_type, seed=3,
                  max_batch_size=3)
    S, B = 4, 4
    K = S - 1 if sde_type == "cps" else S  # CPS's last step (into sigma = 0) has no noise: an ODE step
    assert traj.latents.shape == (B, S + 1, 4, 8, 8) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (B, K) and torch.isfinite(traj.log_probs).all()
    assert traj.sde_steps.tolist() == list(range(K))
    assert traj.images.shape == (B, 3, 32, 32) and traj.prompts == [p for p in PROMPTS for _ in range(2)]
    assert traj.group_ids.tolist() == [0, 0, 1, 1] and traj.sde_type == (sde_type if family != "sd" else "sde")
    assert [len(i) for i in traj.micro_batches()] == [3, 1]
    assert (traj.schedule.sigmas is not None) == (family != "sd")
    assert _max_ratio_error(policy, traj) <= 1e-5


def test_cps_with_a_kl_term_is_finite_on_every_trained_step(tiny_dirs):
    """CPS + beta > 0: the KL divides by std^2, 0 on the last step; that step is an ODE step, so every SDE step's
    KL is finite (every step of a run was skipped for a NaN loss before)."""
    policy = load_policy(tiny_dirs["sd3"])
    _perturb_lora(policy, scale=0.2)
    traj = sample(policy, PROMPTS, group_size=2, num_steps=4, guidance_scale=1.0, sde_type="cps", seed=0)
    out = recompute_logprobs(policy, traj, traj.sde_steps.tolist(), with_reference=True)
    assert torch.isfinite(out.kl).all() and torch.isfinite(out.log_probs).all()
    with pytest.raises(ValueError, match="holds only deterministic steps"):
        sample(policy, PROMPTS, group_size=2, num_steps=4, sde_type="cps", sde_window=(3, 4), seed=0)


def test_on_policy_bf16_report(tiny_dirs, capsys):
    """bf16 weights: the same micro-batching repeats the same bf16 math, so the ratio stays at 1 here too."""
    policy = load_policy(tiny_dirs["sd3"], dtype=torch.bfloat16)
    _perturb_lora(policy)
    traj = sample(policy, PROMPTS, group_size=2, num_steps=4, guidance_scale=3.0, seed=5, max_batch_size=2)
    err = _max_ratio_error(policy, traj)
    with capsys.disabled():
        print(f"\n[bf16 on-policy] max |ratio - 1| = {err:.3g} (sd3 tiny, CPU)")
    assert err <= 1e-3


def test_gradients_reach_lora_and_reference_kl(tiny_dirs):
    policy = load_policy(tiny_dirs["sd3"])
    traj = sample(policy, PROMPTS, group_size=2, num_steps=3, guidance_scale=2.0, seed=0)
    # Fresh LoRA (B = 0): the policy is the reference, the KL is 0 and the log-probs agree.
    out = recompute_logprobs(policy, traj, [1, 2], with_reference=True)
    assert out.log_probs.shape == out.ref_log_probs.shape == out.kl.shape == (4, 2)
    torch.testing.assert_close(out.ref_log_probs, out.log_probs.detach(), atol=1e-6, rtol=0)
    assert out.kl.abs().max() < 1e-10
    out.log_probs.sum().backward()
    grads = [p.grad for n, p in policy.denoiser.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
    # Move the policy: the KL is positive and the reference log-probs are the base model's.
    _perturb_lora(policy, scale=0.2)
    out = recompute_logprobs(policy, traj, [2], sample_indices=[0, 3], with_reference=True)
    assert out.log_probs.shape == (2, 1) and (out.kl > 0).all() and out.kl.requires_grad
    assert not out.ref_log_probs.requires_grad
    torch.testing.assert_close(out.ref_log_probs, traj.log_probs_at([2])[[0, 3]], atol=1e-5, rtol=0)


def test_full_finetuning_reference_copy_logprobs(tiny_dirs):
    policy = load_policy(tiny_dirs["sd"], lora=False, reference_copy=True)
    traj = sample(policy, PROMPTS[:1], group_size=2, num_steps=3, guidance_scale=1.0, seed=0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = recompute_logprobs(policy, traj, traj.sde_steps, with_reference=True)
    torch.testing.assert_close(out.ref_log_probs, traj.log_probs, atol=1e-5, rtol=0)
    assert (out.kl > 0).all()


def test_per_sample_seeds_make_samples_independent_of_the_split(tiny_dirs):
    """seeds= gives each sample its own stream: a group sampled in one call equals its halves sampled apart
    (bit for bit on the CPU at equal micro-batches); initial_noise_seeds shared by a group give it one start."""
    policy = load_policy(tiny_dirs["sd3"])
    seeds, init = [11, 12, 13, 14], [7, 7, 8, 8]
    kw = dict(num_steps=3, guidance_scale=1.0, max_batch_size=2)
    whole = sample(policy, PROMPTS, group_size=2, seeds=seeds, initial_noise_seeds=init, **kw)
    halves = [sample(policy, [p, p], seeds=seeds[2 * j:2 * j + 2], initial_noise_seeds=init[2 * j:2 * j + 2], **kw)
              for j, p in enumerate(PROMPTS)]
    assert torch.equal(whole.latents, torch.cat([h.latents for h in halves]))
    assert torch.equal(whole.log_probs, torch.cat([h.log_probs for h in halves]))
    assert torch.equal(whole.latents[0, 0], whole.latents[1, 0])  # one start per group
    assert not torch.equal(whole.latents[0, 0], whole.latents[2, 0])
    assert not torch.equal(whole.latents[0, 1], whole.latents[1, 1])  # own step noise
    alone = sample(policy, PROMPTS[1:], seeds=[13], **{**kw, "max_batch_size": None})
    fresh = sample(policy, PROMPTS[1:], seeds=[13], **{**kw, "max_batch_size": None})
    assert torch.equal(alone.latents, fresh.latents)


@pytest.mark.parametrize("family", ("sd3", "sd"))
def test_sde_window(tiny_dirs, family):
    policy = load_policy(tiny_dirs[family])
    S, window = 6, (2, 4)
    traj = sample(policy, PROMPTS, group_size=2, num_steps=S, sde_window=window, seed=1,
                  same_initial_noise_per_group=True)
    assert traj.sde_steps.tolist() == [2, 3] and traj.log_probs.shape == (4, 2)
    # The two samples of a group share their initial noise: identical through the ODE steps before the
    # window, different after the first SDE step.
    for a, b in ((0, 1), (2, 3)):
        assert torch.equal(traj.latents[a, : window[0] + 1], traj.latents[b, : window[0] + 1])
        assert not torch.allclose(traj.latents[a, window[0] + 1], traj.latents[b, window[0] + 1])
    # ODE steps have no log-prob.
    for step in (0, 1, 4, 5):
        with pytest.raises(ValueError, match="not SDE steps"):
            traj.log_probs_at([step])
        with pytest.raises(ValueError, match="not SDE steps"):
            recompute_logprobs(policy, traj, [step])
    # The ODE steps after the window are deterministic: replaying them from the window's end gives the sample.
    x = traj.latents[:, window[1]]
    for i in range(window[1], S):
        with torch.no_grad():
            v = policy.predict(x, traj.schedule.timesteps[i], traj.embeddings, traj.guidance_scale)
        from fusedrl.engine.diffusion.sampling import _ode_step

        x = _ode_step(policy, traj.schedule, i, x, v, traj.sde_type)
    torch.testing.assert_close(x, traj.latents[:, S], atol=1e-6, rtol=0)
    assert _max_ratio_error(policy, traj) <= 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_steps_follow_diffusers_for_each_timestep_spacing(tiny_dirs, spacing):
    """Each DDIM step goes from t to t - T // S, as DDIMScheduler.step and DDPO do: with "trailing" and "linspace"
    spacing that is not the next timestep of the list (the engine stepped there once). The deterministic step
    equals DDIMScheduler.step(eta=0) at every step; "linspace" ends at t = 0, a step into its own alpha: no noise,
    so it is an ODE step with no log-prob."""
    from diffusers import DDIMScheduler

    from fusedrl.engine.diffusion.sampling import _ode_step

    policy = load_policy(tiny_dirs["sd"])
    S = 6
    policy.scheduler = policy.pipe.scheduler = DDIMScheduler.from_config(policy.scheduler.config,
                                                                         timestep_spacing=spacing)
    schedule = policy.schedule(S)
    ref = DDIMScheduler.from_config(policy.scheduler.config)
    ref.set_timesteps(S)
    assert torch.equal(schedule.timesteps, ref.timesteps.long())
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ref.timesteps):
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(_ode_step(policy, schedule, i, x, out, "sde"), expected, atol=1e-5, rtol=1e-5)
    traj = sample(policy, PROMPTS[:1], group_size=2, num_steps=S, seed=0)
    last_has_noise = spacing != "linspace"
    assert traj.sde_steps.tolist() == list(range(S if last_has_noise else S - 1))
    assert torch.isfinite(traj.log_probs).all()
    # reward backprop's stochastic steps (DDIM eta > 0) run the same schedule
    from fusedrl.engine.diffusion.differentiable import denoise, initial_latents, noise_generators

    gens = noise_generators(2, 0)
    final = denoise(policy, policy.encode_prompts(PROMPTS), schedule, initial_latents(policy, 2, gens), grad_steps=1,
                    guidance_scale=1.0, generators=gens, noise_level=1.0)
    assert torch.isfinite(final).all()


def test_ddim_thresholding_is_refused(tiny_dirs, tmp_path):
    import json
    import shutil

    path = tmp_path / "sd"
    shutil.copytree(tiny_dirs["sd"], path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "thresholding": True}))
    with pytest.raises(ValueError, match="thresholding=True"):
        load_policy(path)


def test_same_seed_same_trajectory_and_batch_invariant_noise(tiny_dirs):
    policy = load_policy(tiny_dirs["sd3"])
    kw = dict(group_size=2, num_steps=3, guidance_scale=2.0, sde_window=(0, 2))
    a = sample(policy, PROMPTS, seed=7, **kw)
    b = sample(policy, PROMPTS, seed=7, **kw)
    for name in ("latents", "log_probs", "images", "group_ids", "sde_steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = sample(policy, PROMPTS, seed=8, **kw)
    assert not torch.equal(a.latents, c.latents)
    g = sample(policy, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(g.latents, a.latents)  # seed=7 is generator seeded with 7
    # Each sample has its own generator: micro-batching changes no noise (only float rounding of the model).
    d = sample(policy, PROMPTS, seed=7, max_batch_size=1, **kw)
    torch.testing.assert_close(d.latents, a.latents, atol=1e-5, rtol=1e-5)
    assert torch.equal(d.latents[:, 0], a.latents[:, 0])


def test_cfg_on_off_and_few_steps(tiny_dirs):
    policy = load_policy(tiny_dirs["sd3"])
    on = sample(policy, PROMPTS, group_size=1, num_steps=1, guidance_scale=4.5, seed=0)
    off = sample(policy, PROMPTS, group_size=1, num_steps=1, guidance_scale=1.0, seed=0)
    assert on.latents.shape == off.latents.shape == (2, 2, 4, 8, 8)
    assert on.log_probs.shape == off.log_probs.shape == (2, 1)
    assert torch.equal(on.latents[:, 0], off.latents[:, 0]) and not torch.equal(on.latents[:, 1], off.latents[:, 1])
    assert _max_ratio_error(policy, on) <= 1e-5
    assert on.embeddings.embeds.shape[0] == 2  # conditional only; the uncond half is added per call


def test_sample_argument_errors(tiny_dirs):
    policy = load_policy(tiny_dirs["sd"])
    with pytest.raises(ValueError, match="prompts"):
        sample(policy, [], num_steps=2)
    with pytest.raises(ValueError, match="group_size"):
        sample(policy, PROMPTS, group_size=0)
    with pytest.raises(ValueError, match="sde_window"):
        sample(policy, PROMPTS, num_steps=4, sde_window=(3, 6))
    with pytest.raises(TypeError, match="sde_window"):
        sample(policy, PROMPTS, num_steps=4, sde_window=5)
    with pytest.raises(ValueError, match="noise_level"):
        sample(policy, PROMPTS, num_steps=2, noise_level=0.0)
    with pytest.raises(ValueError, match="sde_type"):
        sample(policy, PROMPTS, num_steps=2, sde_type="ode")
    with pytest.raises(ValueError, match="one of seed, generator and seeds"):
        sample(policy, PROMPTS, num_steps=2, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="one of seed, generator and seeds"):
        sample(policy, PROMPTS, num_steps=2, seed=1, seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds must be 2 ints"):
        sample(policy, PROMPTS, num_steps=2, seeds=[1])
    with pytest.raises(ValueError, match="initial_noise_seeds must be 4 ints"):
        sample(policy, PROMPTS, group_size=2, num_steps=2, seeds=[1, 2, 3, 4], initial_noise_seeds=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        sample(policy, PROMPTS, num_steps=2, seeds=[1, 2], initial_noise_seeds=[1, 2],
               same_initial_noise_per_group=True)
    with pytest.raises(ValueError, match="height"):
        sample(policy, PROMPTS, num_steps=2, height=33)
    with pytest.raises(TypeError, match="policy"):
        sample(object(), PROMPTS)
    traj = sample(policy, PROMPTS, num_steps=2, seed=0, decode=False)
    assert traj.images is None
    with pytest.raises(ValueError, match="sample_indices"):
        recompute_logprobs(policy, traj, [0], sample_indices=[5])
    with pytest.raises(ValueError, match="empty"):
        recompute_logprobs(policy, traj, [])
