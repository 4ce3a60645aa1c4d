"""`fusedrl train llm-grpo`: GRPO for Hugging Face causal LMs on fusedrl's fused linear GRPO loss.

    fusedrl train llm-grpo                                        # the embedded default: a tiny model, a toy task
    fusedrl train llm-grpo --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --prompts.train gsm8k.jsonl \\
        --reward.names numeric_answer --sampling.max_completion_length 512 --memory.token_budget 16384

The run folder holds what every fusedrl trainer writes (config.yaml, train.log, metrics.csv, metrics.png,
tensorboard/, checkpoints/ with the trainable tensors, the optimizer and the RNG states, written atomically), and
here also: base_model/ (the embedded default's model and tokenizer, built once and loaded with from_pretrained),
checkpoints/step-*/lora/ (the adapter in peft's format; loads with PeftModel.from_pretrained), final/ (the
adapter, or the full model, with the tokenizer, after the last step), and samples/step-*.jsonl (each evaluation's
prompt, completion, answer and rewards: run.eval_every, prompts.eval; its means are the eval/* metrics).
`--resume` continues from the newest checkpoint and reproduces the uninterrupted run exactly (the same prompts,
samples and updates).

Several GPUs: `torchrun --nproc-per-node N -m fusedrl train llm-grpo ...` (or the `fusedrl` script under torchrun).
LoRA trains with DistributedDataParallel, full fine-tuning with FSDP2 (`fully_shard` per decoder layer; the
reference copy sharded too; rank 0 alone reads the weights and every process gets its shards of them);
prompts.per_step must be a multiple of N. Rank 0 writes the run folder; checkpoints
hold whole (gathered) tensors and optimizer state; resume with the same number of processes (the samples of a
step depend on the rank).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, config_errors, model_loading_errors
from ..runs.trainer import Trainer
from .config import LLMGRPOConfig

log = logging.getLogger("fusedrl")

__all__ = ["TRAINER", "build", "check_context", "train"]

BASE_MODEL_DIR = "base_model"
FINAL_DIR = "final"


def _device(name: str):
    from ..distributed import local_device

    try:
        return local_device(name)
    except ValueError as exc:
        raise ConfigError([("model.device", str(exc).split(": ", 1)[1])]) from None


def _dtype(name: str, device, lora: bool):
    """The weights' dtype: "auto" is bf16 for LoRA on CUDA, fp32 on the CPU and for full fine-tuning (bf16 weights
    do not hold AdamW's small steps; the config refuses bf16 / fp16 for it)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and lora else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_context(cfg: LLMGRPOConfig, prompt_lengths: list[int], context: int | None, model_name: str,
                  eval_lengths: Sequence[int] = ()) -> None:
    """Refuse (ConfigError naming the fields) when the longest prompt (training, or `eval_lengths`' evaluation
    prompts) plus max_completion_length does not fit the model's context."""
    if context is None or not (prompt_lengths or eval_lengths):
        return
    c = cfg.sampling.max_completion_length
    longest = max([*prompt_lengths, *eval_lengths])
    in_eval = max(eval_lengths, default=-1) > max(prompt_lengths, default=-1)
    if c >= context:
        raise ConfigError([("sampling.max_completion_length", f"{c} tokens do not fit the context of {model_name} "
                            f"({context} tokens) with any prompt; lower it below {context}")])
    if longest + c > context:
        where = ("prompts.max_prompt_length" if cfg.prompts.max_prompt_length is not None else
                 "prompts.eval" if in_eval else "prompts.train")
        which = "evaluation prompt" if in_eval else "prompt"
        raise ConfigError([(where, f"the longest {which} has {longest} tokens, which with "
                            f"sampling.max_completion_length = {c} makes {longest + c} > the context of "
                            f"{model_name} ({context} tokens); lower sampling.max_completion_length or set "
                            f"prompts.max_prompt_length <= {context - c} (keeps the last tokens of each prompt)")])


def _model_source(cfg: LLMGRPOConfig, out_dir: Path | None) -> tuple[str, bool]:
    """(path or hub id of the model, whether it is the embedded default); builds the embedded default once."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path, False
    from .tiny import build_tiny_model

    m = cfg.model
    if out_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="fusedrl-tiny-")) / BASE_MODEL_DIR
    else:
        folder = out_dir / BASE_MODEL_DIR
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, arch=m.tiny_arch, hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
                         seed=cfg.run.seed)
    return str(folder), True


def build(cfg: LLMGRPOConfig, out_dir: str | os.PathLike | None = None) -> Any:
    """Load everything a run needs, checking what can be checked before the weights load: returns the
    `LLMGRPOTrainer` (policy, rewards, prompts, optimizer). `out_dir` holds the embedded default's base_model/."""
    import torch
    import transformers

    from .data import load_prompt_records
    from .generation import tokenize_prompts
    from .policy import LoraSpec, Policy, context_length, decoder_of, load_tokenizer
    from .rewards import build_reward_terms, check_answers
    from .tiny import TOY_REWARD, toy_records
    from .trainer import LLMGRPOTrainer

    m = cfg.model
    device = _device(m.device)
    source, embedded = _model_source(cfg, Path(out_dir) if out_dir is not None else None)
    # Prompts, rewards, tokenizer and model config first: every mistake found here costs no weight loading.
    if cfg.prompts.train is None:
        records = toy_records()
    else:
        with config_errors("prompts.train"):
            records = load_prompt_records(cfg.prompts.train, prompt_field=cfg.prompts.prompt_field,
                                          answer_field=cfg.prompts.answer_field, split=cfg.prompts.split,
                                          seed=cfg.run.seed, limit=cfg.prompts.limit)
    eval_records = records[:cfg.prompts.num_eval]
    if cfg.prompts.eval is not None:
        with config_errors("prompts.eval"):
            eval_records = load_prompt_records(cfg.prompts.eval, prompt_field=cfg.prompts.prompt_field,
                                               answer_field=cfg.prompts.answer_field, split=cfg.prompts.eval_split,
                                               seed=None, limit=cfg.prompts.num_eval)
    names = list(cfg.reward.names)
    if not names and cfg.reward.function is None:
        names = [TOY_REWARD]
    try:
        terms = build_reward_terms(names, cfg.reward.function, cfg.reward.weights, cfg.reward.options,
                                   device=cfg.reward.device or str(device))
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise ConfigError([("reward", str(exc))]) from exc
    for what, field_name, recs in (("training prompts", "prompts.train", records),
                                   ("evaluation prompts", "prompts.eval", eval_records)):
        with config_errors(field_name):
            check_answers(terms, recs, what)
    with model_loading_errors("model.name_or_path"):
        tokenizer = load_tokenizer(source, revision=m.revision, trust_remote_code=m.trust_remote_code)
        model_config = transformers.AutoConfig.from_pretrained(source, revision=m.revision,
                                                               trust_remote_code=m.trust_remote_code)
    lengths, eval_lengths = ([len(t) for t in tokenize_prompts(tokenizer, [r.prompt for r in recs],
                                                               cfg.prompts.max_prompt_length)]
                             for recs in (records, eval_records))
    check_context(cfg, lengths, context_length(model_config), "the embedded model" if embedded else source,
                  eval_lengths)

    lora = None
    if cfg.lora.enabled:
        lora = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=cfg.lora.target_modules)
    dtype = _dtype(m.dtype, device, cfg.lora.enabled)
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # full fine-tuning under torchrun: rank 0 alone reads the weights, onto the CPU (the others build the model with
    # its parameters on the meta device), and FSDP2 gives every process its shards of them; when the model and its
    # reference copy would take more than half the GPU (a 14B fp32 model and its reference: 112 GB) they wait there,
    # so no GPU holds the whole model; else they go to rank 0's GPU now
    sharded = several and lora is None
    load_device = torch.device("cpu") if sharded else device
    with model_loading_errors("model.name_or_path", "lora.target_modules"):
        policy = Policy.from_pretrained(source, lora=lora, device=load_device, dtype=dtype,
                                        reference=cfg.grpo.beta != 0 and not cfg.lora.enabled,
                                        temperature=cfg.sampling.temperature, revision=m.revision,
                                        trust_remote_code=m.trust_remote_code,
                                        attn_implementation=m.attn_implementation, no_dropout=m.disable_dropout,
                                        tokenizer=tokenizer, weights_from_rank0=sharded)
    from ..distributed import too_big_for_one_gpu, weights_on_this_process

    if load_device != device and weights_on_this_process(policy.model):
        models = [policy.model] + ([policy.ref_model] if policy.ref_model is not None else [])
        if not too_big_for_one_gpu(sum(p.numel() * p.element_size() for mod in models for p in mod.parameters()),
                                   device):
            for mod in models:
                mod.to(device)
    if m.patch_attention:
        from fusedrl.attention import patch_attention

        patch_attention(policy.model)
    if m.fused_backbone:
        policy.fuse_backbone()
    if cfg.memory.gradient_checkpointing != "none":
        from transformers.modeling_layers import GradientCheckpointingLayer

        cfg.memory.apply_to(decoder_of(policy.model), "the model", module_types=GradientCheckpointingLayer)
    if several:
        # Before the optimizer exists: FSDP2 replaces the parameters by sharded ones.
        policy.parallelize("ddp" if cfg.lora.enabled else "fsdp", device)
    generator = None
    if cfg.sampling.backend == "vllm":  # experimental: see engine/llm/vllm_generation.py
        from .vllm_generation import VLLMGenerator

        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        generator = VLLMGenerator(str(source), tokenizer, dtype=names[dtype],
                                  gpu_memory=cfg.sampling.vllm_gpu_memory, max_model_len=context_length(model_config),
                                  seed=cfg.run.seed)
    return LLMGRPOTrainer(policy, terms, records, cfg, generator=generator, eval_records=eval_records)


def init_distributed(cfg: LLMGRPOConfig) -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the default process group is started: NCCL on
    CUDA, gloo on the CPU."""
    import torch

    from .. import distributed

    return distributed.init_distributed(torch.cuda.is_available() and cfg.model.device != "cpu")


def _write_final(trainer, out_dir: Path, state_dict=None) -> Path:
    """Save the adapter (or model) and tokenizer to out_dir/final atomically."""
    final = out_dir / FINAL_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{FINAL_DIR}-", dir=out_dir))
    try:
        trainer.policy.save_pretrained(tmp, state_dict=state_dict)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _after_step(step: int, trainer: Any) -> None:
    """Called after each step's update and logging, before its checkpoint (tests simulate a kill here)."""


def _run(cfg: LLMGRPOConfig, run) -> int | None:
    from ..runs import seed_everything
    from ..startup import prepare_kernels

    rank, world = init_distributed(cfg)
    kernels_status = prepare_kernels(_device(cfg.model.device), build=cfg.run.cuda_extension)  # before the probe
    seed_everything(cfg.run.seed)
    if world > 1:  # rank 0 writes the embedded default once; every process loads that folder
        import torch.distributed as dist

        if rank == 0:
            _model_source(cfg, run.out_dir)
        dist.barrier()
    trainer = build(cfg, run.out_dir)
    lora = cfg.lora.enabled
    policy = trainer.policy
    ckpt = run.load_checkpoint()  # after building: the random initialisation must not consume restored streams
    run.check_world_size(samples_follow_rank=True)
    if ckpt is not None:
        policy.load_trainable_state(ckpt.tensors)
        policy.load_optimizer_state(trainer.optimizer, ckpt.objects["optim"])
        trainer.load_state_dict(ckpt.state)
    run.info(f"llm-grpo: {type(policy.model).__name__} on {trainer.device}"
             f"{f' x {world} processes ({policy.strategy})' if world > 1 else ''}, "
             f"{sum(p.numel() for p in trainer.params):,} trainable "
             f"parameters ({'LoRA' if lora else 'full'}), {len(trainer.records)} prompts, {cfg.prompts.per_step} x "
             f"{cfg.sampling.group_size} completions per step, loss {cfg.grpo.loss_type}, lr {trainer.lr:g}")
    if kernels_status is not None:
        run.info(kernels_status)
    if policy.backbone_patch is not None:
        run.info(policy.backbone_patch.summary())

    def evaluate(step: int) -> dict[str, float]:
        metrics, rows = trainer.evaluate()
        if rows:
            path = run.save_text_samples(step, rows)
            run.info(f"step {step} eval: reward {metrics['eval/reward_mean']:.4g} over {len(rows)} prompts"
                     + (f" ({path.relative_to(run.out_dir)})" if path is not None else ""))
        return metrics

    if run.start_step == 0 and cfg.run.eval_every > 0:
        run.log(0, evaluate(0))
    for step in run.steps():
        metrics = trainer.step(step)
        evaluated = run.every(step, cfg.run.eval_every)
        if evaluated:
            metrics.update(evaluate(step))
        if run.every(step, cfg.run.log_every) or evaluated:
            run.log(step, metrics)
        if run.every(step, cfg.run.samples_every) and trainer.last_rollout is not None:
            ro, rw = trainer.last_rollout, trainer.last_rewards
            for i in range(0, min(ro.num_rows, 3 * cfg.sampling.group_size), cfg.sampling.group_size):
                run.info(f"step {step} sample: {ro.prompts[i]!r} -> {ro.texts[i]!r} (reward {float(rw[i]):.3g})")
        _after_step(step, trainer)
        if run.every(step, cfg.run.checkpoint_every) or run.is_last(step):
            # Gathered on every process (collectives under FSDP2); written by rank 0.
            tensors, optim = policy.full_state(), policy.optimizer_state(trainer.optimizer)
            full_last = run.is_last(step) and not lora

            def extra(folder: Path, full_last: bool = full_last, tensors=tensors) -> None:
                if lora:
                    policy.save_pretrained(folder / "lora", tokenizer=False)
                elif full_last:
                    policy.save_pretrained(folder / "model", state_dict=tensors)

            run.save_checkpoint(step, tensors, trainer.state_dict(), {"optim": optim}, write_extra=extra)
    run.info_reward_summary()
    run.info_peak_memory(trainer.device)
    if offloaded := cfg.memory.offload_summary():
        run.info(offloaded)
    state = policy.full_state() if policy.strategy == "fsdp" else None
    if run.is_main:
        final = _write_final(trainer, run.out_dir, state)
        run.info(f"llm-grpo: done; {'adapter' if lora else 'model'} and tokenizer in {final}")
    return None


def train(cfg: LLMGRPOConfig, run) -> int | None:
    """The `fusedrl train llm-grpo` entry point: runs `_run`, turning config problems found after start-up
    (prompt files, rewards, context length) and out-of-memory errors into a message and exit code 2 / 3."""
    import torch

    from .trainer import OutOfMemoryAdvice, TooManySkips

    threads = cfg.model.cpu_threads or (1 if cfg.model.name_or_path is None else None)
    before = torch.get_num_threads()
    if threads is not None:
        # the embedded default on a 2-core CPU: 24 s on one thread, 73 s on torch's default two (its ~128-wide
        # ops are too small to share out: the threads wait on each other)
        torch.set_num_threads(threads)
    try:
        return _run(cfg, run)
    except ConfigError as exc:
        message, code = str(exc), 2
    except (OutOfMemoryAdvice, TooManySkips) as exc:
        message, code = str(exc), 3
    finally:
        torch.set_num_threads(before)
    run.info(f"llm-grpo stopped: {message}")
    print(f"fusedrl train llm-grpo: {message}", file=sys.stderr)
    return code


TRAINER = Trainer(
    "llm-grpo", LLMGRPOConfig, train, "GRPO for Hugging Face causal LMs on the fused loss kernels",
    description="Samples sampling.group_size completions per prompt with model.generate, scores them with the "
    "reward layer (or a Python function), and trains on the fused linear GRPO loss (no [N, V] logits), LoRA or "
    "full fine-tuning. With no options it trains the embedded default: a tiny model learning to add small numbers "
    "on the CPU in a few minutes, the reward rising in metrics.png. Under torchrun the prompts are split over the "
    "processes: DDP for LoRA, FSDP2 for full fine-tuning.")
