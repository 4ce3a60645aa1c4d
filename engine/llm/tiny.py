"""The embedded default of `fusedrl train llm-grpo`: a tiny causal LM built from a config (random weights), a
character-level tokenizer, and a toy verifiable task that such a model learns in a few CPU minutes.

The task, a tiny arithmetic: prompts "a+b=" for a, b in 0..4; the reward is the reward layer's `numeric_answer`
(1 when the completion's final number is a + b). An untrained model emits each of its 16 tokens about equally
often, so it starts near a reward of 0.1 (a digit, right by chance) and learns the sums by RL alone: with the
defaults (hidden size 128, 2 layers, full fine-tuning at lr 3e-4, 8 prompts x 8 completions per step) the mean
reward passes 0.8 by step ~250 and ends near 0.9-0.99 at step 400 (seeds 0-3; ~15 s of training on 2 idle CPU
cores). Tried and dropped: lr 3e-3 collapses each prompt on one answer (reward stuck at 0.3-0.4); LoRA on the
random model barely moves (random weights give an adapter nothing to adapt), hence full fine-tuning here.

The model and tokenizer are written with `save_pretrained` and loaded back with `from_pretrained`, exactly like
a user's checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import PromptRecord

__all__ = ["CHARS", "build_tiny_model", "build_tiny_tokenizer", "toy_records", "TOY_REWARD"]

CHARS = list("0123456789+= ")
SPECIAL = ["<pad>", "<eos>", "<unk>"]
TOY_REWARD = "numeric_answer"


def toy_records() -> list[PromptRecord]:
    """The embedded task's prompts: "a+b=" -> answer a + b, for a, b in 0..4 (25 prompts)."""
    return [PromptRecord(f"{a}+{b}=", str(a + b)) for a in range(5) for b in range(5)]


def build_tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (one token per character of CHARS; <pad>, <eos>, <unk>)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def tiny_config(arch: str = "qwen2", hidden_size: int = 128, layers: int = 2, vocab_size: int | None = None,
                max_positions: int = 64):
    """A transformers config of a tiny Qwen2-, Llama- or GPT-2-shaped causal LM (4 heads, 2 KV heads where the
    architecture has grouped-query attention), with the ids of the tiny tokenizer."""
    import transformers

    vocab_size = vocab_size or len(SPECIAL) + len(CHARS)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size,
                                        intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                        intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=4,
                                       n_positions=max_positions, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                       **ids)
    raise ValueError(f"arch must be 'qwen2', 'llama' or 'gpt2'; got {arch!r}")


def build_tiny_model(path: str | os.PathLike, *, arch: str = "qwen2", hidden_size: int = 128, layers: int = 2,
                     seed: int = 0) -> Path:
    """Write a tiny causal LM (random weights drawn from `seed`) and its tokenizer to `path` with
    `save_pretrained`, atomically (built in a temporary folder, then renamed). Returns the folder."""
    import torch
    import transformers

    from ..runs.atomic import atomic_write_dir

    config = tiny_config(arch, hidden_size, layers)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)  # building the model must not shift the run's random streams
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        build_tiny_tokenizer().save_pretrained(tmp)

    return atomic_write_dir(path, write)
