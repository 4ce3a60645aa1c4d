"""Reward backpropagation: AlignProp, DRaFT-K, DRaFT-LV and ReFL on diffusers image models (`fusedrl train
reward-backprop`).

    cfg = load_config(RewardBackpropConfig, overrides={"method": "draft", "backprop.truncation_k": 2})
    trainer = RewardBackprop.build(cfg)          # loads the policy (LoRA), rewards, prompts, optimizer
    for step in range(1, 11):
        metrics = trainer.train_step(step)       # {"reward_mean": ..., "loss": ..., "k": ..., "skipped": 0, ...}

Methods (the loss is always minimised; r = the weighted sum of the rewards, S = sampling.num_steps):
- alignprop (AlignProp): sample S steps; gradients flow through the last K, K drawn uniformly from
  backprop.k_range (default [1, S]) at every micro-batch; loss = -loss_scale * mean(r).
- draft (DRaFT-K): the same with a fixed K = backprop.truncation_k (0: all S steps, full DRaFT), or a random K
  when k_range is set.
- draft-lv (DRaFT-LV): K = 1, plus n = backprop.lv_samples re-denoisings of the last step: the final latents
  x0 (detached) are noised back to the level where the last step starts with fresh noise, z_j, and denoised
  again with gradient; loss = -loss_scale * mean of r over the B (K = 1) + n B samples.
- refl (ReFL): sampling stops at a step i drawn uniformly from backprop.refl_range (default: the last quarter),
  steps before it without gradient; the clean latents are predicted from x_i in one denoiser call with
  gradient (flow: x - sigma_i v; DDIM: from epsilon / v / sample), decoded and scored; loss = -loss_scale *
  mean(r), or loss_scale * mean(relu(refl_margin - r)) with refl_margin set (ImageReward's ReFL).
Every gradient step is checkpointed (memory.checkpointing) and so is the VAE decode (memory.checkpoint_vae):
see `differentiable.py`.

Determinism and resume: the prompts of a micro-batch are `prompt_batch(prompts, index, batch)` and its noise
and K come from (run.seed, step, micro-batch): pure functions of the step, so a resumed run (LoRA, AdamW state
and gradient-scaler state restored from the checkpoint) repeats the uninterrupted run exactly.

Several processes (torchrun; the same command): sampling.batch_size is per process; micro-batch m of a step is
the world x batch_size prompts `prompt_batch(prompts, index, world * batch_size)`, process r taking the r-th
slice, with the noise its samples would have in one process. LoRA: every process holds the adapter, and after
the backward of the step's micro-batches the gradients are averaged over the processes
(`engine.distributed.average_gradients`: the many denoiser calls before one backward do not fit DDP's hooks).
Full fine-tuning: FSDP2 (`fully_shard` of every block and of the denoiser), which reduce-scatters the
gradients in the backward. Either way one process with the same global batch takes the same step. Skips are
decided on all processes together; every process evaluates (FSDP2 needs them in step), rank 0 writes the run
folder; checkpoints hold whole tensors.

Robustness: a non-finite reward, loss or gradient norm skips the step (no optimizer update; logged as
skipped=1 with the reason in train.log); an out-of-memory error stops the run with a message naming the
settings to lower (`OutOfMemory`); config errors are raised by the config before anything is loaded.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, config_errors, model_loading_errors
from ..distributed import all_sums, any_process, average_gradients, full_tensor, shard_like, whole_on_rank0
from ..oom import is_out_of_memory
from ..rewards.base import any_takes_metadata
from ..runs import Run, Trainer, seed_everything
from ..runs.atomic import fsync_dir, fsync_file
from .reward_backprop_config import Resolved, RewardBackpropConfig, resolve

__all__ = ["TRAINER", "OutOfMemory", "RewardBackprop", "RewardBackpropConfig", "StepResult", "train"]

log = logging.getLogger("fusedrl")

LORA_DIR = "lora"
DENOISER_DIR = "denoiser"  # full fine-tuning: the denoiser, save_pretrained (diffusion-grpo's name too)


class OutOfMemory(RuntimeError):
    """The accelerator ran out of memory in a reward-backprop step; the message names the settings to lower."""


@dataclass
class StepResult:
    """What one micro-batch's forward gives: rewards [n] (with grad), the loss (scalar, with grad), the images
    [n, 3, H, W] (detached), the per-reward raw values, K (gradient steps; ReFL: the stop step's index), and
    what was not finite (None when everything was)."""

    rewards: torch.Tensor
    loss: torch.Tensor
    images: torch.Tensor
    raw: dict[str, torch.Tensor]
    k: int
    problem: str | None = None


def _seed(*parts: Any) -> int:
    return random.Random(":".join(str(p) for p in parts)).getrandbits(62)


class RewardBackprop:
    """A reward-backprop trainer: policy, rewards, prompts and optimizer for one `RewardBackpropConfig`.

    Build with `RewardBackprop.build(cfg)` (loads everything) or `RewardBackprop(cfg, policy, reward)` (a
    policy and a reward you built). `train_step(step)` runs one optimisation step; `evaluate()` samples the
    eval prompts; `state_tensors()` / `load_state(...)` are what a checkpoint holds.
    """

    def __init__(self, cfg: RewardBackpropConfig, policy: Any, reward: Any, *, resolved: Resolved | None = None,
                 train_prompts: Sequence[str] | None = None, eval_prompts: Sequence[str] | None = None,
                 prompt_metadata: dict[str, dict] | None = None) -> None:
        from ..distributed import rank_and_world
        from .prompts import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS

        self.cfg = cfg
        self.rank, self.world = rank_and_world()
        self.resolved = resolved or resolve(cfg)
        self.policy = policy
        if self.world > 1 and not policy.has_lora and policy.strategy is None:
            policy.parallelize("fsdp")  # before the optimizer: FSDP2 replaces the parameters by shards
        self.reward = reward
        self.train_prompts = list(train_prompts or DEFAULT_PROMPTS)
        self.eval_prompts = list(eval_prompts or DEFAULT_EVAL_PROMPTS)[: cfg.prompts.num_eval]
        self.prompt_metadata = dict(prompt_metadata or {})
        self.takes_metadata = any_takes_metadata(reward.rewards.values())
        self.named_params = self._named_trainable()
        if not self.named_params:
            raise ValueError("the policy has no trainable parameters (LoRA targets matched nothing?)")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=self.resolved.lr, betas=o.betas,
                                           eps=o.eps, weight_decay=o.weight_decay)
        use_scaler = cfg.dtype == "fp16" and policy.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.skipped_total = 0
        self.last_skip_reason: str | None = None
        g = cfg.sampling.guidance_scale
        self.guidance_scale = float(policy.defaults["guidance_scale"] if g is None else g)
        self.height = cfg.sampling.height or policy.defaults["height"]
        self.width = cfg.sampling.width or policy.defaults["width"]
        try:
            policy.check_size(self.height, self.width)
        except ValueError as exc:
            raise ConfigError([("sampling.height / sampling.width", str(exc))]) from None
        self.schedule = policy.schedule(cfg.sampling.num_steps, self.height, self.width)
        policy.train()

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: RewardBackpropConfig, *, device: torch.device | None = None) -> RewardBackprop:
        """Load the rewards (first: a wrong reward fails before the model loads), prompts and the policy (on
        `device`, default cfg.device)."""
        resolved = resolve(cfg)
        reward = build_reward(cfg, device)
        with_metadata = any_takes_metadata(reward.rewards.values())
        train_prompts, eval_prompts, metadata = load_prompt_lists(cfg, with_metadata)
        policy = build_policy(cfg, resolved, device=device)
        return cls(cfg, policy, reward, resolved=resolved, train_prompts=train_prompts, eval_prompts=eval_prompts,
                   prompt_metadata=metadata)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> Any:
        """The combined reward's scores (`CombinedScores`); rewards that take metadata get each prompt's row fields."""
        if self.takes_metadata:
            return self.reward.score_all(images, prompts, metadata=[self.prompt_metadata.get(p, {}) for p in prompts])
        return self.reward.score_all(images, prompts)

    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        mods = [("denoiser", self.policy.denoiser)]
        mods += [(f"text_encoder_{i}", te) for i, te in enumerate(self.policy.text_encoders)]
        return [(f"{prefix}.{n}", p) for prefix, m in mods for n, p in m.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ one step

    def choose_k(self, step: int, micro: int) -> int:
        """The number of final steps with gradient for (step, micro-batch) (ReFL: the stop step's index)."""
        cfg, S = self.cfg, self.cfg.sampling.num_steps
        bp = cfg.backprop
        rng = random.Random(_seed("k", cfg.run.seed, step, micro))
        if cfg.method == "refl":
            lo, hi = bp.refl_range if bp.refl_range is not None else (S - max(1, S // 4), S - 1)
            return rng.randint(lo, hi)
        if cfg.method == "draft-lv":
            return 1
        if bp.k_range is not None:
            return rng.randint(*bp.k_range)
        if cfg.method == "alignprop":
            return rng.randint(1, S)
        return bp.truncation_k or S

    def forward(self, prompts: Sequence[str], *, seed: int, k: int, grad: bool = True) -> StepResult:
        """Sample `prompts` (one image each) with gradients through the method's window, decode, score.

        k: gradient steps (alignprop / draft), or the ReFL stop step; ignored by draft-lv (1).
        """
        from . import differentiable as D

        cfg, policy = self.cfg, self.policy
        s, bp, mem = cfg.sampling, cfg.backprop, cfg.memory
        B = len(prompts)
        vae_ckpt = ("full" if mem.checkpointing == "none" else mem.checkpointing) if mem.checkpoint_vae else "none"
        if vae_ckpt.startswith("save_attention"):
            vae_ckpt = "full"  # the VAE's cost is its convolutions; its one attention block is small
        with torch.set_grad_enabled(grad):
            emb = policy.encode_prompts(list(prompts))
            # this process's part of the micro-batch's generators: its samples' noise does not depend on the split
            gens = D.noise_generators(B * self.world, seed)[self.rank * B:(self.rank + 1) * B]
            x = D.initial_latents(policy, B, gens, height=self.height, width=self.width)
            common = dict(guidance_scale=self.guidance_scale, generators=gens, noise_level=s.noise_level,
                          sde_type=s.sde_type, checkpointing=mem.checkpointing)
            all_prompts = list(prompts)
            if cfg.method == "refl":
                lat = D.denoise(policy, emb, self.schedule, x, grad_steps=0, stop_at=k, **common)
            elif cfg.method == "draft-lv":
                k = 1
                last = s.num_steps - 1
                lat0 = D.denoise(policy, emb, self.schedule, x, grad_steps=1, **common)
                parts, x0 = [lat0], lat0.detach()
                for _ in range(bp.lv_samples):
                    xt = D.renoise(policy, self.schedule, x0, last, D.step_noise(policy, x0, gens))
                    parts.append(D.denoise(policy, emb, self.schedule, xt, grad_steps=1, start=last, **common))
                    all_prompts += list(prompts)
                lat = torch.cat(parts)
            else:
                lat = D.denoise(policy, emb, self.schedule, x, grad_steps=k, **common)
            images = D.decode(policy, lat, checkpointing=vae_ckpt, micro_batch=B)  # draft-lv: (n + 1) B latents
            if not bool(torch.isfinite(images.detach()).all()):
                # A diverged step: the rewards refuse NaN pixels; report it as a non-finite reward (skipped).
                nan = torch.full((images.shape[0],), float("nan"), device=images.device)
                return StepResult(nan, nan.mean(), images.detach(), {}, k, "non-finite image")
            scores = self.score(images, all_prompts)
            r = scores.total
            if cfg.method == "refl" and bp.refl_margin is not None:
                loss = bp.loss_scale * torch.relu(bp.refl_margin - r).mean()
            else:
                loss = -bp.loss_scale * r.mean()
        return StepResult(r, loss, images.detach(), {n: v.detach() for n, v in scores.raw.items()}, k)

    def _lr(self, step: int) -> float:
        w = self.cfg.optim.warmup_steps
        return self.resolved.lr * (min(1.0, step / w) if w > 0 else 1.0)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (steps count from 1): grad_accum micro-batches, then AdamW, unless a reward,
        the loss or the gradient norm is not finite (then nothing is applied and metrics say skipped=1).
        Raises OutOfMemory (naming what to lower) when the accelerator runs out of memory."""
        try:
            return self._train_step(step)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemory(oom_advice(self.cfg, step)) from exc

    def _train_step(self, step: int) -> dict[str, float]:
        from .prompts import prompt_batch

        cfg = self.cfg
        accum = cfg.optim.grad_accum
        t0 = time.perf_counter()
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        rewards, raws, losses, ks = [], {}, [], []
        reason = None
        for micro in range(accum):
            index = (step - 1) * accum + micro
            b = cfg.sampling.batch_size  # per process: the micro-batch of all processes is world x b prompts
            prompts = prompt_batch(self.train_prompts, index, b * self.world, seed=cfg.run.seed)
            prompts = prompts[self.rank * b:(self.rank + 1) * b]
            out = self.forward(prompts, seed=_seed("noise", cfg.run.seed, step, micro), k=self.choose_k(step, micro))
            ks.append(out.k)
            rewards.append(out.rewards.detach())
            for n, v in out.raw.items():
                raws.setdefault(n, []).append(v)
            losses.append(out.loss.detach())
            if not bool(torch.isfinite(out.rewards).all()):
                reason = out.problem or "non-finite reward"
            elif not bool(torch.isfinite(out.loss)):
                reason = "non-finite loss"
            # decided on every process together: under FSDP2 the backward is a collective
            if any_process(reason is not None, self.policy.device):
                reason = reason or "a non-finite reward or loss on another process"
                break
            loss = out.loss / accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            del out, loss
        self.policy.reshard()  # FSDP2: a skipped micro-batch's forwards (no backward) left the root gathered
        grad_norm = float("nan")
        if reason is None:
            params = [p for _, p in self.named_params]
            if self.policy.strategy != "fsdp":  # FSDP2 has reduce-scattered them already
                average_gradients(params)  # several processes: the mean gradient of the whole micro-batches
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            if not math.isfinite(grad_norm):
                reason = "non-finite gradient"
        if reason is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        else:
            if self.scaler is not None and reason == "non-finite gradient":
                self.scaler.update()  # lowers the scale, as a skipped fp16 step should
            self.skipped_total += 1
            log.warning("step %d skipped: %s (no update applied; %d skipped so far)", step, reason,
                        self.skipped_total)
        self.optimizer.zero_grad(set_to_none=True)
        device = self.policy.device
        r = torch.cat(rewards).float()
        refl = cfg.method == "refl"
        reward_mean, reward_std = _mean_std(r, device)
        metrics = {"reward_mean": reward_mean, "loss": _count_mean(torch.stack(losses), device)[1],
                   "k": 1.0 if refl else sum(ks) / len(ks), "grad_norm": grad_norm, "reward_std": reward_std,
                   "skipped": float(reason is not None), "lr": lr}
        if refl:
            metrics["refl_step"] = sum(ks) / len(ks)
        if len(raws) > 1:
            for n, vs in raws.items():
                metrics[f"reward/{n}"] = _count_mean(torch.cat(vs), device)[1]
        metrics["step_time"] = time.perf_counter() - t0
        self.last_skip_reason = reason
        return metrics

    # ------------------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], torch.Tensor, list[str]]:
        """Sample the eval prompts (fixed noise, full sampling, no gradient), score them.
        Returns (metrics, images [n, 3, H, W], captions)."""
        from . import differentiable as D

        cfg, policy = self.cfg, self.policy
        policy.train(False)
        try:
            prompts = self.eval_prompts
            emb = policy.encode_prompts(prompts)
            gens = D.noise_generators(len(prompts), _seed("eval", cfg.run.seed))
            x = D.initial_latents(policy, len(prompts), gens, height=self.height, width=self.width)
            lat = D.denoise(policy, emb, self.schedule, x, grad_steps=0, guidance_scale=self.guidance_scale,
                            generators=gens, noise_level=cfg.sampling.noise_level, sde_type=cfg.sampling.sde_type)
            images = torch.cat([policy.decode(lat[i:i + cfg.sampling.batch_size])
                                for i in range(0, len(prompts), cfg.sampling.batch_size)])
            scores = self.score(images, prompts)
        finally:
            policy.train(True)
            policy.reshard()  # FSDP2: the no-grad forwards left the root gathered
        r = scores.total.float()
        mean, std = _mean_std(r)  # this process's: every process evaluates the same prompts
        metrics = {"eval/reward_mean": mean, "eval/reward_std": std}
        if len(scores.raw) > 1:
            for n, v in scores.raw.items():
                metrics[f"eval/reward/{n}"] = _count_mean(v)[1]
        captions = [f"{p} | r={v:.4g}" for p, v in zip(prompts, r.tolist())]
        return metrics, images, captions

    # ------------------------------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (what a checkpoint's tensors.safetensors holds), whole, on rank 0's CPU
        ({} elsewhere): under FSDP2 gathered one at a time (a collective: every process calls it)."""
        return whole_on_rank0(self.named_params)

    def state_objects(self) -> dict[str, Any]:
        """The optimizer (whole; a collective under FSDP2) and gradient-scaler states."""
        objects: dict[str, Any] = {"optim": self.policy.optimizer_state(self.optimizer)}
        if self.scaler is not None:
            objects["scaler"] = self.scaler.state_dict()
        return objects

    def load_state(self, tensors: dict[str, torch.Tensor], objects: dict[str, Any], state: dict[str, Any]) -> None:
        """Restore what `state_tensors` / `state_objects` / the JSON state saved."""
        own = dict(self.named_params)
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"the checkpoint has no values for {len(missing)} trainable parameters "
                             f"(e.g. {missing[0]}); was it saved with other LoRA settings?")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(shard_like(tensors[n], p))
        self.policy.load_optimizer_state(self.optimizer, objects["optim"])
        if self.scaler is not None and "scaler" in objects:
            self.scaler.load_state_dict(objects["scaler"])
        self.skipped_total = int(state.get("skipped_total", 0))

    def save_weights(self, directory: str | os.PathLike, denoiser: Any = None) -> Path:
        """LoRA (diffusers' format, loadable with `pipe.load_lora_weights(directory)`) or, for full fine-tuning,
        the denoiser (`save_pretrained`; `denoiser`: `policy.plain_denoiser()`, taken by the caller on every
        process under FSDP2) into `directory`, written next to it and moved into place file by file (each file
        appears whole)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            if self.policy.has_lora:
                self.policy.save_lora(tmp)
            else:
                (denoiser if denoiser is not None else self.policy.plain_denoiser()).save_pretrained(
                    tmp, safe_serialization=True)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for f in files:
                fsync_file(f)
            if not directory.exists():
                os.replace(tmp, directory)
            else:
                for f in files:
                    dest = directory / f.relative_to(tmp)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(directory.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory


def _sums(values: Sequence[Any], device: torch.device | None) -> list[float]:
    """The values summed over every process when `device` is given (one all-reduce), else as they are."""
    return all_sums(values, device) if device is not None else [float(v) for v in values]


def _count_mean(t: torch.Tensor, device: torch.device | None = None) -> tuple[float, float]:
    """(number of values, their mean) over every process (`device` given) or this one's; NaN values give NaN, no
    values a NaN mean."""
    n, total = _sums([t.numel(), t.float().sum()], device)
    return n, (total / n if n else float("nan"))


def _mean_std(t: torch.Tensor, device: torch.device | None = None) -> tuple[float, float]:
    """(mean, population std) as `_count_mean` takes them; std 0.0 for fewer than two values."""
    n, mean = _count_mean(t, device)
    if n < 2:
        return mean, 0.0
    (squares,) = _sums([(t.float() - mean).square().sum()], device)
    return mean, math.sqrt(squares / n)


# ---------------------------------------------------------------------------------------------- building parts


def build_reward(cfg: RewardBackpropConfig, device: torch.device | str | None = None) -> Any:
    """The configured rewards as one `CombinedReward` (weighted sum, no normalisation), on the policy's device.
    Raises ConfigError naming reward.names when a reward turns out not to be differentiable."""
    from ..rewards import CombinedReward, load_reward, registry
    from ..rewards.registry import _key

    rc = cfg.reward
    device = str(device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = {_key(k): v for k, v in rc.paths.items()}
    options = {_key(k): v for k, v in rc.options.items()}
    rewards = {}
    for name in rc.names:
        key = _key(name)
        kwargs = dict(options.get(key, {}))
        if key not in ("brightness", "target_color"):
            kwargs.setdefault("device", device)
        try:
            r = load_reward(key, paths.get(key), **kwargs)
        except TypeError as exc:  # an option the reward does not take
            raise ConfigError([(f"reward.options.{name}", str(exc))]) from None
        except (FileNotFoundError, OSError, ValueError) as exc:
            where = "reward.names" if registry.is_function_spec(key) else f"reward.paths.{name}"
            raise ConfigError([(where, f"cannot load reward {name!r}: {exc}")]) from None
        if not getattr(r, "differentiable", False):
            raise ConfigError([("reward.names", f"reward {name!r} is not differentiable")])
        rewards[key] = r
    weights = dict(zip(rewards, rc.weights)) if rc.weights is not None else None
    return CombinedReward(rewards, weights, normalize=None)


def load_prompt_lists(cfg: RewardBackpropConfig, with_metadata: bool = False,
                      ) -> tuple[list[str], list[str], dict[str, dict]]:
    """(train prompts, eval prompts, {prompt: its row's other fields}) of `cfg.prompts`; the fields only
    `with_metadata` (a reward takes them), else {}."""
    from .prompts import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS, load_prompts, prompt_metadata

    p = cfg.prompts
    with config_errors("prompts.train"):
        train = load_prompts(p.train, field=p.column, split=p.split) if p.train else list(DEFAULT_PROMPTS)
    with config_errors("prompts.eval"):
        evals = load_prompts(p.eval, field=p.column, split=p.split) if p.eval else list(DEFAULT_EVAL_PROMPTS)
    with config_errors("prompts"):
        metadata = prompt_metadata([(p.train, p.split), (p.eval, p.split)], field=p.column) if with_metadata else {}
    return train, evals, metadata


def build_policy(cfg: RewardBackpropConfig, resolved: Resolved | None = None, *,
                 device: torch.device | None = None) -> Any:
    from ..distributed import rank_and_world
    from .policy import LoraOptions, load_policy

    resolved = resolved or resolve(cfg)
    lc = cfg.lora
    lora = None
    if lc.enabled:
        lora = LoraOptions(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target_modules=resolved.lora_targets,
                           text_encoder=lc.text_encoder, denoiser=lc.denoiser,
                           text_encoder_target_modules=list(lc.text_encoder_target_modules))
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    with model_loading_errors("model", "lora.target_modules", "lora.text_encoder_target_modules"):
        return load_policy(cfg.model, device=device if device is not None else cfg.device,
                           dtype=None if cfg.dtype == "auto" else cfg.dtype, lora=lora,
                           offload_text_encoders=cfg.memory.offload_text_encoders,
                           offload_vae=cfg.memory.offload_vae, patch_attention=cfg.memory.patch_attention,
                           fused_backbone=cfg.memory.fused_backbone,
                           prompt_cache_gb=cfg.memory.prompt_cache_gb,
                           sharded=lora is None and rank_and_world()[1] > 1, **kwargs)


def oom_advice(cfg: RewardBackpropConfig, step: int) -> str:
    """The message of an out-of-memory error: the settings that set the memory of a step, what to lower first."""
    s, bp, mem = cfg.sampling, cfg.backprop, cfg.memory
    tips = []
    if cfg.method in ("alignprop", "draft"):
        if bp.k_range is not None or cfg.method == "alignprop":
            hi = bp.k_range[1] if bp.k_range is not None else s.num_steps
            tips.append(f"backprop.k_range (the largest K is {hi})")
        else:
            tips.append(f"backprop.truncation_k (K = {bp.truncation_k or s.num_steps} steps with gradient)")
    if cfg.method == "draft-lv":
        tips.append(f"backprop.lv_samples ({bp.lv_samples}: the decode and reward run on {bp.lv_samples + 1} x batch)")
    tips.append(f"sampling.batch_size ({s.batch_size}; keep the effective batch with optim.grad_accum)")
    if mem.checkpointing in ("none", "save_attention_and_matmuls", "save_attention"):
        tips.append(f"memory.checkpointing ({mem.checkpointing!r} -> 'full', or 'offload')")
    if not mem.checkpoint_vae:
        tips.append("memory.checkpoint_vae (turn it on)")
    if cfg.dtype in ("auto", "fp32") and cfg.device != "cpu":
        tips.append("dtype (bf16 halves the frozen weights and activations)")
    if s.height or s.width:
        tips.append(f"sampling.height / sampling.width ({s.height} x {s.width})")
    return (f"out of memory in reward-backprop step {step} (method {cfg.method}). Lower, in this order: "
            + "; ".join(tips) + ". Then continue with --resume --allow-change FIELD ... (finished steps are kept).")


# ---------------------------------------------------------------------------------------------- the run


def train(cfg: RewardBackpropConfig, run: Run) -> int:
    """`fusedrl train reward-backprop`: train, logging to `run`; returns the exit code (0; 2: a config problem
    found while loading; 3: out of memory)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, run)
    finally:
        torch.set_num_threads(threads)


def _fail(run: Run, exc: BaseException) -> None:
    run.info(str(exc))
    print(f"fusedrl train reward-backprop: {exc}", file=sys.stderr, flush=True)


def _train(cfg: RewardBackpropConfig, run: Run) -> int:
    from ..distributed import local_device
    from ..startup import prepare_kernels
    from .processes import prepare_processes

    resolved = resolve(cfg)
    try:
        device = local_device(cfg.device or "auto", field="device")
        run.check_world_size(per_process_batch="sampling.batch_size")  # before building: a refusal costs nothing
    except ConfigError as exc:
        _fail(run, exc)
        return 2
    except ValueError as exc:
        _fail(run, ConfigError([("device", str(exc).split(": ", 1)[1])]))
        return 2
    prepare_processes(str(device), embedded=cfg.model is None)
    kernels_status = prepare_kernels(device, build=cfg.run.cuda_extension)  # before the backbone probe
    seed_everything(cfg.run.seed)
    if device.type == "cpu" and resolved.cpu_threads is not None:
        torch.set_num_threads(resolved.cpu_threads)
    try:
        trainer = RewardBackprop.build(cfg, device=device)
    except ConfigError as exc:
        _fail(run, exc)
        return 2
    procs = ""
    if trainer.world > 1:
        how = "FSDP2" if trainer.policy.strategy == "fsdp" else "gradients averaged"
        procs = f" x {trainer.world} processes ({how})"
    targets = f" lora_targets={list(resolved.lora_targets)}" if cfg.lora.enabled and cfg.lora.denoiser else ""
    run.info(f"reward-backprop: method={cfg.method} model={cfg.model or 'embedded tiny SD3'} lr={resolved.lr} "
             f"training={trainer.policy.trained_part()}{targets} rewards={cfg.reward.names} device={device}{procs}")
    if kernels_status is not None:
        run.info(kernels_status)
    if trainer.policy.backbone_patch is not None:
        run.info(trainer.policy.backbone_patch.summary())
    if unused := cfg.unused_options():
        run.info(f"not used by method {cfg.method}: {', '.join(unused)}")
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        trainer.load_state(ckpt.tensors, ckpt.objects, ckpt.state)
    rc = cfg.run
    weights_dir = LORA_DIR if trainer.policy.has_lora else DENOISER_DIR
    if run.start_step == 0 and rc.eval_every > 0:
        run.log(0, _evaluate(trainer, run, 0))  # the reward before training (every process samples; rank 0 logs)
    for step in run.steps():
        try:
            metrics = trainer.train_step(step)
        except OutOfMemory as exc:
            _fail(run, exc)
            return 3
        evaluated = run.every(step, rc.eval_every)
        if evaluated:
            metrics.update(_evaluate(trainer, run, step))
        if run.every(step, rc.log_every) or metrics["skipped"] or evaluated:
            run.log(step, metrics)
        if run.every(step, rc.checkpoint_every) or run.is_last(step):
            # gathered on every process (collectives under FSDP2), written by rank 0
            plain = trainer.policy.plain_denoiser() if not trainer.policy.has_lora else None
            tensors, objects = trainer.state_tensors(), trainer.state_objects()
            if run.is_main:
                trainer.save_weights(run.out_dir / weights_dir, plain)
            # LoRA checkpoints also hold the diffusers-format LoRA (small); full fine-tuning's tensors are the
            # denoiser's weights already
            extra = (lambda folder: trainer.save_weights(folder / LORA_DIR)) if trainer.policy.has_lora else None
            run.save_checkpoint(step, tensors, {"skipped_total": trainer.skipped_total}, objects, write_extra=extra)
    run.info_reward_summary()
    run.info_peak_memory(trainer.policy.device)
    run.info(f"done: weights in {run.out_dir / weights_dir}"
             + (" (load with pipe.load_lora_weights(...))" if trainer.policy.has_lora else ""))
    return 0


def _evaluate(trainer: RewardBackprop, run: Run, step: int) -> dict[str, float]:
    metrics, images, captions = trainer.evaluate()
    run.save_image_grid(step, images, captions)
    return metrics


TRAINER = Trainer(
    "reward-backprop", RewardBackpropConfig, train,
    "reward backpropagation (AlignProp / DRaFT / ReFL) on diffusers image models",
    description=(
        "Backpropagates a differentiable reward through the last denoising steps of a diffusers model (SD1.5 "
        "UNet + DDIM, SD3 or Flux flow transformers + Euler), each step and the VAE decode checkpointed so memory "
        "stays flat in the number of steps K.\n"
        "Methods: alignprop (random K), draft (fixed K; 0 = all steps), draft-lv (K=1 plus re-noised "
        "re-denoisings of the last step), refl (predict the clean image at a random late step).\n"
        "With no --model it runs the embedded default: a tiny SD3-shaped model built from configs (LoRA on its "
        "attention and output projections), learning the brightness reward in under a minute on a 2-core CPU.\n"
        "Under torchrun each process takes sampling.batch_size prompts of every micro-batch: LoRA gradients are "
        "averaged, full fine-tuning runs under FSDP2."),
)
