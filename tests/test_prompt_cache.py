"""engine.diffusion.prompt_cache.PromptCache: prompt embeddings within a byte budget, least recently used evicted;
a policy with a small budget gives the embeddings an unbounded one gives."""

from __future__ import annotations

import logging

import pytest
import torch

from fusedrl.engine.diffusion.policy import PromptEmbeddings
from fusedrl.engine.diffusion.prompt_cache import GB, PromptCache


def _emb(n: int, pooled: int = 0) -> PromptEmbeddings:  # n * 4 + pooled * 4 bytes
    return PromptEmbeddings(torch.zeros(1, n), torch.zeros(1, pooled) if pooled else None)


def test_least_recently_used_go_first_within_the_budget(caplog):
    cache = PromptCache(40 / GB)  # 40 bytes
    a, b, c = _emb(4), _emb(4), _emb(2, pooled=2)  # 16, 16, 16 bytes
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "a" is now the most recent: "b" goes first
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        cache.put("c", c)
    assert list(cache) == ["a", "c"] and cache.get("a") is a and cache.get("c") is c
    assert cache.nbytes == 32 and len(cache) == 2
    assert "prompt-embedding cache is full" in caplog.text and "prompt_cache_gb" in caplog.text
    cache.put("a", _emb(8))  # replaced: its old size is freed first, then "c" makes room
    assert cache.nbytes == 32 and list(cache) == ["a"]
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_nothing_larger_than_the_budget_is_kept():
    cache = PromptCache(0)
    cache.put("a", _emb(1))
    assert len(cache) == 0 and cache.get("a") is None
    cache = PromptCache(8 / GB)
    cache.put("a", _emb(1))
    cache.put("big", _emb(3))
    assert "a" in cache and "big" not in cache


@pytest.mark.parametrize("bad", [-1, "4", True, float("nan")])
def test_a_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="prompt_cache_gb"):
        PromptCache(bad)


def test_a_small_budget_gives_the_same_embeddings(tmp_path):
    pytest.importorskip("diffusers")
    from fusedrl.engine.diffusion import load_policy, tiny_model_dir

    model = tiny_model_dir("sd3", tmp_path)
    whole = load_policy(model, lora=False)
    one = load_policy(model, lora=False)
    size = whole.encode_prompts(["x"]).embeds.numel() * 4 + whole.encode_prompts(["x"]).pooled.numel() * 4
    one._cache = PromptCache(1.5 * size / GB)  # room for one prompt's embeddings
    prompts = ["a red cube", "a blue ball", "a red cube", "a green tree", "a blue ball"]
    for batch in (prompts, prompts[::-1], prompts[1:3]):
        got, want = one.encode_prompts(batch), whole.encode_prompts(batch)
        assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
    assert len(one._cache) == 1 and len(whole._cache) == 4  # "x" and the three prompts
