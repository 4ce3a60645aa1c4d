"""GRPO for diffusers image models (Flow-GRPO on SD3 / Flux, DDPO-style on the SD1.5 family):
`fusedrl train diffusion-grpo`.

Each training step:
1. takes `prompts.per_step` prompts (`prompt_batch`, a pure function of (seed, step)) and samples
   `sampling.group_size` images for each with the SDE sampler (`sample`), recording latents and the
   log-prob of every SDE step (those in `sampling.sde_window`, which `sampling.window_shift_every` moves over
   training: MixGRPO's sliding window, or B2-DiffuRL's backward-progressive one); chunks of whole groups
   are sampled one `sample` call each, with a seed derived from (run.seed, step, chunk), and scored as they
   come (in a background thread with `reward.background`, overlapping the next chunk's sampling);
2. scores the images (`reward.names`, weighted), and forms group advantages (`group_advantages`:
   (r - group mean) / (group std + 1e-4), clamped to +-grpo.adv_clip_max);
3. picks the trained timesteps: `grpo.timestep_fraction` of the SDE steps, the first ones (Flow-GRPO) or a seeded
   random subset (`grpo.timestep_selection random`);
4. for each inner epoch, each micro-batch (the sampler's own, so the recomputed log-probs repeat its
   numerics and the on-policy ratio is exactly 1 in fp32) and each trained timestep: recomputes the
   log-prob under the current policy (`recompute_logprobs`), takes Flow-GRPO's loss through
   `fusedrl.kernels.grpo_loss` (loss_type "grpo", one "token" per (sample, timestep):
   mean over samples of -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - old_logp)), adds
   beta * KL to the reference (the adapter-off model; Flow-GRPO's MEAN((mean - ref_mean)^2) / (2 std^2))
   and back-propagates, scaled so that the accumulated gradient is the mean over the update's samples
   and timesteps (gradient accumulation across timesteps and `optim.grad_accum` micro-batches);
5. clips the gradient norm, steps AdamW (a GradScaler under fp16), updates the EMA.

Several processes (`torchrun --nproc-per-node N -m fusedrl train diffusion-grpo ...`): LoRA trains under DDP,
full fine-tuning under FSDP2 (`fully_shard` of every block and of the denoiser; the reference copy too). The
step's prompts.per_step x group_size images are split evenly over the processes in order (a group may span
two), each image's noise seeded by its place in the step, so the images do not depend on the split; the
rewards are gathered for the group statistics, and each process weights its samples as if alone while DDP /
FSDP2 average the gradients: N processes take the step one process takes with the same global batch
(optim.grad_accum counts each process's micro-batches). Skips are decided on all processes together; rank 0
writes the run folder; checkpoints hold whole tensors (gathered under FSDP2).

Robustness: a NaN/inf in the rewards, the images, the recorded or recomputed log-probs, the loss or the
gradient norm skips the step's (remaining) updates: nothing of it reaches the weights or the optimizer
state; the step is logged with `skipped=1` and a message in train.log. `grpo.max_consecutive_skips` skipped
steps in a row stop the run. A CUDA out-of-memory error stops the run with a message naming the settings
to lower (`DiffusionGRPOOutOfMemory`).

Run folder (see fusedrl.engine.runs.Run): config.yaml, train.log, metrics.csv, tensorboard/, metrics.png
(the reward curves), samples/step-*.png (evaluation grids, before the first step and every
run.eval_every steps), checkpoints/step-*/ (LoRA / full weights, optimizer, EMA, RNG; with the LoRA in
diffusers' format under lora/), and lora/ (+ lora_ema/) in the run folder: `pytorch_lora_weights.safetensors`
that `pipe.load_lora_weights(run_dir / "lora")` loads (full fine-tuning: denoiser/, `save_pretrained`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, config_errors, model_loading_errors
from ..oom import is_out_of_memory
from ..runs import Trainer
from .grpo_config import DiffusionGRPOConfig

log = logging.getLogger("fusedrl")

__all__ = ["TRAINER", "DiffusionGRPOConfig", "DiffusionGRPOOutOfMemory", "GRPOTrainer", "train"]

# The embedded tiny model is 16 wide: LoRA on the attention projections alone barely moves its images
# (measured: brightness 0.517 -> 0.533 in 200 steps); its MLPs, adaLN modulations and output projection
# too move them clearly (0.526 -> 0.659 in the same 200 steps).
TINY_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    "norm_out.linear",
]
DEFAULT_LR = 3e-4  # Flow-GRPO's
TINY_LR = 2e-2  # the tiny model's LoRA needs large steps to move in a few hundred updates


class DiffusionGRPOOutOfMemory(RuntimeError):
    """Out of accelerator memory; the message names the settings to lower."""


class _Skip(Exception):
    """A step's update is skipped (non-finite values); the message says why."""


def _seed(*parts: Any) -> int:
    """A 62-bit seed that is a pure function of `parts` (stable across processes, unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of parameters: shadow <- decay * shadow + (1 - decay) * param (fp32)."""

    def __init__(self, params: dict[str, Any], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def update(self) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the parameters hold the EMA values (restored after)."""
        import torch

        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])


# ----------------------------------------------------------------------------------------------- rewards


@dataclass
class _Scorer:
    """Scores images with every configured reward: (images [B, 3, H, W], prompts) -> {name: [B] fp32 CPU}. Rewards
    that take metadata (`takes_metadata`) also get each prompt's row fields (`prompt_metadata`), {} for none."""

    rewards: dict[str, Callable]
    metadata: dict[str, dict] = field(default_factory=dict)

    def __call__(self, images, prompts: list[str]) -> dict[str, Any]:
        import torch

        from ..rewards.base import any_takes_metadata

        out = {}
        for name, fn in self.rewards.items():
            extra = {"metadata": [self.metadata.get(p, {}) for p in prompts]} if any_takes_metadata([fn]) else {}
            value = fn(images, prompts, **extra)
            out[name] = torch.as_tensor(value).detach().float().reshape(-1).cpu()
        return out


def build_rewards(cfg: DiffusionGRPOConfig, device) -> _Scorer:
    """Load every reward of `cfg.reward` (before the model: a missing reward fails first)."""
    from ..rewards import load_reward

    rewards: dict[str, Callable] = {}
    for name in cfg.reward.names:
        kwargs = dict(cfg.reward.options.get(name, {}))
        explicit = "device" in kwargs  # the user's own device for this reward: passed as given
        kwargs.setdefault("device", cfg.reward.device if cfg.reward.device is not None else str(device))
        try:  # learned rewards take a device; rule-based ones (JPEG) run where the images are and may refuse one
            rewards[name] = load_reward(name, **kwargs)
        except TypeError as exc:
            if explicit or "device" not in str(exc):
                raise
            del kwargs["device"]
            rewards[name] = load_reward(name, **kwargs)
    return _Scorer(rewards)


# ----------------------------------------------------------------------------------------------- trajectories


def _concat(trajs: list) -> Any:
    """One Trajectory from several sampled with the same schedule (their group ids kept)."""
    import torch

    from .policy import PromptEmbeddings
    from .sampling import Trajectory

    if len(trajs) == 1:
        return trajs[0]
    first = trajs[0]
    images = None if first.images is None else torch.cat([t.images for t in trajs])
    return Trajectory(
        prompts=[p for t in trajs for p in t.prompts], group_ids=torch.cat([t.group_ids for t in trajs]),
        embeddings=PromptEmbeddings.cat([t.embeddings for t in trajs]), latents=torch.cat([t.latents for t in trajs]),
        schedule=first.schedule, sde_steps=first.sde_steps, log_probs=torch.cat([t.log_probs for t in trajs]),
        images=images, guidance_scale=first.guidance_scale, noise_level=first.noise_level, sde_type=first.sde_type,
        micro_batch_size=first.micro_batch_size, family=first.family)


# ----------------------------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    """The diffusion GRPO trainer (module docstring). `run` may be None (no logging / saving: tests).

    Build order: prompts, then rewards, then the policy, so that a missing prompt file or an unknown reward
    fails before any model loads. `policy=` / `rewards=` inject prebuilt ones (tests); `rewards` maps a name
    to `fn(images, prompts) -> [B]`.
    """

    def __init__(self, cfg: DiffusionGRPOConfig, run: Any = None, *, policy: Any = None,
                 rewards: dict[str, Callable] | None = None) -> None:
        import torch

        from ..distributed import local_device, rank_and_world
        from ..rewards.base import any_takes_metadata
        from ..runs import seed_everything
        from ..startup import prepare_kernels
        from .prompts import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS, load_prompts, prompt_metadata

        self.cfg, self.run = cfg, run
        self.rank, self.world = rank_and_world()
        n = cfg.prompts.per_step * cfg.sampling.group_size
        if n % self.world:
            raise ConfigError([("prompts.per_step", f"prompts.per_step x sampling.group_size = {n} images per step "
                                f"must split evenly over the {self.world} processes")])
        seed_everything(cfg.run.seed)
        p = cfg.prompts
        if p.train is None:  # the built-in list, in its order unless prompts.limit picks a seeded few
            self.train_prompts = load_prompts(list(DEFAULT_PROMPTS), seed=cfg.run.seed if p.limit else None,
                                              limit=p.limit)
        else:
            with config_errors("prompts.train"):
                self.train_prompts = load_prompts(p.train, field=p.column, split=p.split, seed=cfg.run.seed,
                                                  limit=p.limit)
        if p.eval is not None:
            with config_errors("prompts.eval"):
                evals = load_prompts(p.eval, field=p.column, split=p.eval_split)
        else:
            evals = list(DEFAULT_EVAL_PROMPTS) if p.train is None else self.train_prompts
        self.eval_prompts = evals[: p.num_eval]

        with config_errors("model.device"):
            self.device = local_device(cfg.model.device)
        # before the model loads: the backbone probe and the first step run the CUDA kernels if they are ready
        self.kernels_status = prepare_kernels(self.device, build=cfg.run.cuda_extension)
        self.weights = dict(zip(cfg.reward.names, cfg.reward.weights or [1.0] * len(cfg.reward.names)))
        if rewards is not None:
            self.scorer = _Scorer(dict(rewards))
            self.weights = {n: self.weights.get(n, 1.0) for n in rewards}
        else:
            with config_errors("reward.options"):
                self.scorer = build_rewards(cfg, self.device)
        if any_takes_metadata(self.scorer.rewards.values()):
            with config_errors("prompts"):
                self.scorer.metadata = prompt_metadata([(p.train, p.split), (p.eval, p.eval_split)], field=p.column)
        self.policy = policy if policy is not None else self._load_policy()
        self.device = self.policy.device
        self.checkpointed = self._apply_checkpointing()
        if self.world > 1:  # after checkpointing (DDP / FSDP2 wrap the checkpointed blocks), before the optimizer
            self.policy.parallelize("ddp" if self.policy.has_lora else "fsdp")
        from ..checkpointing import unwrapped_name

        # checkpoint names do not depend on memory.gradient_checkpointing
        self.params = {unwrapped_name(n): p for n, p in self._named_trainable()}
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=self.learning_rate(), betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, eps=o.eps)
        # loss scaling wherever the backward runs in fp16: autocast fp16, or fp16 weights (the per-element gradients
        # of a GRPO step, ~1e-8 at SD3's latent sizes, are below fp16's smallest values)
        fp16 = o.mixed_precision == "fp16" or self.policy.compute_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.ema = EMA(self.params, cfg.grpo.ema_decay) if cfg.grpo.ema else None
        self.consecutive_skips = 0
        self.skipped_total = 0
        self.prompt_stats = None
        if cfg.grpo.prompt_stats_buffer:
            from ..advantages import PromptRewardStats

            self.prompt_stats = PromptRewardStats(cfg.grpo.prompt_stats_buffer, cfg.grpo.prompt_stats_min_count)

    # ------------------------------------------------------------------------------------------ set-up

    def learning_rate(self) -> float:
        lr = self.cfg.optim.lr
        return lr if lr is not None else (TINY_LR if self.cfg.model.model is None else DEFAULT_LR)

    def _load_policy(self):
        from ..runs import seed_everything
        from .policy import DEFAULT_LORA_TARGETS, LoraOptions, load_policy

        cfg = self.cfg
        m, lo = cfg.model, cfg.lora
        lora = None
        if lo.enabled:
            targets = lo.target_modules
            if targets is None:
                targets = TINY_LORA_TARGETS if m.model is None else list(DEFAULT_LORA_TARGETS)
            lora = LoraOptions(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, target_modules=list(targets),
                               text_encoder=lo.text_encoder, denoiser=lo.denoiser,
                               text_encoder_target_modules=list(lo.text_encoder_target_modules))
        kwargs = {k: v for k, v in (("revision", m.revision), ("variant", m.variant)) if v is not None}
        self._info(f"loading {m.model or 'the embedded tiny SD3-shaped model'} on {self.device}")
        model = m.model
        if model is None:
            from .tiny import tiny_model_dir

            model = tiny_model_dir("sd3")  # built on first use, which reseeds torch
        # peft draws LoRA A from torch's global generator: seed it here, so the initial adapter is a function of
        # run.seed alone (not of whether the embedded model had to be built first)
        seed_everything(cfg.run.seed)
        try:
            with model_loading_errors("model.model", "lora.target_modules", "lora.text_encoder_target_modules"):
                policy = load_policy(model, device=self.device, dtype=None if m.dtype == "auto" else m.dtype,
                                     vae_dtype=None if m.vae_dtype == "auto" else m.vae_dtype, lora=lora or False,
                                     reference_copy=lora is None and cfg.grpo.beta > 0,
                                     offload_text_encoders=m.offload_text_encoders, offload_vae=m.offload_vae,
                                     max_sequence_length=m.max_sequence_length, patch_attention=m.patch_attention,
                                     prompt_cache_gb=m.prompt_cache_gb, sharded=self.world > 1 and lora is None,
                                     fused_backbone=m.fused_backbone, **kwargs)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise DiffusionGRPOOutOfMemory(_oom_message("loading the model", cfg)) from exc
            raise
        h, w = cfg.sampling.height, cfg.sampling.width
        if h is not None or w is not None:
            try:
                policy.check_size(h or policy.defaults["height"], w or policy.defaults["width"])
            except ValueError as exc:
                raise ConfigError([("sampling.height / sampling.width", str(exc))]) from None
        return policy

    def _apply_checkpointing(self) -> list[str]:
        from .policy import block_names

        blocks = set(block_names(self.policy.denoiser))
        return self.cfg.memory.apply_to(self.policy.denoiser, "the denoiser",
                                        predicate=lambda name, _m: name in blocks)

    def _named_trainable(self) -> Iterator[tuple[str, Any]]:
        pol = self.policy
        mods = [("denoiser", pol.denoiser)] + [(f"text_encoder_{i}", te) for i, te in enumerate(pol.text_encoders)]
        for prefix, mod in mods:
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    yield f"{prefix}.{n}", p

    def _info(self, message: str) -> None:
        if self.run is not None:
            self.run.info(message)
        else:
            log.info(message)

    def _autocast(self):
        import torch

        mp = self.cfg.optim.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    # ------------------------------------------------------------------------------------------ sampling

    def _sample(self, prompts: list[str], group_size: int, window: tuple[int, int] | None = None, **randomness: Any):
        """`sample` with the config's settings, SDE steps in `window` (default: sampling.sde_window as configured);
        `randomness`: seed=, or seeds= (+ initial_noise_seeds=)."""
        from .sampling import sample

        s = self.cfg.sampling
        if window is None and s.sde_window is not None:
            window = tuple(s.sde_window)
        self.policy.train(False)
        with self._autocast():
            return sample(self.policy, prompts, group_size=group_size, num_steps=s.steps,
                          guidance_scale=s.guidance_scale, noise_level=s.noise_level, sde_window=window,
                          sde_type=s.sde_type,
                          height=s.height, width=s.width, max_batch_size=s.micro_batch, **randomness)

    def step_prompts(self, step: int) -> list[str]:
        """The prompts.per_step prompts of training step `step` (every process's), a pure function of (run.seed,
        step); sample i of the step is of prompt i // sampling.group_size."""
        from .prompts import prompt_batch

        return prompt_batch(self.train_prompts, step - 1, self.cfg.prompts.per_step, seed=self.cfg.run.seed)

    def local_samples(self) -> range:
        """This process's part of a step's samples: global indices (sample i is of prompt i // group_size)."""
        n = self.cfg.prompts.per_step * self.cfg.sampling.group_size // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    def sample_and_score(self, step: int) -> tuple[Any, dict[str, Any], list[Any], bool]:
        """Sample this process's part of the step's groups and score it -> (trajectory, raw rewards
        {name: [b]}, micro-batches, whether some images are NaN/inf).

        Sample i of the step (prompt i // G) draws its noise from seed (run.seed, step, i) wherever it is
        sampled, so the samples do not depend on the number of processes or on sampling.micro_batch; with
        sampling.same_initial_noise the samples of a group share the initial noise of seed (run.seed, step,
        group). Chunks of sampling.micro_batch samples are sampled one `sample` call each and scored as they
        come (in a background thread with reward.background)."""
        import torch

        cfg = self.cfg
        G = cfg.sampling.group_size
        prompts = self.step_prompts(step)
        mine = self.local_samples()
        per = cfg.sampling.micro_batch or len(mine)
        trajs, scores, micro, offset, bad_images = [], [], [], 0, False
        worker = None
        if cfg.reward.background:
            from ..rewards import RewardWorker

            worker = RewardWorker(self.scorer, max_pending=2)
        try:
            for a in range(0, len(mine), per):
                idx = list(mine[a:a + per])
                init = ([_seed(cfg.run.seed, "train-init", step, i // G) for i in idx]
                        if cfg.sampling.same_initial_noise else None)
                seeds = [_seed(cfg.run.seed, "train", step, i) for i in idx]
                window = cfg.sampling.window_at(step, cfg.run.seed)
                traj = self._sample([prompts[i // G] for i in idx], 1, window, seeds=seeds, initial_noise_seeds=init)
                traj.group_ids = torch.tensor([i // G for i in idx])
                micro += [m + offset for m in traj.micro_batches()]
                offset += len(traj)
                trajs.append(traj)
                if not _finite(traj.images):  # not scored; every process still takes part in what follows
                    bad_images = True
                    scores.append({n: torch.full((len(idx),), float("nan")) for n in self.scorer.rewards})
                    continue
                images = traj.images.detach()
                scores.append(worker.submit(images, traj.prompts) if worker is not None
                              else self.scorer(images, traj.prompts))
            if worker is not None:
                scores = [s.result() if hasattr(s, "result") else s for s in scores]
        finally:
            if worker is not None:
                worker.shutdown(cancel_pending=True)
        self.policy.reshard()
        raw = {name: torch.cat([s[name] for s in scores]) for name in scores[0]}
        return _concat(trajs), raw, micro, bad_images

    def selected(self, raw: dict[str, Any]) -> Any:
        """With reward.pareto, [B] bool: the non-dominated samples (Parrot), the ones trained on, each reward an
        objective in the direction of its weight's sign (zero weights are left out). None without it: all."""
        import torch

        from ..rewards import pareto_mask

        n = len(next(iter(raw.values())))
        names = [k for k in raw if self.weights[k] != 0]
        if self.cfg.reward.pareto == "none":
            return None
        if not names:
            return torch.ones(n, dtype=torch.bool)
        objectives = torch.stack([math.copysign(1.0, self.weights[k]) * raw[k].float() for k in names], dim=1)
        groups = torch.arange(n) // self.cfg.sampling.group_size if self.cfg.reward.pareto == "group" else None
        return pareto_mask(objectives, groups)

    def advantages(self, raw: dict[str, Any], prompts: list[str] | None = None) -> tuple[Any, Any]:
        """(total reward [B], advantages [B]) from the raw rewards of the step's samples, whose prompts are
        `prompts` (B strings: needed by grpo.prompt_stats_buffer, whose statistics this call updates)."""
        from ..advantages import group_advantages

        g = self.cfg.grpo
        G = self.cfg.sampling.group_size
        std = None if g.std == "none" else g.std
        total = sum(self.weights[n] * r for n, r in raw.items())
        if self.prompt_stats is not None:
            if prompts is None:
                raise ValueError("grpo.prompt_stats_buffer needs the samples' prompts")
            adv = self.prompt_stats.advantages(prompts, total)
        elif self.cfg.reward.normalize == "per_reward" and len(raw) > 1:
            adv = sum(self.weights[n] * group_advantages(r, group_size=G, std=std) for n, r in raw.items())
        else:
            adv = group_advantages(total, group_size=G, std=std)
        return total, adv.clamp(-g.adv_clip_max, g.adv_clip_max)

    # ------------------------------------------------------------------------------------------ the step

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step (module docstring); returns its metrics. Never applies an update computed from NaN/inf."""
        return self._guarded(self._train_step, step)

    def _guarded(self, fn: Callable, *args: Any) -> Any:
        """fn(*args), turning an out-of-memory error into DiffusionGRPOOutOfMemory naming what to lower."""
        try:
            return fn(*args)
        except DiffusionGRPOOutOfMemory:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise DiffusionGRPOOutOfMemory(_oom_message(getattr(self, "_phase", "training"), self.cfg)) from exc
            raise

    def _train_step(self, step: int) -> dict[str, float]:
        import torch

        from ..distributed import all_gather, any_process

        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.cfg.sampling.window_shift_every or self.cfg.sampling.window_random_range is not None:
            metrics["sde_window_start"] = float(self.cfg.sampling.window_at(step, self.cfg.run.seed)[0])
        self._phase = "sampling"
        traj, local_raw, micro, bad_images = self.sample_and_score(step)
        t_sample = time.perf_counter() - t0
        # Every decision below is taken on every process alike: the rewards are gathered (rank order = the
        # step's sample order), and a local NaN is made known to all (any_process).
        raw = {n: all_gather(r, self.device) for n, r in local_raw.items()}
        if any_process(bad_images, self.device):
            return self._skipped(step, "the sampled images have NaN/inf", metrics, t0)
        bad = {n: int((~torch.isfinite(r)).sum()) for n, r in raw.items()}
        finite = {n: r[torch.isfinite(r)] for n, r in raw.items()}
        total = sum(self.weights[n] * r for n, r in raw.items())
        ok = torch.isfinite(total)
        metrics["reward_mean"] = total[ok].mean().item() if ok.any() else float("nan")
        metrics["reward_std"] = total[ok].std().item() if ok.sum() > 1 else 0.0
        if len(raw) > 1:
            for n, r in finite.items():
                metrics[f"reward/{n}"] = r.mean().item() if len(r) else float("nan")
        if any(bad.values()):
            what = ", ".join(f"{n}: {c} of {len(raw[n])}" for n, c in bad.items() if c)
            return self._skipped(step, f"rewards have NaN/inf ({what})", metrics, t0)
        if any_process(not _finite(traj.log_probs), self.device):
            return self._skipped(step, "the sampled log-probs have NaN/inf", metrics, t0)
        G, prompts = self.cfg.sampling.group_size, self.step_prompts(step)
        total, adv = self.advantages(raw, [prompts[i // G] for i in range(len(total))])
        keep = self.selected(raw)
        mine = self.local_samples()
        adv = adv[mine.start:mine.stop]
        if keep is not None:
            metrics["pareto_frac"] = keep.float().mean().item()
            keep = keep[mine.start:mine.stop]

        self._phase = "training"
        t1 = time.perf_counter()
        try:
            metrics.update(self._optimize(step, traj, adv, micro, keep))
        except _Skip as skip:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skipped(step, str(skip), metrics, t0)
        self.consecutive_skips = 0
        metrics["skipped"] = 0.0
        metrics["time/sample_s"] = t_sample
        metrics["time/train_s"] = time.perf_counter() - t1
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    def _skipped(self, step: int, why: str, metrics: dict[str, float], t0: float) -> dict[str, float]:
        self.consecutive_skips += 1
        self.skipped_total += 1
        self._info(f"step {step} skipped (no update applied): {why}")
        if self.consecutive_skips >= self.cfg.grpo.max_consecutive_skips:
            raise RuntimeError(f"{self.consecutive_skips} steps in a row were skipped (last: {why}); stopping. Lower "
                               "optim.lr, check the reward, or try optim.mixed_precision no")
        out = {k: v for k, v in metrics.items() if math.isfinite(v)}
        out["skipped"] = 1.0
        out["time/step_s"] = time.perf_counter() - t0
        return out

    def trained_steps(self, step: int, sde_steps: Sequence[int]) -> list[int]:
        """The SDE steps trained at `step`: int(`grpo.timestep_fraction` x their number) of them (at least one), the
        first ones or a seeded random subset (`grpo.timestep_selection`)."""
        import torch

        sde_steps = list(sde_steps)
        # Flow-GRPO's int(num_steps * timestep_fraction); the epsilon keeps 0.3 x 10 at 3 (2.9999... in floats)
        k = max(1, min(len(sde_steps), math.floor(len(sde_steps) * self.cfg.grpo.timestep_fraction + 1e-9)))
        if k == len(sde_steps):
            return sde_steps
        if self.cfg.grpo.timestep_selection == "first":
            return sde_steps[:k]
        g = torch.Generator().manual_seed(_seed(self.cfg.run.seed, "timesteps", step))
        return sorted(sde_steps[i] for i in torch.randperm(len(sde_steps), generator=g)[:k].tolist())

    def _optimize(self, step: int, traj: Any, adv: Any, micro: list[Any], keep: Any = None) -> dict[str, float]:
        """The updates of one step on this process's samples (those `keep` marks: the loss is their mean, the others
        weigh 0; default all). Several processes: each update's gradient is
        averaged over them (DDP: the last backward of an update syncs, the others run under no_sync; FSDP2: each),
        each process weighting its own samples as if alone, so the average is the mean over every process's
        samples: one process with the same global batch takes the same update. A NaN/inf on one process does
        not stop it mid-update (the others would wait for it): it finishes the update, and all skip it."""
        import torch

        from fusedrl.kernels import grpo_loss

        from ..distributed import all_max, all_mean, all_sums, any_process
        from .sampling import recompute_logprobs

        cfg, g = self.cfg, self.cfg.grpo
        steps = self.trained_steps(step, traj.sde_steps.tolist())
        accum = cfg.optim.grad_accum or len(micro)
        groups = [micro[i:i + accum] for i in range(0, len(micro), accum)]
        sums: dict[str, float] = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "kept": 0.0, "ratio": 0.0,
                                  "clip_frac": 0.0, "approx_kl": 0.0, "logp": 0.0}
        count, updates, on_policy_err, grad_norms = 0, 0, 0.0, []
        adv = adv.to(self.policy.device)
        select = keep is not None
        keep = keep.cpu().float() if select else torch.ones(len(adv))
        if select:  # each update's loss is the mean over the samples kept on every process
            kept_global = all_sums([sum(keep[idx].sum().item() for idx in group) for group in groups], self.device)
        self.policy.train(True)
        for _epoch in range(g.inner_epochs):
            for gi, group in enumerate(groups):
                if select and kept_global[gi] == 0:
                    continue  # no kept sample in this update on any process: no update (AdamW would still move)
                n_samples = sum(len(idx) for idx in group)
                work = [(idx, s) for idx in group for s in steps]
                problem = None
                for k, (idx, s) in enumerate(work):
                    if select:  # DDP averages over the processes: hence the factor world
                        weight = self.world * keep[idx].sum().item() / (max(kept_global[gi], 1.0) * len(steps))
                    else:
                        weight = len(idx) / (n_samples * len(steps))
                    with self.policy.no_sync() if k < len(work) - 1 else contextlib.nullcontext():
                        with self._autocast():
                            out = recompute_logprobs(self.policy, traj, [s], sample_indices=idx,
                                                     with_reference=g.beta > 0)
                        logp = out.log_probs.float()
                        old = traj.log_probs_at([s])[idx.to(traj.log_probs.device)].to(logp.device)
                        if not _finite(logp):
                            problem = problem or f"recomputed log-probs have NaN/inf (timestep {s})"
                        a = adv[idx.to(adv.device)]
                        kept = keep[idx].to(logp.device)
                        kept_n = kept.sum().item() if select else 1.0  # the loss metrics: means over kept samples
                        # one "token" per sample; with a selection, "bnpo" takes the mean over the kept ones
                        policy_loss, m = grpo_loss(logp, old, a, kept[:, None].expand_as(logp).contiguous(),
                                                   loss_type="bnpo" if select else "grpo",
                                                   eps_low=g.clip_range, eps_high=g.clip_range)
                        loss = policy_loss
                        if g.beta > 0:
                            kl = out.kl.float().reshape(len(idx), -1).mean(-1)
                            kl = (kl * kept).sum() / kept.sum().clamp(min=1) if select else kl.mean()
                            loss = loss + g.beta * kl
                            sums["kl"] += kl.item() * kept_n
                        if not _finite(loss):
                            problem = problem or f"the loss is NaN/inf (timestep {s})"
                        if problem is not None and self.world == 1:
                            raise _Skip(problem)
                        scaled = loss * weight
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    with torch.no_grad():
                        ratio = torch.exp(logp - old)
                        if updates == 0:
                            on_policy_err = max(on_policy_err, (ratio - 1).abs().max().item())
                        sums["ratio"] += ratio.mean().item()
                        sums["clip_frac"] += ((ratio - 1).abs() > g.clip_range).float().mean().item()
                        sums["approx_kl"] += (0.5 * (logp - old).square()).mean().item()
                        sums["logp"] += logp.mean().item()
                    sums["loss"] += loss.item() * kept_n
                    sums["policy_loss"] += policy_loss.item() * kept_n
                    sums["kept"] += kept_n
                    count += 1
                self.policy.reshard()  # the reference's forwards leave its root gathered
                if any_process(problem is not None, self.device):
                    raise _Skip(problem or "another process's log-probs or loss are NaN/inf")
                grad_norms.append(self._apply_update())
                updates += 1
        losses = ("loss", "policy_loss", "kl") if g.beta > 0 else ("loss", "policy_loss")
        metrics = {k: sums[k] / max(sums["kept"], 1.0) for k in losses}
        kept_adv = adv[keep.to(adv.device) > 0]
        metrics.update({"ratio_mean": sums["ratio"] / count, "onpolicy_ratio_err": on_policy_err,
                        "clip_frac": sums["clip_frac"] / count, "approx_kl": sums["approx_kl"] / count,
                        "logp_mean": sums["logp"] / count})
        all_mean(metrics, sorted(k for k in metrics if k != "onpolicy_ratio_err"), self.device)  # over every process
        if select:  # the loss metrics over every process's kept samples (a process may have none)
            totals = all_sums([sums[k] for k in (*losses, "kept")], self.device)
            metrics.update({k: t / max(totals[-1], 1.0) for k, t in zip(losses, totals)})
        # over every process's kept samples, which Pareto selection may spread unevenly
        adv_sum, adv_n = all_sums([kept_adv.abs().sum().item(), len(kept_adv)], self.device)
        metrics["adv_abs_mean"] = adv_sum / max(adv_n, 1.0)
        metrics["onpolicy_ratio_err"] = all_max(on_policy_err, self.device)
        metrics.update({"grad_norm": sum(grad_norms) / len(grad_norms), "updates": float(updates),
                        "trained_timesteps": float(len(steps))})
        return metrics

    def _apply_update(self) -> float:
        """Clip, check and apply the accumulated gradient; raise _Skip (nothing applied) when it is not finite."""
        import torch

        from ..distributed import average_gradients, full_tensor

        params = list(self.params.values())
        average_gradients(self.policy.unsynced_parameters())  # text-encoder LoRA under DDP
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        norm = full_tensor(norm)  # FSDP2: the norm over every shard, a replicated DTensor
        if not math.isfinite(norm.item()):
            if self.scaler is not None:  # fp16 overflow: the scaler skips the step and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan")
            raise _Skip("the gradient norm is NaN/inf")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        if self.cfg.grpo.reference_ema_decay is not None:
            self.policy.update_reference_ema(self.cfg.grpo.reference_ema_decay)
        return norm.item()

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> dict[str, float]:
        """Sample the eval prompts with a fixed seed (EMA weights when grpo.ema), score them, save a grid."""
        import torch

        cfg = self.cfg
        self._phase = "evaluating"
        n = cfg.prompts.eval_images_per_prompt
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext(), torch.no_grad():
            traj = self._sample(self.eval_prompts, n, seed=cfg.sampling.eval_seed,
                                same_initial_noise_per_group=cfg.sampling.same_initial_noise)
        self.policy.reshard()
        raw = self.scorer(traj.images, traj.prompts)
        total = sum(self.weights[k] * r for k, r in raw.items())
        ok = torch.isfinite(total)
        metrics = {"eval/reward_mean": total[ok].mean().item() if ok.any() else float("nan")}
        if len(raw) > 1:
            metrics.update({f"eval/reward/{k}": r[torch.isfinite(r)].mean().item() for k, r in raw.items()})
        if self.run is not None:
            captions = [f"{p} | {r:.4g}" for p, r in zip(traj.prompts, total.tolist())]
            self.run.save_image_grid(step, traj.images.float().cpu(), captions, nrow=n * max(1, 4 // n))
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    # ------------------------------------------------------------------------------------------ saving

    def state_tensors(self) -> dict[str, Any]:
        """The trainable tensors (and the EMA's), whole, on the CPU of rank 0 ({} elsewhere): under FSDP2 gathered
        one at a time (a collective: every process calls it)."""
        from ..distributed import whole_on_rank0

        named = [(f"param/{n}", p) for n, p in self.params.items()]
        if self.ema is not None:
            named += [(f"ema/{n}", t) for n, t in self.ema.shadow.items()]
        # an EMA'd KL reference (grpo.reference_ema_decay) has moved from the loaded weights: a resume must not
        # reset it
        named += [(f"reference/{i:06d}", t) for i, t in enumerate(self.policy.reference_state())]
        return whole_on_rank0(named)

    def load_state(self, ckpt: Any) -> None:
        import torch

        from ..distributed import shard_like

        missing = [n for n in self.params if f"param/{n}" not in ckpt.tensors]
        if missing:
            raise ValueError(f"checkpoint {ckpt.path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                             "was it written with another lora / model config?")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(shard_like(ckpt.tensors[f"param/{n}"], p))
            if self.ema is not None:
                for n, t in self.ema.shadow.items():
                    key = f"ema/{n}"
                    t.copy_(shard_like(ckpt.tensors[key], t) if key in ckpt.tensors else self.params[n])
        reference = [ckpt.tensors[k] for k in sorted(ckpt.tensors) if k.startswith("reference/")]
        if reference and self.cfg.grpo.reference_ema_decay is not None:
            self.policy.load_reference_state(reference)
        self.policy.load_optimizer_state(self.optimizer, ckpt.objects["optim"])
        if self.scaler is not None and "scaler" in ckpt.objects:
            self.scaler.load_state_dict(ckpt.objects["scaler"])
        if self.prompt_stats is not None:
            self.prompt_stats.load_state_dict(ckpt.state.get("prompt_stats", {}))
        self.consecutive_skips = int(ckpt.state.get("consecutive_skips", 0))
        self.skipped_total = int(ckpt.state.get("skipped_total", 0))

    def save_weights(self, folder: Path, denoiser: Any = None, denoiser_ema: Any = None) -> None:
        """The trained weights in diffusers' formats under `folder`: lora/ (+ lora_ema/), or denoiser/ (+
        denoiser_ema/) (`denoiser`, `denoiser_ema`: `policy.plain_denoiser()` of the weights and of the EMA, taken by
        the caller on every process under FSDP2, where it is a collective; else taken here)."""
        if self.policy.has_lora:
            self.policy.save_lora(folder / "lora")
            if self.ema is not None:
                with self.ema.swapped():
                    self.policy.save_lora(folder / "lora_ema")
            return
        (denoiser if denoiser is not None else self.policy.plain_denoiser()).save_pretrained(
            folder / "denoiser", safe_serialization=True)
        if self.ema is not None:
            if denoiser_ema is None:
                with self.ema.swapped():
                    self.policy.plain_denoiser().save_pretrained(folder / "denoiser_ema", safe_serialization=True)
            else:
                denoiser_ema.save_pretrained(folder / "denoiser_ema", safe_serialization=True)

    def save(self, step: int) -> Path | None:
        """A checkpoint (and the run folder's lora/, replaced atomically). Every process calls it (under FSDP2
        the tensors are gathered); rank 0 writes."""
        if self.run is None:
            return None
        tensors, optim = self.state_tensors(), self.policy.optimizer_state(self.optimizer)
        plain = None if self.policy.has_lora else self.policy.plain_denoiser()  # a collective under FSDP2
        plain_ema = None
        if not self.policy.has_lora and self.ema is not None and self.policy.strategy == "fsdp":
            with self.ema.swapped():
                plain_ema = self.policy.plain_denoiser()  # a copy (a collective): the swap is undone after
        objects = {"optim": optim}
        if self.scaler is not None:
            objects["scaler"] = self.scaler.state_dict()
        path = self.run.save_checkpoint(step, tensors,
                                        {"consecutive_skips": self.consecutive_skips,
                                         "skipped_total": self.skipped_total,
                                         **({"prompt_stats": self.prompt_stats.state_dict()}
                                            if self.prompt_stats is not None else {})},
                                        objects, write_extra=lambda folder: self.save_weights(folder, plain, plain_ema))
        if path is not None:
            for name in ("lora", "lora_ema", "denoiser", "denoiser_ema"):
                if (path / name).exists():
                    _replace_dir(path / name, self.run.out_dir / name)
        return path

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> None:
        """Run (or resume) the training loop to run.steps, with logging, evaluation and checkpoints."""

        run, cfg = self.run, self.cfg
        if run is None:
            raise ValueError("fit() needs a Run (the run folder); use train_step() without one")
        ckpt = run.load_checkpoint()
        run.check_world_size()  # samples are seeded by their place in the global batch, not by the rank
        if ckpt is not None:
            self.load_state(ckpt)
        n_params = sum(p.numel() for p in self.params.values())  # a DTensor's numel is the whole tensor's
        what = self.policy.trained_part()
        procs = f" x {self.world} processes ({self.policy.strategy})" if self.world > 1 else ""
        run.info(f"diffusion-grpo: {self.policy.family} model on {self.device}{procs}, {what} "
                 f"({n_params:,} trainable parameters), "
                 f"{cfg.prompts.per_step} prompts x {cfg.sampling.group_size} images per step, "
                 f"{cfg.sampling.steps} sampling steps, reward {' + '.join(cfg.reward.names)}"
                 + (f", gradient checkpointing {cfg.memory.gradient_checkpointing} on {len(self.checkpointed)} "
                    "blocks" if self.checkpointed else ""))
        if self.kernels_status is not None:
            run.info(self.kernels_status)
        if self.policy.backbone_patch is not None:
            run.info(self.policy.backbone_patch.summary())
        if not self.policy.is_flow and cfg.sampling.sde_type != "sde":
            run.info(f"sampling.sde_type {cfg.sampling.sde_type} is for flow models: this DDIM model samples "
                     f"DDPO's step (eta = sampling.noise_level)")
        if run.start_step == 0 and cfg.run.eval_every > 0:
            run.log(0, self._guarded(self.evaluate, 0))
        for step in run.steps():
            metrics = self.train_step(step)
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            if run.every(step, cfg.run.eval_every):
                metrics.update(self._guarded(self.evaluate, step))
            if run.every(step, cfg.run.log_every) or metrics.get("skipped"):
                run.log(step, metrics)
            if run.every(step, cfg.run.checkpoint_every) or run.is_last(step):
                self.save(step)
        run.info_reward_summary()
        run.info_peak_memory(self.device)
        if offloaded := cfg.memory.offload_summary():
            run.info(offloaded)


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy folder `src` to `dst`, replacing it by renames (a reader sees the old or the new folder)."""
    from ..runs.atomic import fsync_dir, remove_tree

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        old = None
        if dst.exists():
            old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        if old is not None:
            remove_tree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- OOM


def _oom_message(phase: str, cfg: DiffusionGRPOConfig) -> str:
    s, m = cfg.sampling, cfg.memory
    mb = s.micro_batch if s.micro_batch is not None else f"none = all {cfg.prompts.per_step * s.group_size}"
    half = max(1, (s.micro_batch or cfg.prompts.per_step * s.group_size) // 2)
    tips = [f"sampling.micro_batch (now {mb}; e.g. {half})"]
    if phase == "training":
        if m.gradient_checkpointing == "none":
            tips.append("memory.gradient_checkpointing (now none; try save_attention or full)")
        elif m.checkpoint_blocks is not None:
            tips.append(f"memory.checkpoint_blocks (now {m.checkpoint_blocks}; raise it, or unset it: every block)")
        tips.append(f"grpo.timestep_fraction does not change peak memory; lora.rank (now {cfg.lora.rank}) a little")
    if cfg.model.dtype in ("auto", "fp32") and cfg.model.device != "cpu":
        tips.append(f"model.dtype (now {cfg.model.dtype}; bf16 halves the frozen weights)")
    if cfg.optim.mixed_precision == "no":
        tips.append("optim.mixed_precision (now no; try bf16)")
    if not cfg.model.offload_vae:
        tips.append("model.offload_vae (now false)")
    if s.height or s.width:
        tips.append(f"sampling.height / sampling.width (now {s.height} x {s.width})")
    tips.append(f"prompts.per_step x sampling.group_size (now {cfg.prompts.per_step} x {s.group_size}) if nothing "
                "else helps")
    return (f"out of GPU memory while {phase}. Lower, in this order: " + "; ".join(tips)
            + ". Resume with --resume after changing them (--allow-change FIELD).")


# ----------------------------------------------------------------------------------------------- entry point


def train(cfg: DiffusionGRPOConfig, run: Any) -> int | None:
    """`fusedrl train diffusion-grpo`: build the trainer and run it in `run`'s folder."""
    import sys

    import torch

    threads = cfg.model.cpu_threads or (1 if cfg.model.model is None else None)
    before = torch.get_num_threads()
    if threads is not None:
        # Measured on the embedded default (2-core VM, another job running): 0.5 s of CPU per step on one thread,
        # 7 s on two (the ops are ~16 x 512: the threads spin-wait on each other).
        torch.set_num_threads(threads)

    try:
        from .processes import prepare_processes

        prepare_processes(cfg.model.device, embedded=cfg.model.model is None)
        GRPOTrainer(cfg, run).fit()
    except ConfigError as exc:  # what a field names turned out unusable (a prompt file's rows, reward options)
        run.info(f"stopped: {exc}")
        print(f"fusedrl train diffusion-grpo: {exc}", file=sys.stderr)
        return 2
    except DiffusionGRPOOutOfMemory as exc:
        run.info(f"stopped: {exc}")
        print(f"fusedrl train diffusion-grpo: {exc}", file=sys.stderr)
        return 3
    finally:
        torch.set_num_threads(before)
    return None


TRAINER = Trainer(
    "diffusion-grpo", DiffusionGRPOConfig, train,
    "GRPO (Flow-GRPO / DanceGRPO / DDPO) on diffusers image models, LoRA or full",
    description="With no options it trains the embedded default - a tiny SD3-shaped flow model built from configs "
    "- to raise a built-in reward, in a few minutes on a CPU. Point --model.model at a diffusers folder or hub "
    "id (SD1.5 family, SD3, Flux) and choose --reward.names for real runs. Each step samples "
    "prompts.per_step x sampling.group_size images with log-probs, scores them, and takes Flow-GRPO's clipped "
    "policy-gradient step on group-normalized advantages. Under torchrun (torchrun --nproc-per-node N -m fusedrl "
    "train diffusion-grpo ...) the step's images are split over the processes: DDP for LoRA, FSDP2 for full "
    "fine-tuning.")
