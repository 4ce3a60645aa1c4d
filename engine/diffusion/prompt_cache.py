"""`PromptCache`: prompt embeddings kept in host memory up to a byte budget, least recently used evicted.

A run over a large prompt set (Flow-GRPO's PickScore set: 25k prompts) met each prompt again and again; kept
whole, SD3's embeddings (333 x 4096 bf16 each, 2.7 MB) would take 68 GB of host memory per process. Evicting
changes no number: each prompt is encoded alone (`DiffusionPolicy.encode_prompts`), so encoding it again gives
the same embedding.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger("fusedrl")

GB = 1 << 30


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in `value` (a PromptEmbeddings: embeds and pooled)."""
    return sum(t.numel() * t.element_size() for t in (value.embeds, value.pooled) if t is not None)


class PromptCache:
    """{prompt: embeddings} holding at most `max_gb` GiB (0: nothing is kept)."""

    def __init__(self, max_gb: float) -> None:
        if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb >= 0:
            raise ValueError(f"prompt_cache_gb must be a number >= 0, got {max_gb!r}")
        self.max_bytes = int(max_gb * GB)
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._said_full = False

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        """The cached prompts, least recently used first."""
        return iter(list(self._entries))

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def get(self, prompt: str) -> Any | None:
        """The embeddings of `prompt` (now the most recently used), or None."""
        entry = self._entries.get(prompt)
        if entry is None:
            return None
        self._entries.move_to_end(prompt)
        return entry[0]

    def put(self, prompt: str, value: Any) -> None:
        """Keep `value`, evicting the least recently used entries to stay within the budget (a value larger than
        the whole budget is not kept)."""
        size = _nbytes(value)
        if prompt in self._entries:
            self.nbytes -= self._entries.pop(prompt)[1]
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed
            if not self._said_full:
                self._said_full = True
                log.info("fusedrl: the prompt-embedding cache is full (%.3g GB, %d prompts): the least recently "
                         "used are encoded again when next drawn (prompt_cache_gb sets the budget)",
                         self.max_bytes / GB, len(self._entries) + 1)
        self._entries[prompt] = (value, size)
        self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
