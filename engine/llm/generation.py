"""Sampling G completions per prompt with `model.generate` (KV cache, batched, left padding), recording the
log-probability of every sampled token on the way.

The log-probs are those the GRPO ratio needs, log_softmax(logits / T)[token] with the model's logits before
top-k / top-p filtering (TRL's convention), recorded by a logits processor that sees the logits of each step
and, at the next step, the token that was drawn from them: one [rows, V] fp32 buffer, never the [rows, T, V]
scores that `output_scores=True` keeps. With them the first optimisation pass needs no extra forward pass, and
its ratio is 1 up to the difference between KV-cache decoding and a full forward (~1e-7 in fp32).

Stop strings end a completion after the token that completes one (the string stays in the text); the
completion mask covers the tokens up to and including that token, or the first EOS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Rollout", "generate_completions", "tokenize_prompts"]


@dataclass
class Rollout:
    """The completions of one step, rows grouped by prompt (G consecutive rows per prompt).

    prompt_ids [N, P] (left padded), prompt_mask [N, P], completion_ids [N, C] (right padded), completion_mask
    [N, C] (1 on sampled tokens up to and including EOS / the stop), old_logp [N, C] fp32 (0 where masked),
    truncated [N] bool (no EOS or stop within max_completion_length), texts: the decoded completions,
    prompts / answers: per row.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_logp: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    prompts: list[str]
    answers: list = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.prompt_ids.shape[0]

    def lengths(self) -> torch.Tensor:
        """Tokens per row that a forward pass needs: prompt tokens + completion tokens."""
        return self.prompt_mask.sum(1) + self.completion_mask.sum(1)


class _LogprobRecorder:
    """A logits processor that records log_softmax(scores / T)[drawn token] of every step. It must run before
    any processor that changes the logits (generate puts user processors after its own non-warping ones and
    before temperature / top-k / top-p; the trainer turns the non-warping ones off)."""

    def __init__(self, temperature: float, prompt_len: int):
        self.temperature = temperature
        self.prompt_len = prompt_len
        self.prev: torch.Tensor | None = None  # [rows, V] log-probs of the last step
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.out.append(self.prev.gather(1, tokens[:, None].to(self.prev.device))[:, 0])
        self.prev = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, C] log-probs of the generated tokens of `sequences` [rows, P + C]."""
        n_new = sequences.shape[1] - self.prompt_len
        if self.prev is not None and len(self.out) < n_new:
            self._take(sequences[:, -1])
        if not self.out:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.out[:n_new], dim=1)


class _StopStrings:
    """A stopping criterion that ends a row when its decoded completion ends with a stop string (checked on the
    last few tokens after every new token, so the first token that completes one is found), and records per row
    how many tokens had been generated then. transformers' StopStringCriteria is not used: it needs the
    tokenizer to round-trip a fixed probe text ("abcdef"), which small or character-level vocabularies fail."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int, rows: int, device):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.tail = max(len(s) for s in self.stop) + 2  # tokens decoded per check: each gives >= 1 character
        # a stop string holding a special token ("<|im_end|>" on a model whose EOS is another token) is only seen
        # in a decode that keeps special tokens
        specials = set(getattr(tokenizer, "all_special_tokens", None) or ())
        specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                     if getattr(t, "special", False)}
        self.skip_special = not any(sp and sp in s for s in self.stop for sp in specials)
        self.prompt_len = prompt_len
        self.stopped_at = torch.full((rows,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        done = self.stopped_at > 0
        if n_new > 0:
            todo = (~done).nonzero()[:, 0].tolist()
            if todo:
                start = max(self.prompt_len, input_ids.shape[1] - self.tail)
                tails = self.tokenizer.batch_decode(input_ids[todo, start:].tolist(),
                                                    skip_special_tokens=self.skip_special)
                for row, text in zip(todo, tails):
                    if any(s in text for s in self.stop):
                        self.stopped_at[row] = n_new
                        done[row] = True
        return done


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (no padding; the last `max_prompt_length` tokens when given)."""
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    return ids


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _generation_config(model, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int, pad_id: int,
                       eos_ids: list[int]):
    from transformers import GenerationConfig

    # Built fresh, not from model.generation_config: a checkpoint's repetition penalty or default top_k would
    # change the sampling distribution away from the one the loss's log-probs describe (and `generate` runs under
    # `_neutral_model_generation_configs`, since transformers fills this config's unset fields from the model's).
    return GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, pad_token_id=pad_id, eos_token_id=eos_ids or None, use_cache=True,
                            repetition_penalty=1.0, num_beams=1, renormalize_logits=False)


@contextlib.contextmanager
def _neutral_model_generation_configs(model) -> Iterator[None]:
    """Inside, every `generation_config` in `model` (the causal LM's, also inside a peft or FSDP wrapper) is a
    default one keeping only the token ids. transformers' `generate` fills each field the passed config leaves
    unset from the model's own: a checkpoint's generation_config.json with no_repeat_ngram_size, min_new_tokens,
    suppress_tokens, min_p or bad_words_ids would add logits processors, so the completions would no longer be
    samples of the distribution whose log-probs the loss uses (and banning every token gives NaN log-probs)."""
    from transformers import GenerationConfig

    swapped = []
    for module in model.modules():
        config = module.__dict__.get("generation_config")
        if isinstance(config, GenerationConfig):
            ids = {key: getattr(config, key, None) for key in TOKEN_ID_FIELDS}
            swapped.append((module, config))
            module.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        for module, config in swapped:
            module.generation_config = config


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    batch_size: int | None = None,
    max_prompt_length: int | None = None,
    answers: Sequence | None = None,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample `group_size` completions of each prompt (rows i*G .. i*G+G-1 belong to prompts[i]).

    Args:
        model: a transformers causal LM (or a peft model around one), in the mode it should sample in.
        tokenizer: its tokenizer (padding is done here, on the left).
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k=0: off).
        stop: stop strings.
        batch_size: rows per generate call (None: all at once).
        max_prompt_length: keep only the last N prompt tokens.
        answers: per-prompt reference answers, repeated per row into the rollout.
        synced_gpus: keep running forward passes until every process has finished (FSDP2: each layer's
            all-gather is a collective, so all processes must run the same number of decoding steps).

    Returns:
        a `Rollout` with the sampled log-probs (fp32) of every completion token.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    eos_ids = _eos_ids(model, tokenizer)
    row_prompts = [p for p in prompts for _ in range(group_size)]
    row_answers = [a for a in (answers if answers is not None else [None] * len(prompts)) for _ in range(group_size)]
    token_rows = tokenize_prompts(tokenizer, row_prompts, max_prompt_length)
    gen_cfg = _generation_config(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, pad_id=pad_id, eos_ids=eos_ids)
    step = batch_size or len(token_rows)
    parts = []
    with _neutral_model_generation_configs(model):
        for start in range(0, len(token_rows), step):
            chunk = token_rows[start:start + step]
            ids, mask = left_pad(chunk, pad_id, device)
            recorder = _LogprobRecorder(temperature, ids.shape[1])
            criteria = StoppingCriteriaList()
            stopper = None
            if stop:
                stopper = _StopStrings(tokenizer, stop, ids.shape[1], len(chunk), device)
                criteria.append(stopper)
            seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=LogitsProcessorList([recorder]), stopping_criteria=criteria,
                                 synced_gpus=synced_gpus)
            completion = seq[:, ids.shape[1]:]
            logp = recorder.finish(seq)
            c_mask, truncated = _completion_mask(completion, eos_ids, stopper)
            parts.append((ids, mask, completion, c_mask, logp, truncated))
    return _assemble(parts, tokenizer, pad_id, row_prompts, row_answers, stop)


def _completion_mask(completion: torch.Tensor, eos_ids: list[int], stopper) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [rows, C], truncated [rows]): tokens up to and including the first EOS or the stop, and which rows
    neither ended nor stopped (they ran to max_new_tokens)."""
    rows, width = completion.shape
    length = torch.full((rows,), width, dtype=torch.long, device=completion.device)
    ended = torch.zeros(rows, dtype=torch.bool, device=completion.device)
    if eos_ids and width:
        is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
        ended = is_eos.any(1)
        length = torch.where(ended, is_eos.long().argmax(1) + 1, length)
    if stopper is not None:
        hit = stopper.stopped_at > 0
        length = torch.where(hit, torch.minimum(length, stopper.stopped_at), length)
        ended = ended | hit
    mask = (torch.arange(width, device=completion.device)[None, :] < length[:, None]).long()
    return mask, ~ended


def _assemble(parts, tokenizer, pad_id, row_prompts, row_answers, stop) -> Rollout:
    p_width = max(p[0].shape[1] for p in parts)
    c_width = max(p[2].shape[1] for p in parts)
    prompt_ids, prompt_mask, comp_ids, comp_mask, logps, truncs = [], [], [], [], [], []
    for ids, mask, comp, c_mask, logp, trunc in parts:
        lp, rc = p_width - ids.shape[1], c_width - comp.shape[1]
        prompt_ids.append(torch.nn.functional.pad(ids, (lp, 0), value=pad_id))
        prompt_mask.append(torch.nn.functional.pad(mask, (lp, 0), value=0))
        comp_ids.append(torch.nn.functional.pad(comp, (0, rc), value=pad_id))
        comp_mask.append(torch.nn.functional.pad(c_mask, (0, rc), value=0))
        logps.append(torch.nn.functional.pad(logp, (0, rc), value=0.0))
        truncs.append(trunc)
    c_ids, c_mask = torch.cat(comp_ids), torch.cat(comp_mask)
    old_logp = torch.where(c_mask.bool(), torch.cat(logps), 0.0)  # 0 where masked, also after a NaN there
    texts = []
    for row, m in zip(c_ids.tolist(), c_mask.tolist()):
        text = tokenizer.decode([t for t, keep in zip(row, m) if keep], skip_special_tokens=True)
        cut = [text.find(s) + len(s) for s in stop if s in text]
        texts.append(text[:min(cut)] if cut else text)
    return Rollout(torch.cat(prompt_ids), torch.cat(prompt_mask), c_ids, c_mask, old_logp, torch.cat(truncs),
                   texts, list(row_prompts), list(row_answers))
