"""The LLM GRPO loop: sample G completions per prompt, score them, normalise the rewards within each group, and
take a few clipped policy-gradient updates on the fused linear GRPO loss.

    trainer = LLMGRPOTrainer(policy, reward_terms, records, cfg)      # cfg: an LLMGRPOConfig
    for step in range(1, 101):
        metrics = trainer.step(step)                                  # {"reward_mean": ..., "loss": ..., ...}

One step (`step`):
1. the prompts of the step (`prompt_batch`, a pure function of step and seed) and the torch seed of its samples
   (`step_seed(seed, step, rank)`), so a resumed run redraws exactly what the killed run drew;
2. `generate_completions`: G completions each, with the log-prob of every sampled token (the "old" log-probs);
3. rewards (`rewards.score`), group advantages (`fusedrl.engine.group_advantages`);
4. with beta > 0, the reference log-probs (adapter disabled, or the frozen copy), once per step;
5. `grpo.num_iterations` passes, each of `grpo.mini_batches` optimizer updates; an update's rows are cut into
   micro-batches of at most `memory.token_budget` tokens whose gradients are accumulated. Each micro-batch's
   loss is scaled so that the accumulated gradient is exactly that of the mini-batch's loss (sequence means
   weighted by rows, bnpo by tokens, dapo / cispo normalised by the mini-batch's token count).

Guards: a step whose rewards or log-probs are not finite is skipped before any update; an update whose loss or
gradient norm is not finite is dropped (gradients zeroed, the optimizer untouched). Both are logged
(`skipped` metric, a line in train.log); `grpo.max_consecutive_skips` skipped steps in a row stop the run.
Out-of-memory errors are re-raised as `OutOfMemoryAdvice`, naming the settings that lower memory.

Several processes (torchrun; the policy parallelized first, DDP for LoRA, FSDP2 for full fine-tuning): each
process samples prompts.per_step / world prompts (whole groups), advantages use every process's rewards (for
"batch" scaling), token counts are summed over processes, and each process's loss is scaled so that the gradient
average DDP / FSDP2 take is the gradient of the global mini-batch loss. The guards decide on all processes
together. Under FSDP2 every layer's all-gather is a collective, so generation runs with `synced_gpus` and
shorter micro-batch plans are padded with empty micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..advantages import group_advantages
from ..distributed import (
    all_gather,
    all_gather_objects,
    all_max,
    all_mean,
    all_sum,
    any_process,
    full_tensor,
    rank_and_world,
)
from ..oom import is_out_of_memory
from .config import LLMGRPOConfig
from .data import PromptRecord, prompt_batch
from .generation import Rollout, generate_completions
from .policy import Policy, SeqBatch
from .rewards import RewardTerm, score

log = logging.getLogger("fusedrl")

__all__ = ["LLMGRPOTrainer", "OutOfMemoryAdvice", "TooManySkips", "plan_micro_batches"]

SEQUENCE_WEIGHTED = ("grpo", "sapo", "luspo", "dr_grpo")  # losses that are means over sequences
ITEM_NORMALISED = ("dapo", "cispo")  # sum / num_items


class OutOfMemoryAdvice(RuntimeError):
    """The device ran out of memory; the message names the settings that lower memory, with their values."""


class TooManySkips(RuntimeError):
    """Too many consecutive steps were skipped by the NaN/inf guards."""


def oom_advice(cfg: LLMGRPOConfig, phase: str, rows: int) -> str:
    """A message with the settings to lower, for an out-of-memory error in `phase` ("generation" / "training")."""
    s, m = cfg.sampling, cfg.memory
    if phase == "generation":
        tips = [f"sampling.batch_size (now {s.batch_size or 'all'} of {rows} completions per generate call)",
                f"sampling.max_completion_length (now {s.max_completion_length})",
                f"prompts.per_step (now {cfg.prompts.per_step}) or sampling.group_size (now {s.group_size})",
                f"model.dtype (now {cfg.model.dtype}; bf16 halves the weights and the KV cache)"]
    else:
        tips = [f"memory.token_budget (now {m.token_budget or 'none: all rows in one micro-batch'}; e.g. "
                f"{max(64, (m.token_budget or 8192) // 4)})",
                f"memory.gradient_checkpointing (now {m.gradient_checkpointing}; try save_attention or full)"
                if m.checkpoint_blocks is None else
                f"memory.checkpoint_blocks (now {m.checkpoint_blocks}; raise it, or unset it: every block)",
                f"grpo.mini_batches (now {cfg.grpo.mini_batches})",
                f"sampling.max_completion_length (now {s.max_completion_length})"]
        if not cfg.lora.enabled:
            tips.append("lora.enabled (full fine-tuning keeps fp32 Adam state for every weight; LoRA does not)")
        if cfg.grpo.beta != 0 and not cfg.lora.enabled:
            tips.append("grpo.beta (0 drops the frozen reference copy)")
    return (f"out of memory during {phase}. Lower one of:\n  - " + "\n  - ".join(tips))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of training step `step` on process `rank`."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % 2**63


def plan_micro_batches(prompt_lens: Sequence[int], completion_lens: Sequence[int],
                       token_budget: int | None) -> list[list[int]]:
    """Group row indices into micro-batches whose padded size, rows x (longest prompt + longest completion), stays
    within `token_budget` (a row longer than the budget goes alone). Rows are taken longest first so that rows of
    similar length share a micro-batch. None: one micro-batch of every row, in order."""
    n = len(prompt_lens)
    if token_budget is None:
        return [list(range(n))] if n else []
    order = sorted(range(n), key=lambda i: (-(prompt_lens[i] + completion_lens[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    max_p = max_c = 0
    for i in order:
        p, c = max(max_p, prompt_lens[i]), max(max_c, completion_lens[i])
        if cur and (len(cur) + 1) * (p + c) > token_budget:
            batches.append(sorted(cur))
            cur, p, c = [], prompt_lens[i], completion_lens[i]
        cur.append(i)
        max_p, max_c = p, c
    if cur:
        batches.append(sorted(cur))
    return batches


class LLMGRPOTrainer:
    """GRPO on a `Policy` (see the module docstring).

    policy: the model; terms: the rewards; records: the training prompts; cfg: an `LLMGRPOConfig` (its sampling,
    grpo, optim, memory and prompts sections are read); optimizer: default AdamW over the trainable parameters."""

    def __init__(self, policy: Policy, terms: Sequence[RewardTerm], records: Sequence[PromptRecord],
                 cfg: LLMGRPOConfig, *, optimizer: torch.optim.Optimizer | None = None, generator: Any = None,
                 eval_records: Sequence[PromptRecord] = ()):
        self.policy = policy
        self.eval_records = list(eval_records)
        self.generator = generator  # an experimental vllm_generation.VLLMGenerator, or None (transformers' generate)
        self.updates = 0  # optimizer steps taken by this trainer: the generator's weights are synced when it moves
        self.terms = list(terms)
        self.records = list(records)
        self.cfg = cfg
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        o = cfg.optim
        self.lr = o.lr if o.lr is not None else 1e-5
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=self.lr, betas=o.betas, eps=o.eps,
                                                        weight_decay=o.weight_decay)
        # fp16 weights (a GPU without bf16): LoRA's gradients pass fp16 activations, where GRPO's small ones
        # underflow without loss scaling
        fp16 = any(p.dtype == torch.float16 for p in policy.model.parameters())
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.consecutive_skips = 0
        self.skipped_total = 0
        self.rank, self.world_size = rank_and_world()
        if cfg.prompts.per_step % self.world_size:
            raise ValueError(f"prompts.per_step = {cfg.prompts.per_step} must be a multiple of the number of "
                             f"processes ({self.world_size}): each process samples the same number of prompts")
        local_rows = cfg.prompts.per_step // self.world_size * cfg.sampling.group_size
        if cfg.grpo.mini_batches > local_rows:
            raise ValueError(f"grpo.mini_batches = {cfg.grpo.mini_batches} is more than the {local_rows} completions "
                             f"each of the {self.world_size} processes trains on per step")
        self.last_rollout: Rollout | None = None
        self.last_rewards: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = {"consecutive_skips": self.consecutive_skips, "skipped_total": self.skipped_total}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    # ------------------------------------------------------------------------------------------ phases

    def rollout(self, records: Sequence[PromptRecord], group_size: int | None = None) -> Rollout:
        """G (default sampling.group_size) completions of each record, with their sampled log-probs (model in eval
        mode, no gradient)."""
        s = self.cfg.sampling
        group_size = group_size or s.group_size
        model = self.policy.model
        if self.generator is not None:  # experimental vLLM: current weights in, G completions out
            self.generator.sync_weights(model, self.updates)
            return self.generator.generate(
                [r.prompt for r in records], group_size=group_size, max_new_tokens=s.max_completion_length,
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop=s.stop,
                max_prompt_length=self.cfg.prompts.max_prompt_length, answers=[r.answer for r in records],
                device=self.device)
        was_training = model.training
        model.eval()
        try:
            with self.policy.generation_context():
                return generate_completions(
                    model, self.policy.tokenizer, [r.prompt for r in records], group_size=group_size,
                    max_new_tokens=s.max_completion_length, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k, stop=s.stop, batch_size=s.batch_size,
                    max_prompt_length=self.cfg.prompts.max_prompt_length, answers=[r.answer for r in records],
                    synced_gpus=self.policy.strategy == "fsdp")
        finally:
            model.train(was_training)

    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One completion per evaluation prompt (sampling.temperature, seed sampling.eval_seed: the same draws at
        every evaluation), scored by the rewards. Returns (eval/* metrics, a row per prompt: prompt, completion,
        answer, reward, rewards by name, length). The prompts are shared out over the processes (each generates as
        many: generate is collective under FSDP2) and every process returns the same; the training RNG streams are
        left as they were."""
        records = self.eval_records
        if not records:
            return {}, []
        mine = list(range(self.rank, len(records), self.world_size))
        share = -(-len(records) // self.world_size)
        batch = [records[i] for i in mine] + [records[0]] * (share - len(mine))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(step_seed(self.cfg.sampling.eval_seed, 0, self.rank))
            ro = self.rollout(batch, group_size=1)
        lengths = ro.completion_mask.sum(1).tolist()
        comp_ids = [row[:int(n)] for row, n in zip(ro.completion_ids.tolist(), lengths)]
        total, per = score(self.terms, ro.texts, ro.prompts, ro.answers, comp_ids)
        rows = [{"index": i, "prompt": ro.prompts[j], "completion": ro.texts[j], "answer": ro.answers[j],
                 "reward": float(total[j]), "rewards": {name: float(v[j]) for name, v in per.items()},
                 "length": int(lengths[j])} for j, i in enumerate(mine)]
        rows = sorted(all_gather_objects(rows), key=lambda r: r["index"])

        def mean(values: list[float]) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else float("nan")

        metrics = {"eval/reward_mean": mean([r["reward"] for r in rows]),
                   "eval/completion_length": mean([float(r["length"]) for r in rows])}
        for name in per:
            metrics[f"eval/reward/{name}"] = mean([r["rewards"][name] for r in rows])
        return metrics, rows

    def _micro_batches(self, batch: SeqBatch, rows: list[int]) -> list[list[int]]:
        """Row groups of at most memory.token_budget tokens. Under FSDP2 every process must run as many forward
        passes as the others (each layer's all-gather is a collective): shorter plans are padded with empty
        micro-batches ([] - run on one row with no completion token, so they add nothing)."""
        p_lens = batch.prompt_mask[rows].sum(1).tolist()
        c_lens = batch.completion_mask[rows].sum(1).tolist()
        plan = [[rows[i] for i in mb] for mb in plan_micro_batches(p_lens, c_lens, self.cfg.memory.token_budget)]
        if self.policy.strategy == "fsdp" and self.world_size > 1:
            plan += [[] for _ in range(int(all_max(len(plan), self.device)) - len(plan))]
        return plan

    @staticmethod
    def _rows(batch: SeqBatch, mb: list[int], mask: torch.Tensor, device) -> tuple[torch.Tensor, SeqBatch]:
        """(row index, the trimmed sub-batch) of a micro-batch; an empty one is row 0 with its completion masked."""
        idx = torch.tensor(mb or [0], device=device)
        sub_mask = mask[idx] if mb else torch.zeros_like(mask[idx])
        return idx, SeqBatch(batch.prompt_ids[idx], batch.prompt_mask[idx], batch.completion_ids[idx],
                             sub_mask).trimmed()

    @torch.no_grad()
    def logprobs(self, batch: SeqBatch, *, reference: bool = False) -> torch.Tensor:
        """[N, C] log-probs of every row's completion under the policy (or the reference), micro-batched."""
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)
        for mb in self._micro_batches(batch, list(range(batch.completion_ids.shape[0]))):
            idx, sub = self._rows(batch, mb, batch.completion_mask, out.device)
            lp = self.policy.logprobs(sub, reference=reference)
            if mb:
                out[idx, :lp.shape[1]] = lp.float()
        return out

    def _loss_options(self) -> dict[str, Any]:
        g = self.cfg.grpo
        return dict(loss_type=g.loss_type, beta=g.beta, eps_low=g.eps_low,
                    eps_high=g.eps_high if g.eps_high is not None else g.eps_low, delta=g.delta,
                    importance_level=g.importance_level, use_bias_correction_kl=g.use_bias_correction_kl,
                    kl_estimator=g.kl_estimator, max_len=self.cfg.sampling.max_completion_length,
                    sapo_tau=tuple(g.sapo_tau))

    def update(self, batch: SeqBatch, rows: list[int], advantages: torch.Tensor, old_logp: torch.Tensor | None,
               ref_logp: torch.Tensor | None, mask: torch.Tensor) -> tuple[dict[str, float], str | None]:
        """One optimizer update on `rows`: accumulate the micro-batches' gradients, check them, step. Returns
        (metrics, None) or (metrics, reason) when the update was dropped by a guard."""
        opts = self._loss_options()
        loss_type = opts["loss_type"]
        n_rows = len(rows)
        n_tokens = float(mask[rows].sum().item())
        world = self.world_size
        if world > 1:  # the loss is the global mini-batch's: token counts over every process
            n_tokens = all_sum(n_tokens, self.device)
        if loss_type in ITEM_NORMALISED:
            opts["num_items"] = max(n_tokens, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        sums: dict[str, float] = {}
        weight_sum = 0.0
        bad_loss = None
        plan = self._micro_batches(batch, rows)
        for i, mb in enumerate(plan):
            idx, sub = self._rows(batch, mb, mask, advantages.device)
            c = sub.completion_ids.shape[1]
            # DDP synchronises gradients once per update, at the last micro-batch; FSDP2 at each (policy.no_sync).
            with self.policy.no_sync() if i < len(plan) - 1 else contextlib.nullcontext():
                loss, metrics = self.policy.grpo_loss(sub, advantages[idx],
                                                      old_logp[idx, :c] if old_logp is not None else None,
                                                      ref_logp[idx, :c] if ref_logp is not None else None, **opts)
                mb_tokens = float(sub.completion_mask.sum().item())
                if loss_type in SEQUENCE_WEIGHTED:  # DDP / FSDP average gradients over the (equal) processes
                    scale = len(mb) / n_rows
                elif loss_type == "bnpo":
                    scale = mb_tokens / max(n_tokens, 1.0) * world
                else:  # sum / num_items, num_items global
                    scale = float(world)
                loss = loss * scale
                if not torch.isfinite(loss):
                    bad_loss = f"the loss is {float(loss)}"
                    if world == 1:
                        self.optimizer.zero_grad(set_to_none=True)
                        return {"loss": float(loss)}, bad_loss
                    # Other processes wait for this one's gradients: backward anyway; the NaN reaches every
                    # process's loss sum and gradient norm, and every process drops the update.
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total_loss += float(loss.detach()) / world
            if not mb:
                continue
            w = max(mb_tokens, 1e-9)
            weight_sum += w
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm is not None else math.inf)
        grad_norm = full_tensor(grad_norm)  # FSDP2: a replicated DTensor
        if world > 1:
            total_loss = all_sum(total_loss, self.device)
        if bad_loss is None and not math.isfinite(total_loss):  # every process decides on the same sum
            bad_loss = f"the loss is {total_loss} (summed over every process)"
        out = {"loss": total_loss, "grad_norm": float(grad_norm), **{k: v / weight_sum for k, v in sums.items()}}
        if bad_loss is not None or not torch.isfinite(grad_norm):
            if self.scaler is not None:  # no step; an fp16 overflow (inf gradients) lowers the scale
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return out, bad_loss or f"the gradient norm is {float(grad_norm)}"
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return out, None

    # ------------------------------------------------------------------------------------------ a step

    def step(self, step: int) -> dict[str, float]:
        """Run training step `step` (>= 1) and return its metrics (see the module docstring)."""
        cfg = self.cfg
        records = prompt_batch(self.records, step, cfg.prompts.per_step, cfg.run.seed)[self.rank::self.world_size]
        # The samples of a step are a pure function of (seed, step, rank): a resumed run draws what the killed one
        # drew, and every process draws its own.
        torch.manual_seed(step_seed(cfg.run.seed, step, self.rank))
        t0 = time.perf_counter()
        try:
            rollout = self.rollout(records)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemoryAdvice(oom_advice(cfg, "generation", len(records) * cfg.sampling.group_size)) \
                    from exc
            raise
        t_gen = time.perf_counter() - t0
        self.last_rollout = rollout
        comp_ids = [row[:int(m.sum())] for row, m in zip(rollout.completion_ids.tolist(), rollout.completion_mask)]
        total, per = score(self.terms, rollout.texts, rollout.prompts, rollout.answers, comp_ids)
        self.last_rewards = total
        t1 = time.perf_counter()
        metrics: dict[str, float] = {"reward_mean": float(total.mean()), "reward_std": float(total.std())
                                     if total.numel() > 1 else 0.0}
        for name, values in per.items():
            metrics[f"reward/{name}"] = float(values.mean())
        lengths = rollout.completion_mask.sum(1).float()
        metrics["completion_length"] = float(lengths.mean())
        metrics["truncated_frac"] = float(rollout.truncated.float().mean())
        try:
            reason = self._train_on(rollout, total, per, metrics)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemoryAdvice(oom_advice(cfg, "training", rollout.num_rows)) from exc
            raise
        metrics["skipped"] = 1.0 if reason else 0.0
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/generate"] = t_gen
        metrics["time/train"] = time.perf_counter() - t1
        if reason:
            self.consecutive_skips += 1
            self.skipped_total += 1
            log.warning("fusedrl: step %d skipped: %s (nothing applied; %d in a row)", step, reason,
                        self.consecutive_skips)
            if self.consecutive_skips >= cfg.grpo.max_consecutive_skips:
                raise TooManySkips(f"{self.consecutive_skips} steps in a row were skipped (last: {reason}); "
                                   "lower optim.lr, check the reward function, or raise grpo.max_consecutive_skips")
        else:
            self.consecutive_skips = 0
        if self.world_size > 1:  # per-process values -> the mean over processes (equal rows on each)
            global_keys = {"loss", "grad_norm", "lr", "skipped", "skipped_updates", "reward_std"}
            all_mean(metrics, sorted(k for k in metrics if k not in global_keys), self.device)
        first = [k for k in ("reward_mean", "loss", "kl", "completion_length") if k in metrics]  # the progress bar's
        return {**{k: metrics[k] for k in first}, **{k: v for k, v in metrics.items() if k not in first}}

    def _train_on(self, rollout: Rollout, total: torch.Tensor, per: dict[str, torch.Tensor],
                  metrics: dict[str, float]) -> str | None:
        """Advantages, reference log-probs and the updates of one step; returns why it was skipped, or None."""
        cfg, g = self.cfg, self.cfg.grpo
        device = self.device
        world = self.world_size
        everyone = all_gather(total, device) if world > 1 else total  # the rewards of every process, rank order
        if not torch.isfinite(everyone).all():
            bad = [name for name, v in per.items() if not torch.isfinite(v).all()]
            where = ", ".join(bad) if bad else ("another process's rewards" if world > 1 else "the weighted sum")
            return f"non-finite rewards from {where}"
        batch = SeqBatch(rollout.prompt_ids.to(device), rollout.prompt_mask.to(device),
                         rollout.completion_ids.to(device), rollout.completion_mask.to(device))
        mask = batch.completion_mask
        if g.mask_truncated_completions:
            mask = mask * (~rollout.truncated.to(device))[:, None].long()
        n = total.numel()  # groups never straddle processes; "batch" std is over every process's rewards
        advantages = group_advantages(everyone, cfg.sampling.group_size,
                                      std=None if g.scale_rewards == "none" else g.scale_rewards,
                                      clip=g.adv_clip)[self.rank * n:(self.rank + 1) * n].to(device)
        metrics["reward_std"] = float(everyone.std()) if everyone.numel() > 1 else 0.0
        old_logp = None
        if g.num_iterations > 1 or g.mini_batches > 1:
            old_logp = rollout.old_logp.to(device)
            if cfg.sampling.old_logprobs == "recompute":
                old_logp = self.logprobs(batch)
            if any_process(not torch.isfinite(old_logp[mask.bool()]).all(), device):
                return "non-finite sampling log-probs"
        # else one update per batch: it is on policy, the ratio 1 as in TRL (the sampling log-probs, from generate's
        # KV-cache forward in the model's dtype, differ from training's by more than bf16 rounding on a GPU)
        ref_logp = None
        if g.beta != 0:
            ref_logp = self.logprobs(batch, reference=True)
            if any_process(not torch.isfinite(ref_logp[mask.bool()]).all(), device):
                return "non-finite reference log-probs"
        self.policy.model.train()
        reasons = []
        sums: dict[str, list[float]] = {}
        chunks = torch.tensor_split(torch.arange(n), g.mini_batches)  # exactly mini_batches, sizes within 1
        for _ in range(g.num_iterations):
            for chunk in chunks:
                out, reason = self.update(batch, chunk.tolist(), advantages, old_logp, ref_logp, mask)
                if reason:
                    reasons.append(reason)
                    continue
                for k, v in out.items():
                    sums.setdefault(k, []).append(v)
        for k, v in sums.items():  # means over the applied updates
            metrics[k] = sum(v) / len(v)
        metrics["skipped_updates"] = float(len(reasons))
        if len(reasons) == g.num_iterations * len(chunks):
            return reasons[0]
        if reasons:
            log.warning("fusedrl: %d of this step's updates dropped: %s", len(reasons), reasons[0])
        return None
