"""TRL's GRPOTrainer with fusedrl's fused log-prob and GRPO-loss kernels.

Your TRL training script stays as it is; two lines are added before the trainer is built, one after:

    from fusedrl.integrations.trl import patch_grpo_trainer
    patch_grpo_trainer(loss=True)   # log-probs + entropies (and the loss) through fusedrl.kernels
    trainer = GRPOTrainer(...)
    fusedrl.patch_backbone(trainer.model)   # the model's RMSNorms, SwiGLU MLPs and LoRA linears fused

The first patch replaces the one call inside TRL 1.16's GRPOTrainer that turns hidden states into per-token
log-probs (policy, old policy and reference model), so the [tokens, vocab] logits are never built, and,
with loss=True, the loss (same numbers as TRL's, same logged metrics). `unpatch_grpo_trainer()` undoes it.
The second runs the decoder's own elementwise work on fused kernels (the trainer's model: TRL adds the LoRA
adapter when it builds the trainer; before accelerate wraps it, which happens in train()).

Run it:

    python examples/trl_grpo_fused.py                      # tiny Qwen2 built offline, 2 steps on the CPU
    python examples/trl_grpo_fused.py --model Qwen/Qwen2.5-0.5B-Instruct --bf16 --max-steps 50

The reward is a toy: how often --target occurs in the completion, per word (the tiny model's vocabulary is
the words "w3" .. "w299" and the default target "7" rewards words like w7, w17, w70; with a real model the
default target is "yes").
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import datasets
import torch
import transformers
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import fusedrl
from fusedrl.integrations.trl import patch_grpo_trainer, unpatch_grpo_trainer

TINY_VOCAB = 300
TINY_PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23", "w7"]
REAL_PROMPTS = ["Say something nice about the weather.", "Answer with one word: is water wet?",
                "Write a very short poem about cats.", "Name three colours."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a causal LM path or hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct); default: --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="build a tiny random Qwen2 and a word-level tokenizer offline (the default without --model)")
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (the GRPO group)")
    p.add_argument("--batch-size", type=int, default=4, help="per-device train batch (completions)")
    p.add_argument("--max-completion-length", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model)")
    p.add_argument("--loss-type", default="dapo", help="TRL loss_type: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo")
    p.add_argument("--no-fused-loss", action="store_true",
                   help="patch only the log-probs; keep TRL's own loss code")
    p.add_argument("--no-backbone", action="store_true",
                   help="leave the model's RMSNorms, SwiGLU MLPs and LoRA linears stock (no fusedrl.patch_backbone)")
    p.add_argument("--no-patch", action="store_true", help="run plain TRL (to compare speed and memory)")
    p.add_argument("--target", default=None, help="the rewarded substring (default: '7' for --tiny, else 'yes')")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (on a GPU)")
    p.add_argument("--output-dir", default=None, help="TRL's output_dir (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    if args.target is None:
        args.target = "7" if args.tiny else "yes"
    return args


def build_tiny_model(path: Path) -> Path:
    """A tiny Qwen2 (hidden 32, 2 layers, vocabulary 300) and a word-level tokenizer, saved with
    save_pretrained so that they load with from_pretrained like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def make_reward(target: str):
    """A TRL reward function: occurrences of `target` in the completion, per word (case-insensitive)."""

    def target_reward(completions, **kwargs):
        rewards = []
        for c in completions:
            text = (c if isinstance(c, str) else c[-1]["content"]).lower()  # plain or conversational
            rewards.append(text.count(target.lower()) / max(len(text.split()), 1))
        return rewards

    return target_reward


def load_model_and_tokenizer(args, work: Path):
    """(model, tokenizer, prompts). The tiny model is built in `work`, which must outlive training: with
    beta > 0, GRPOTrainer loads the reference model again from the policy's path."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if not args.tiny:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), tokenizer, REAL_PROMPTS
    path = build_tiny_model(work / "tiny_qwen2")
    # A plain word-level tokenizer (AutoTokenizer would pick Qwen2's tokenizer class from config.json).
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer, TINY_PROMPTS


class PrintMetrics(TrainerCallback):
    """Prints one line per logged training step and keeps the logs in `history`."""

    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.history.append(dict(logs))
            print(f"step {state.global_step:3d}  loss {logs['loss']:+.5f}  reward {logs.get('reward', math.nan):.4f}"
                  f"  kl {logs.get('kl', math.nan):.5f}  entropy {logs.get('entropy', math.nan):.4f}"
                  f"  step_time {logs.get('step_time', math.nan):.3g}s", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.no_patch:
        patch_grpo_trainer(loss=not args.no_fused_loss)  # <- the fusedrl line

    printer = PrintMetrics()
    try:
        with tempfile.TemporaryDirectory(prefix="fusedrl_trl_example_") as tmp:
            model, tokenizer, prompts = load_model_and_tokenizer(args, Path(tmp))
            config = GRPOConfig(
                output_dir=args.output_dir or str(Path(tmp) / "out"), max_steps=args.max_steps,
                learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size,
                num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                beta=args.beta, loss_type=args.loss_type,
                # GRPOConfig's default bf16=True would run TRL's LM head under bf16 autocast, also on the CPU.
                bf16=args.bf16, use_cpu=not torch.cuda.is_available(), seed=args.seed, logging_steps=1,
                report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
            )
            trainer = GRPOTrainer(model=model, reward_funcs=make_reward(args.target), args=config,
                                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts * 2}),
                                  processing_class=tokenizer, callbacks=[printer])
            trainer.remove_callback(PrinterCallback)  # it prints each logged dict in full; PrintMetrics: one line
            if not (args.no_patch or args.no_backbone):
                print(fusedrl.patch_backbone(trainer.model).summary())  # <- the other fusedrl line
            initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            trainer.train()
    finally:
        unpatch_grpo_trainer()  # GRPOTrainer is TRL's own again
    moved = math.sqrt(sum((p.detach().float() - initial[n].float()).square().sum().item()
                          for n, p in trainer.model.named_parameters()))
    print(f"done: {len(printer.history)} steps, parameters moved by {moved:.4g} (L2)")
    return {"history": printer.history, "param_change": moved}


if __name__ == "__main__":
    main()
