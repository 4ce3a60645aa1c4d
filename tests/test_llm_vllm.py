"""The experimental vLLM generation path (engine/llm/vllm_generation.py), driven by a stand-in for vLLM: no vLLM
runs here (no GPU), so these tests check fusedrl's side only - the requests it makes (SamplingParams from the
config, the same prompt token ids as the transformers path), the Rollout it builds from vLLM's documented
outputs, the weights it syncs (transformers names, LoRA merged, the policy left unchanged), when it syncs (after
each update), and `fusedrl train llm-grpo --sampling.backend vllm` end to end with the config's requirements.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from fusedrl.engine.config import build_config  # noqa: E402
from fusedrl.engine.llm import grpo as llm_grpo  # noqa: E402
from fusedrl.engine.llm.config import LLMGRPOConfig  # noqa: E402
from fusedrl.engine.llm.generation import tokenize_prompts  # noqa: E402
from fusedrl.engine.llm.policy import LoraSpec, Policy  # noqa: E402
from fusedrl.engine.llm.rewards import RewardTerm  # noqa: E402
from fusedrl.engine.llm.tiny import build_tiny_model  # noqa: E402
from fusedrl.engine.llm.vllm_generation import VLLMGenerator, merged_state_dict  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["1+1=", "12 3+45=", "9"]


@dataclass
class _Completion:  # vllm.CompletionOutput's fields that fusedrl reads
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class _Request:  # vllm.RequestOutput
    outputs: list[_Completion]


@dataclass
class _Runner:
    loads: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def load_weights(self, weights):
        self.loads.append({k: v.clone() for k, v in weights})


class _FakeLLM:
    """Samples completion j of a prompt as j + 1 tokens counting up from its last token, ending with EOS when j is
    even (finish_reason "stop") and cut by max_tokens otherwise ("length")."""

    def __init__(self, tokenizer, **kwargs):
        self.kwargs, self.tokenizer, self.calls, self.resets = kwargs, tokenizer, [], 0
        runner = _Runner()
        self.runner = runner
        ns = types.SimpleNamespace
        self.llm_engine = ns(model_executor=ns(driver_worker=ns(worker=ns(model_runner=ns(model=runner)))))

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        eos = self.tokenizer.eos_token_id
        out = []
        for req in requests:
            last = req["prompt_token_ids"][-1]
            comps = []
            for j in range(params.n):
                ids = [3 + (last + k + 1) % (len(self.tokenizer) - 3) for k in range(min(j + 1, params.max_tokens))]
                stop = j % 2 == 0 and len(ids) < params.max_tokens
                ids = ids + [eos] if stop else ids
                comps.append(_Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                         "stop" if stop else "length"))
            out.append(_Request(comps))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    module.SamplingParams = SamplingParams
    module.LLM = None  # the trainer's LLM is built by the test's patched VLLMGenerator
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm_llama") / "llama", arch="llama", hidden_size=32,
                                layers=2, seed=2))


def test_generate_builds_the_rollout_from_vllm_outputs(fake_vllm, model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    llm = _FakeLLM(tok)
    gen = VLLMGenerator(model_dir, tok, llm=llm)
    ro = gen.generate(PROMPTS, group_size=3, max_new_tokens=4, temperature=0.9, top_p=0.8, top_k=5, stop=["+"],
                      answers=["2", "60", "9"])
    requests, params = llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == tokenize_prompts(tok, PROMPTS)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.stop,
            params.include_stop_str_in_output) == (3, 0.9, 0.8, 5, 4, ["+"], True)
    assert ro.num_rows == 9 and ro.prompts == [p for p in PROMPTS for _ in range(3)]
    assert ro.answers == ["2"] * 3 + ["60"] * 3 + ["9"] * 3
    # completion j: j + 1 tokens (+ EOS when it stopped); right padded, mask over the returned tokens
    assert ro.completion_mask.sum(1).tolist() == [2, 2, 4] * 3
    assert ro.truncated.tolist() == [False, True, False] * 3
    for i, ids in enumerate(tokenize_prompts(tok, PROMPTS)):  # left padded prompts, the same tokens
        row = ro.prompt_ids[3 * i]
        assert row[ro.prompt_mask[3 * i].bool()].tolist() == ids
    assert torch.equal(ro.old_logp, torch.zeros_like(ro.old_logp))  # recomputed by the trainer
    assert gen.generate(PROMPTS, group_size=3, max_new_tokens=4, top_k=0) and llm.calls[1][1].top_k == -1


def test_sync_merges_lora_under_transformers_names_and_leaves_the_policy(model_dir):
    policy = Policy.from_pretrained(model_dir, lora=LoraSpec(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = policy.model(input_ids=ids).logits
    weights = merged_state_dict(policy.model)
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert weights.keys() == plain.state_dict().keys()
    layer = policy.model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], layer.base_layer.weight + delta)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):  # no LoRA on these: the loaded values
        assert torch.equal(weights[name], plain.state_dict()[name]), name
    plain.load_state_dict(weights)  # the merged model computes what the LoRA policy computes
    torch.testing.assert_close(plain(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.model(input_ids=ids).logits, before, rtol=0, atol=0)  # unmerged again

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    llm = _FakeLLM(tok)
    gen = VLLMGenerator(model_dir, tok, llm=llm)
    assert gen.sync_weights(policy.model, 0) and not gen.sync_weights(policy.model, 0) and gen.sync_weights(
        policy.model, 1)
    assert len(llm.runner.loads) == 2 and llm.resets == 2
    with pytest.raises(RuntimeError, match="keeps its model elsewhere"):
        VLLMGenerator(model_dir, tok, llm=object()).sync_weights(policy.model, 0)


def test_train_with_the_vllm_backend(fake_vllm, model_dir, tmp_path, monkeypatch):
    from fusedrl.engine.config import ConfigError

    over = {"model.name_or_path": model_dir, "prompts.per_step": 2, "sampling.group_size": 3,
            "sampling.max_completion_length": 4, "reward.names": ["numeric_answer"], "sampling.backend": "vllm",
            "run.seed": 0, "grpo.num_iterations": 1, "optim.lr": 1e-3}
    with pytest.raises(ConfigError, match="old_logprobs: with backend 'vllm' the old log-probs must be recomputed"):
        build_config(LLMGRPOConfig, over)
    cfg = build_config(LLMGRPOConfig, {**over, "sampling.old_logprobs": "recompute"})
    built = []

    def fake_init(self, model, tokenizer, **kwargs):
        self.llm, self.tokenizer, self.synced_version = _FakeLLM(tokenizer, model=model, **kwargs), tokenizer, None
        built.append(self)

    monkeypatch.setattr(VLLMGenerator, "__init__", fake_init)
    trainer = llm_grpo.build(cfg, tmp_path)
    # completion lengths differ within each group: a reward that sees them gives non-zero advantages
    trainer.terms.append(RewardTerm("length", lambda completions, **kw: [float(len(c)) for c in completions]))
    assert trainer.generator is built[0] and built[0].llm.kwargs["model"] == model_dir
    assert built[0].llm.kwargs["dtype"] == "float32" and built[0].llm.kwargs["gpu_memory"] == 0.3
    for step in (1, 2):
        metrics = trainer.step(step)
        assert metrics["skipped"] == 0 and "reward_mean" in metrics
    llm = built[0].llm
    assert len(llm.calls) == 2 and len(llm.runner.loads) == 2  # synced before each step's generation
    first, second = llm.runner.loads
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the update reached vLLM
