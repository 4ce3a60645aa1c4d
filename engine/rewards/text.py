"""Text rewards for LLM GRPO: verifiable answers, format rules, and sequence-classification reward models.

- `numeric_answer`: 1.0 when the completion's final number equals the reference (math.isclose), else 0.0.
  The final answer is looked for, in order, in the last `\\boxed{...}` (or `\\fbox{...}`), after the last
  "####" (GSM8K, to the end of that line), after the last "answer is" / "answer is:" / "answer:"
  (case-insensitive, to the end of that line); when none is present, the last number of the whole completion
  is used (`fallback_last_number=True`). From that span the last number (after "answer is": the first one of its
  first sentence, e.g. "the answer is 7 because 3 + 4 = 7", or a worked equation's right-hand side, "the answer
  is 2^{10} = 1024") is parsed tolerantly: thousands separators ("1,234"), "$" and "%"
  signs, a trailing ".", decimals ("42.0"), exponents ("1e3"), fractions ("3/4", "\\frac{3}{4}",
  "\\dfrac{3}{4}"), a sign ("-7"). References are
  parsed the same way (a GSM8K answer string "...#### 42" works); a reference without a number raises.
  Completions without a number score `invalid_reward` (default 0.0).
- `exact_match`: 1.0 when the normalized final answer equals the normalized reference: the extracted answer
  span (as above; else the whole text), stripped of surrounding "$", whitespace runs collapsed, a trailing
  "." dropped, lowercased (`lowercase=True`).
- `regex_format`: 1.0 when the completion matches a pattern (re.fullmatch / match / search, re.DOTALL);
  the default pattern is the R1 think/answer format.
- `sequence_classification`: an `AutoModelForSequenceClassification` reward model; the scored text is
  prompt + completion (as TRL's GRPOTrainer builds it for non-conversational prompts) or the completion
  alone; tokenized in micro-batches sorted by length (padding), score = logits[:, label] (or the single
  regression output).
"""

from __future__ import annotations

import math
import re

import torch

from .base import TextReward, autocast_dtype_of
from .loading import from_pretrained, load_tokenizer, resolve_device
from .registry import register_reward

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
_FRAC_TEX = re.compile(r"(-)?\\[dt]?frac\s*\{\s*(" + _NUM + r")\s*\}\s*\{\s*(" + _NUM + r")\s*\}")
# a fraction "3/4" (also ending a sentence, "3/4."), not a piece of a date or path ("1/2/2024") or a decimal
_FRAC = re.compile(r"(?<![\w./])(" + _NUM + r")\s*/\s*(" + _NUM + r")(?!\w|\.\d|\s*/)")
_NUMBER = re.compile(_NUM)
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)[ \t]*(.*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?!\d)|[;\n]")  # a "." that is no decimal point, ";", a line break
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")  # a word of the text, not a LaTeX command ("\\cdot")

R1_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def _last_braced(text: str, command: str) -> str | None:
    """The content of the last `\\command{...}` in text (balanced braces), or None."""
    start = text.rfind("\\" + command)
    while start != -1:
        i = start + len(command) + 1
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
                j += 1
        start = text.rfind("\\" + command, 0, start)
    return None


def _answer_span(text: str) -> tuple[str | None, str]:
    """(span, kind): the span that states the final answer and where it came from ("boxed", "hashes", "says"),
    or (None, "")."""
    for command in ("boxed", "fbox"):
        boxed = _last_braced(text, command)
        if boxed is not None:
            return boxed, "boxed"
    if "####" in text:
        rest = text.rsplit("####", 1)[1].strip()
        return (rest.splitlines()[0] if rest else ""), "hashes"
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        return matches[-1].group(1).strip(), "says"
    return None, ""


def extract_final_answer(text: str) -> str | None:
    """The span that states the final answer (module docstring), or None when the text marks none."""
    return _answer_span(text)[0]


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def parse_number(text: str, which: str = "last") -> float | None:
    """The last (or first) number in text, a fraction counting as one number with its value; None if none."""
    text = text.replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    found: list[tuple[int, int, float]] = []  # (start, end, value)
    for m in _FRAC_TEX.finditer(text):
        den = _to_float(m.group(3))
        if den != 0:
            found.append((m.start(), m.end(), (-1 if m.group(1) else 1) * _to_float(m.group(2)) / den))
    for m in _FRAC.finditer(text):
        den = _to_float(m.group(2))
        if den != 0:
            found.append((m.start(), m.end(), _to_float(m.group(1)) / den))
    fractions = list(found)
    for m in _NUMBER.finditer(text):
        if not any(s <= m.start() < e for s, e, _ in fractions):  # digits inside a fraction are not numbers
            found.append((m.start(), m.end(), _to_float(m.group(0))))
    found = [f for f in found if math.isfinite(f[2])]
    if not found:
        return None
    return (max(found, key=lambda f: f[1]) if which == "last" else min(found, key=lambda f: f[0]))[2]


def _stated_value(span: str) -> str:
    """The part of an "answer is ..." span that holds the value: its first sentence (the whole span when that has
    no number: "approx. 5"), and of a worked equation in it ("2^{10} = 1024", "x = 5") the right-hand side; an
    answer stated first ("1024 = 2^{10}") or explained ("7 because 3 + 4 = 7") keeps its first number."""
    sentence = _SENTENCE_END.split(span, 1)[0]
    if parse_number(sentence) is None:
        return span
    if "=" in sentence:
        lhs = sentence.split("=", 1)[0]
        stated_first = _NUMBER.fullmatch(lhs.strip(" \t$")) is not None
        if not stated_first and not _WORD.search(lhs):
            return sentence.rsplit("=", 1)[1]
    return sentence


def final_number(text: str, fallback_last_number: bool = True) -> float | None:
    """The number of the final answer of `text` (module docstring), or None."""
    span, kind = _answer_span(text)
    if span is not None:
        value = parse_number(_stated_value(span) if kind == "says" else span, "first" if kind == "says" else "last")
        if value is not None or not fallback_last_number:
            return value
    return parse_number(text) if fallback_last_number else None


_TEX_TEXT = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}")
_CHOICE = re.compile(r"\(([A-Za-z0-9])\)")  # a multiple-choice answer written "(B)"


def normalize_answer(text: str, lowercase: bool = True) -> str:
    """The final answer as a string to compare: LaTeX text wrappers dropped (\\text{Paris} -> Paris), whitespace
    collapsed, "$" stripped, a trailing "." dropped, a choice "(B)" read as B (and lowercased)."""
    span = extract_final_answer(text)
    s = span if span is not None else text
    while True:
        unwrapped = _TEX_TEXT.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = " ".join(s.split()).strip("$ ").rstrip(".").strip()
    choice = _CHOICE.fullmatch(s)
    if choice:
        s = choice.group(1)
    return s.lower() if lowercase else s


class NumericAnswerReward(TextReward):
    """correct_reward when the final number equals the reference within (rel_tol, abs_tol), wrong_reward when it
    differs, invalid_reward when the completion has no number."""

    needs_answers = True

    def __init__(self, *, rel_tol: float = 1e-6, abs_tol: float = 1e-8, correct_reward: float = 1.0,
                 wrong_reward: float = 0.0, invalid_reward: float = 0.0, fallback_last_number: bool = True) -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError(f"rel_tol and abs_tol must be >= 0; got {rel_tol}, {abs_tol}")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.correct_reward, self.wrong_reward, self.invalid_reward = correct_reward, wrong_reward, invalid_reward
        self.fallback_last_number = fallback_last_number

    @staticmethod
    def _parse_reference(answer) -> tuple[float | None, Exception | None]:
        """(the reference's number, None), or (None, the TypeError / ValueError that says why there is none)."""
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            return None, TypeError(f"must be a str or a number; got {type(answer).__name__}")
        value = float(answer) if not isinstance(answer, str) else final_number(answer)
        if value is None or not math.isfinite(value):
            return None, ValueError(f"has no finite number: {answer!r}")
        return value, None

    def reference_error(self, answer) -> str | None:
        """Why `answer` cannot be a reference (None when it can): trainers check their data with it up front."""
        problem = self._parse_reference(answer)[1]
        return None if problem is None else str(problem)

    def _reference(self, answer, index: int) -> float:
        value, problem = self._parse_reference(answer)
        if problem is not None:
            raise type(problem)(f"answers[{index}] {problem}")
        return value

    def _score_texts(self, completions, prompts, answers) -> torch.Tensor:
        out = []
        for i, (text, answer) in enumerate(zip(completions, answers)):
            ref = self._reference(answer, i)
            pred = final_number(text, self.fallback_last_number)
            if pred is None:
                out.append(self.invalid_reward)
            else:
                ok = math.isclose(pred, ref, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
                out.append(self.correct_reward if ok else self.wrong_reward)
        return torch.tensor(out, dtype=torch.float32, device=self.device)


class ExactMatchReward(TextReward):
    """correct_reward when normalize_answer(completion) == normalize_answer(reference), else wrong_reward."""

    needs_answers = True

    def __init__(self, *, lowercase: bool = True, correct_reward: float = 1.0, wrong_reward: float = 0.0) -> None:
        self.lowercase, self.correct_reward, self.wrong_reward = lowercase, correct_reward, wrong_reward

    def _score_texts(self, completions, prompts, answers) -> torch.Tensor:
        out = [self.correct_reward if normalize_answer(c, self.lowercase) == normalize_answer(str(a), self.lowercase)
               else self.wrong_reward for c, a in zip(completions, answers)]
        return torch.tensor(out, dtype=torch.float32, device=self.device)


class RegexFormatReward(TextReward):
    """match_reward when the completion matches `pattern` (with `how` = fullmatch | match | search), else
    miss_reward."""

    def __init__(self, pattern: str | re.Pattern = R1_FORMAT, *, how: str = "fullmatch", flags: int = re.DOTALL,
                 match_reward: float = 1.0, miss_reward: float = 0.0) -> None:
        if how not in ("fullmatch", "match", "search"):
            raise ValueError(f"how must be 'fullmatch', 'match' or 'search'; got {how!r}")
        try:
            self.pattern = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        self.how, self.match_reward, self.miss_reward = how, match_reward, miss_reward

    def _score_texts(self, completions, prompts, answers) -> torch.Tensor:
        test = getattr(self.pattern, self.how)
        out = [self.match_reward if test(c) else self.miss_reward for c in completions]
        return torch.tensor(out, dtype=torch.float32, device=self.device)


class SequenceClassifierReward(TextReward):
    """A reward model: logits[:, label] of AutoModelForSequenceClassification on prompt + completion.

    Args:
        model: the sequence-classification model (eval, frozen).
        tokenizer: its tokenizer; without a pad token, the EOS token pads (and the model's pad_token_id is set
            to it, so decoder models pool their last real token).
        label: the output to score: an index or a label name (config.label2id); required when the model has
            several outputs, None or 0 for a regression model (num_labels == 1).
        max_length: truncate longer texts to this many tokens (None: the tokenizer's model_max_length when it is
            a real limit, else no truncation).
        max_batch_size: texts per forward; texts are sorted by length first, so each micro-batch pads little.
        autocast_dtype: torch.bfloat16 / torch.float16 (or "bf16" / "fp16") to run under autocast.
    """

    def __init__(self, model, tokenizer, *, label: int | str | None = None, max_length: int | None = None,
                 max_batch_size: int = 32, autocast_dtype: torch.dtype | str | None = None) -> None:
        num_labels = model.config.num_labels
        if isinstance(label, str):
            label2id = {str(v): int(k) for k, v in (model.config.id2label or {}).items()}
            label2id.update({str(k): int(v) for k, v in (model.config.label2id or {}).items()})
            if label not in label2id:
                raise ValueError(f"label {label!r} is not one of the model's labels {sorted(label2id)}")
            label = int(label2id[label])
        if label is None:
            if num_labels != 1:
                raise ValueError(f"the model has {num_labels} outputs; pass label=<index or name> to choose one "
                                 f"(labels: {model.config.id2label})")
            label = 0
        if not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label must be in [0, {num_labels}); got {label!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1; got {max_batch_size!r}")
        autocast_dtype = autocast_dtype_of(autocast_dtype)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if max_length is None and tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
            max_length = tokenizer.model_max_length
        self.model, self.tokenizer, self.label = model, tokenizer, label
        self.max_length, self.max_batch_size, self.autocast_dtype = max_length, max_batch_size, autocast_dtype
        self.device = next(model.parameters()).device

    def _score_texts(self, completions, prompts, answers) -> torch.Tensor:
        texts = completions if prompts is None else [p + c for p, c in zip(prompts, completions)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = torch.empty(len(texts), dtype=torch.float32, device=self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else torch.autocast(self.device.type, enabled=False))
        with torch.inference_mode(), ctx:
            for start in range(0, len(order), self.max_batch_size):
                idx = order[start:start + self.max_batch_size]
                tok = self.tokenizer([texts[i] for i in idx], padding=True, truncation=self.max_length is not None,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**tok).logits
                scores[torch.tensor(idx, device=self.device)] = logits[:, self.label].float()
        return scores.clone()


def _no_path(name: str, path: str | None) -> None:
    if path is not None:
        raise ValueError(f"the {name} reward has no weights; path must be None, got {path!r}")


@register_reward("numeric_answer")
def numeric_answer(path: str | None = None, **kw) -> NumericAnswerReward:
    """Final-number correctness (NumericAnswerReward's options: rel_tol, abs_tol, *_reward, fallback_last_number)."""
    _no_path("numeric_answer", path)
    return NumericAnswerReward(**kw)


@register_reward("exact_match")
def exact_match(path: str | None = None, **kw) -> ExactMatchReward:
    """Normalized exact match of the final answer (options: lowercase, correct_reward, wrong_reward)."""
    _no_path("exact_match", path)
    return ExactMatchReward(**kw)


@register_reward("regex_format")
def regex_format(path: str | None = None, *, pattern: str | re.Pattern = R1_FORMAT, **kw) -> RegexFormatReward:
    """Format check by regular expression (default: the R1 <think>...</think><answer>...</answer> format)."""
    _no_path("regex_format", path)
    return RegexFormatReward(pattern, **kw)


@register_reward("sequence_classification")
def sequence_classification(path: str | None = None, *, label: int | str | None = None,
                            tokenizer: str | None = None, device=None, dtype: torch.dtype = torch.float32,
                            max_length: int | None = None, max_batch_size: int = 32,
                            autocast_dtype: torch.dtype | None = None, **model_kw) -> SequenceClassifierReward:
    """A sequence-classification reward model from a directory or hub id (path is required)."""
    from transformers import AutoModelForSequenceClassification

    if path is None:
        raise ValueError("sequence_classification needs path=<directory or hub id of the reward model>")
    model = from_pretrained(AutoModelForSequenceClassification, path, "sequence_classification",
                            "sequence-classification model", dtype=dtype, device=resolve_device(device), **model_kw)
    tok = load_tokenizer(tokenizer or path, "sequence_classification")
    return SequenceClassifierReward(model, tok, label=label, max_length=max_length, max_batch_size=max_batch_size,
                                    autocast_dtype=autocast_dtype)

