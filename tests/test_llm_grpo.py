"""fusedrl.engine.llm: prompts, generation with recorded log-probs (the on-policy ratio is 1), one training step on
tiny Llama-, Qwen2- and GPT-2-shaped models, the KL reference, micro-batching, the NaN/inf guards, OOM advice, and
the errors for bad configs and for prompts too long for the model's context.

Every model is built from a config (random weights), written with save_pretrained and loaded with from_pretrained;
nothing is downloaded. All in fp32 on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from fusedrl.cli import main  # noqa: E402
from fusedrl.engine.config import ConfigError, build_config, iter_fields  # noqa: E402
from fusedrl.engine.llm import grpo as llm_grpo  # noqa: E402
from fusedrl.engine.llm import trainer as llm_trainer  # noqa: E402
from fusedrl.engine.llm.config import LLMGRPOConfig  # noqa: E402
from fusedrl.engine.llm.data import PromptRecord, load_prompt_records, prompt_batch  # noqa: E402
from fusedrl.engine.llm.generation import generate_completions  # noqa: E402
from fusedrl.engine.llm.policy import LoraSpec, Policy, SeqBatch  # noqa: E402
from fusedrl.engine.llm.rewards import RewardTerm  # noqa: E402
from fusedrl.engine.llm.tiny import build_tiny_model  # noqa: E402
from fusedrl.engine.llm.trainer import OutOfMemoryAdvice, TooManySkips, plan_micro_batches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ARCHS = ("qwen2", "llama", "gpt2")
# Prompts of different token lengths, so every batch is left padded.
PROMPTS = ["1+1=", "12 3+45=", "9", "7+7+7="]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_models")
    return {arch: build_tiny_model(root / arch, arch=arch, hidden_size=32, layers=2, seed=1) for arch in ARCHS}


def _cfg(model_dir, **over) -> LLMGRPOConfig:
    base = {"model.name_or_path": str(model_dir), "prompts.per_step": 2, "sampling.group_size": 3,
            "sampling.max_completion_length": 5, "reward.names": ["numeric_answer"], "run.seed": 0}
    base.update(over)
    return build_config(LLMGRPOConfig, base)


def count_ones(completions, **kwargs):
    """A reward that varies within every group of a random model's completions."""
    return [float(c.count("1")) + 0.1 * len(c) for c in completions]


def _records():
    return [PromptRecord(p, str(i)) for i, p in enumerate(PROMPTS)]


def _perturb_lora(policy, std=0.3, seed=0):
    """LoRA B starts at 0 (adapter = identity): give it weights so that policy != reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _batch(ro) -> SeqBatch:
    return SeqBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_records_from_files_and_datasets(tmp_path):
    rows = [{"question": "1+1=", "answer": "2"}, {"question": "  ", "answer": "0"}, {"question": "2+2=", "answer": "4"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "p.csv").write_text("question,answer\n1+1=,2\n,0\n2+2=,4\n")
    want = [PromptRecord("1+1=", "2"), PromptRecord("2+2=", "4")]
    assert load_prompt_records(tmp_path / "p.jsonl", prompt_field="question") == want
    assert load_prompt_records(tmp_path / "p.csv", prompt_field="question") == want
    assert load_prompt_records([("a", 1), "b", {"prompt": "c", "answer": 3}]) == [
        PromptRecord("a", 1), PromptRecord("b", None), PromptRecord("c", 3)]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompt_records(tmp_path / "p.parquet", prompt_field="question") == want
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_prompt_records(str(tmp_path / "ds"), prompt_field="question") == want
    with pytest.raises(ValueError, match=r"p\.jsonl:1: no field 'prompt' \(fields: \['answer', 'question'\]\)"):
        load_prompt_records(tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompt_records(tmp_path / "missing.jsonl")


def test_prompt_batch_is_a_pure_function_of_step():
    records = [PromptRecord(str(i)) for i in range(7)]
    batches = [prompt_batch(records, step, 3, seed=5) for step in range(1, 8)]
    assert batches == [prompt_batch(records, step, 3, seed=5) for step in range(1, 8)]
    flat = [r.prompt for b in batches for r in b]
    for epoch in range(3):  # 21 draws = 3 epochs, each a permutation of the 7 records
        assert sorted(flat[7 * epoch:7 * epoch + 7]) == sorted(str(i) for i in range(7))
    assert flat[:7] != flat[7:14]
    other = [r.prompt for step in (1, 2, 3) for r in prompt_batch(records, step, 3, seed=6)]
    assert other[:7] != flat[:7]


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize(("arch", "lora"), [("qwen2", True), ("llama", False), ("gpt2", False), ("gpt2", True)])
def test_on_policy_ratio_is_one(model_dirs, arch, lora):
    """The log-probs recorded while sampling (KV cache, left padding, temperature, top-p, stop strings) equal those
    the training forward recomputes through the fused kernel: |ratio - 1| <= 1e-5 in fp32. GPT-2's config has
    dropout 0.1, which the policy turns off; it also has absolute positions, so the position ids of left-padded
    rows must match generate's."""
    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(model_dirs[arch]), lora=LoraSpec(rank=4) if lora else None,
                                    temperature=0.9)
    if lora:
        _perturb_lora(policy)
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=3, max_new_tokens=6,
                              temperature=0.9, top_p=0.95, stop=["="])
    assert ro.prompt_mask[:, 0].eq(0).any() and ro.prompt_mask[:, -1].eq(1).all()  # left padded
    policy.model.train()
    logp = policy.logprobs(_batch(ro))
    m = ro.completion_mask.bool()
    assert m.sum() > 20
    ratio = (logp[m] - ro.old_logp[m]).exp()
    assert (ratio - 1).abs().max() <= 1e-5
    assert (ro.old_logp[~m] == 0).all()
    assert ro.old_logp[m].min() < -0.5  # real sampled tokens, not a trivially certain model


def test_the_checkpoints_generation_config_does_not_change_sampling(model_dirs):
    """A generation_config.json with no_repeat_ngram_size / min_new_tokens / suppress_tokens / min_p (transformers
    fills the fields a passed config leaves unset from the model's): sampling stays the plain distribution, so the
    recorded log-probs still equal the recomputed ones, masked positions hold 0, and the model's config is back
    after generation."""
    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(model_dirs["qwen2"]))
    own = policy.model.generation_config
    own.no_repeat_ngram_size, own.min_new_tokens, own.min_p = 1, 6, 0.3
    own.suppress_tokens = list(range(5, 40))
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=3, max_new_tokens=6)
    assert policy.model.generation_config is own and own.no_repeat_ngram_size == 1
    logp = policy.logprobs(_batch(ro))
    m = ro.completion_mask.bool()
    assert (logp[m] - ro.old_logp[m]).abs().max() <= 1e-5
    assert torch.isfinite(ro.old_logp).all() and (ro.old_logp[~m] == 0).all()


def test_masked_positions_of_old_logp_are_zero_even_after_a_nan(model_dirs, monkeypatch):
    """Rows that ended keep being scored until the batch ends; a NaN there (log_softmax of an all -inf row) must not
    survive as NaN * 0 in the masked positions, where the trainer's guard does not look."""
    from fusedrl.engine.llm import generation

    real = generation._LogprobRecorder.finish

    def finish(self, seq):
        out = real(self, seq)
        out[:, -1] = float("nan")
        return out

    monkeypatch.setattr(generation._LogprobRecorder, "finish", finish)
    torch.manual_seed(3)
    policy = Policy.from_pretrained(str(model_dirs["qwen2"]))
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=4, max_new_tokens=8,
                              stop=["=", "5"])
    masked = ~ro.completion_mask.bool()
    assert masked[:, -1].any() and (ro.old_logp[masked] == 0).all()


def test_stop_strings_eos_and_truncation(model_dirs):
    """A completion ends after the token that completes a stop string (kept in the text) or after EOS; rows that
    do neither are flagged truncated; tokens after the end are masked out."""
    torch.manual_seed(3)
    policy = Policy.from_pretrained(str(model_dirs["qwen2"]))
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=4, max_new_tokens=8,
                              stop=["=", "5"])
    lengths = ro.completion_mask.sum(1)
    tok = policy.tokenizer
    for i in range(ro.num_rows):
        n = int(lengths[i])
        ids = ro.completion_ids[i, :n].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        assert ro.completion_mask[i, :n].all() and not ro.completion_mask[i, n:].any()
        if ro.truncated[i]:
            assert n == 8 and "=" not in text and "5" not in text and tok.eos_token_id not in ids
        else:
            ended_eos = ids[-1] == tok.eos_token_id
            before = tok.decode(ids[:-1], skip_special_tokens=True)
            assert ended_eos or (("=" in text or "5" in text) and "=" not in before and "5" not in before)
            assert ro.texts[i] == text and tok.eos_token_id not in ids[:-1]
    assert ro.truncated.any() and (~ro.truncated).any()
    assert any(t.endswith(("=", "5")) for t in ro.texts)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(("arch", "over"), [
    ("qwen2", {"lora.enabled": True, "grpo.beta": 0.05, "grpo.loss_type": "grpo",
               "memory.gradient_checkpointing": "full", "memory.offload_block_inputs": True}),
    ("llama", {"lora.enabled": False, "grpo.beta": 0.05, "grpo.loss_type": "dapo", "grpo.num_iterations": 2}),
    ("gpt2", {"lora.enabled": True, "memory.gradient_checkpointing": "save_attention", "memory.token_budget": 24,
              "memory.checkpoint_blocks": 1, "grpo.loss_type": "bnpo", "grpo.mini_batches": 2, "sampling.stop": ["="]}),
])
def test_one_step(model_dirs, tmp_path, arch, over, monkeypatch):
    """One training step through `build` on each architecture: finite metrics, on-policy ratio 1 in the first
    update, the trainable weights move, the frozen ones do not (qwen2: every layer checkpointed, the inputs that
    require grad offloaded, CPU tensors counting as offloadable here; gpt2: the first layer checkpointed)."""
    from fusedrl.engine import input_offload

    monkeypatch.setattr(input_offload, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(input_offload, "MIN_BYTES", 0)
    cfg = _cfg(model_dirs[arch], **{"optim.lr": 1e-2, **over})
    torch.manual_seed(0)
    trainer = llm_grpo.build(cfg, tmp_path)
    if "memory.checkpoint_blocks" in over:  # only the first decoder layer checkpoints
        from fusedrl.engine.checkpointing import iter_wrappers

        assert [n.rsplit(".", 1)[-1] for n, _ in iter_wrappers(trainer.policy.model)] == ["0"]
    trainer.records = _records()
    trainer.terms.append(RewardTerm("ones", count_ones, 0.5))  # varies within groups: non-zero advantages
    before = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}
    metrics = trainer.step(1)
    assert metrics["reward_std"] > 0 and "reward/ones" in metrics and "reward/numeric_answer" in metrics
    assert metrics["skipped"] == 0 and metrics["skipped_updates"] == 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    for key in ("reward_mean", "loss", "grad_norm", "entropy", "completion_length", "clip_ratio/region_mean"):
        assert key in metrics
    if cfg.grpo.num_iterations == 1 and cfg.grpo.mini_batches == 1:
        assert abs(metrics["ratio_mean"] - 1) < 1e-5
    if cfg.grpo.beta:
        assert "kl" in metrics and metrics["kl"] >= 0
    moved = [n for n, p in trainer.policy.model.named_parameters() if not torch.equal(p, before[n])]
    trainable = {n for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    assert moved and set(moved) <= trainable
    if cfg.lora.enabled:
        assert all("lora_" in n for n in trainable)


def test_reference_is_the_adapter_off_model_or_a_frozen_copy(model_dirs):
    """beta > 0: with LoRA the reference log-probs are the base model's (adapter disabled); with full fine-tuning
    they come from a frozen copy that training does not move."""
    torch.manual_seed(0)
    base = Policy.from_pretrained(str(model_dirs["llama"]))
    lora = Policy.from_pretrained(str(model_dirs["llama"]), lora=LoraSpec(rank=4))
    _perturb_lora(lora)
    ro = generate_completions(lora.model.eval(), lora.tokenizer, PROMPTS, group_size=2, max_new_tokens=4)
    batch = _batch(ro)
    with torch.no_grad():
        want = base.logprobs(batch)
        assert (lora.logprobs(batch) - want).abs().max() > 1e-3  # the adapter changes the policy ...
        torch.testing.assert_close(lora.logprobs(batch, reference=True), want, atol=1e-6, rtol=0)  # ... not the ref

    full = Policy.from_pretrained(str(model_dirs["llama"]), reference=True)
    assert full.ref_model is not None and not any(p.requires_grad for p in full.ref_model.parameters())
    with torch.no_grad():
        for p in full.model.parameters():
            p.add_(0.01)
        torch.testing.assert_close(full.logprobs(batch, reference=True), want, atol=1e-6, rtol=0)


def test_lora_on_the_lm_head_is_refused(model_dirs):
    with pytest.raises(ValueError, match="lm_head"):
        Policy.from_pretrained(str(model_dirs["qwen2"]), lora=LoraSpec(rank=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match="lora.target_modules: the LM head cannot carry LoRA"):
        _cfg(model_dirs["qwen2"], **{"lora.target_modules": ["lm_head"]})


def test_plan_micro_batches():
    p, c = [3, 1, 2, 5, 1], [4, 4, 1, 6, 2]
    assert plan_micro_batches(p, c, None) == [[0, 1, 2, 3, 4]]
    plan = plan_micro_batches(p, c, 16)
    assert sorted(i for mb in plan for i in mb) == [0, 1, 2, 3, 4]
    for mb in plan:
        assert len(mb) == 1 or len(mb) * (max(p[i] for i in mb) + max(c[i] for i in mb)) <= 16
    assert [3] in plan  # 11 tokens: alone
    assert plan_micro_batches(p, c, 1) == [[3], [0], [1], [2], [4]]  # each row alone, longest first (ties: in order)


@pytest.mark.slow
def test_micro_batching_gives_the_mini_batch_gradient(model_dirs, use_backend):
    """Cutting an update into token-budget micro-batches changes memory, not the gradient: for every loss type the
    accumulated gradient equals the one-micro-batch gradient (off-policy ratios, so the clipping acts). The torch
    backend: this checks the loss scaling, not the kernels (interpreted Triton would take minutes here)."""
    use_backend("torch")
    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(model_dirs["qwen2"]), lora=LoraSpec(rank=4))
    _perturb_lora(policy)
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=3, max_new_tokens=5)
    batch = _batch(ro)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(ro.num_rows, generator=g)
    old = ro.old_logp + 0.2 * torch.randn(ro.old_logp.shape, generator=g) * ro.completion_mask
    sgd = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    sgd.zero_grad = lambda set_to_none=True: None  # keep the accumulated gradient for the comparison
    rows = list(range(ro.num_rows))
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"):
        grads = []
        for budget in (None, 20):
            cfg = _cfg(model_dirs["qwen2"], **{"grpo.loss_type": loss_type, "memory.token_budget": budget,
                                               "grpo.eps_high": 1.3 if loss_type == "cispo" else None})
            trainer = llm_trainer.LLMGRPOTrainer(policy, [], _records(), cfg, optimizer=sgd)
            assert (len(trainer._micro_batches(batch, rows)) > 2) == (budget is not None)
            policy.model.zero_grad()
            _, reason = trainer.update(batch, rows, adv, old, None, batch.completion_mask)
            assert reason is None
            grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]).clone())
        assert grads[0].abs().max() > 0, loss_type
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7, msg=lambda m, t=loss_type: f"{t}: {m}")


# ---------------------------------------------------------------------------------------------- guards


def _trainer(model_dirs, tmp_path, **over):
    cfg = _cfg(model_dirs["qwen2"], **{"lora.enabled": False, **over})
    trainer = llm_grpo.build(cfg, tmp_path)
    if "memory.checkpoint_blocks" in over:  # only the first decoder layer checkpoints
        from fusedrl.engine.checkpointing import iter_wrappers

        assert [n.rsplit(".", 1)[-1] for n, _ in iter_wrappers(trainer.policy.model)] == ["0"]
    trainer.records = _records()
    trainer.terms.append(RewardTerm("ones", count_ones, 0.5))  # varies within groups: non-zero advantages
    return trainer


def test_nan_rewards_skip_the_step(model_dirs, tmp_path, caplog):
    trainer = _trainer(model_dirs, tmp_path, **{"grpo.max_consecutive_skips": 2})
    trainer.terms[0].fn = lambda completions, **kw: [math.nan] + [1.0] * (len(completions) - 1)
    trainer.terms[0].name = "flaky"
    before = [p.detach().clone() for p in trainer.params]
    state = dict(trainer.optimizer.state)
    with caplog.at_level("WARNING", logger="fusedrl"):
        metrics = trainer.step(1)
    assert metrics["skipped"] == 1 and "loss" not in metrics
    assert "step 1 skipped: non-finite rewards from flaky" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and trainer.optimizer.state == state
    with pytest.raises(TooManySkips, match="2 steps in a row were skipped"):
        trainer.step(2)


def test_non_finite_loss_or_gradient_is_never_applied(model_dirs, tmp_path, monkeypatch):
    trainer = _trainer(model_dirs, tmp_path)
    before = [p.detach().clone() for p in trainer.params]
    real = trainer.policy.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * math.nan, metrics

    monkeypatch.setattr(trainer.policy, "grpo_loss", nan_loss)
    metrics = trainer.step(1)
    assert metrics["skipped"] == 1 and metrics["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and not trainer.optimizer.state

    monkeypatch.setattr(trainer.policy, "grpo_loss", real)
    hook = trainer.params[0].register_hook(lambda g: g * math.inf)  # a finite loss with a non-finite gradient
    metrics = trainer.step(2)
    hook.remove()
    assert metrics["skipped"] == 1 and metrics["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and not trainer.optimizer.state
    assert trainer.step(3)["skipped"] == 0 and trainer.consecutive_skips == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_a_loss_that_is_non_finite_on_another_process_drops_the_update_here(model_dirs, tmp_path, monkeypatch):
    """The update is dropped on the loss summed over every process, not on this process's own (a process whose
    gradients stayed finite stepped while another dropped: the replicas diverged)."""
    trainer = _trainer(model_dirs, tmp_path)
    before = [p.detach().clone() for p in trainer.params]
    calls = []

    def all_sum(value, device):  # an update sums its token count, then its loss: another process's loss is NaN
        calls.append(value)
        return 2 * value if len(calls) % 2 else math.nan

    monkeypatch.setattr("fusedrl.engine.llm.trainer.all_sum", all_sum)
    monkeypatch.setattr(trainer, "world_size", 2)
    real_update = trainer.update
    seen = []

    def update(*args, **kwargs):
        out, reason = real_update(*args, **kwargs)
        seen.append(reason)
        return out, reason

    monkeypatch.setattr(trainer, "update", update)
    trainer.step(1)
    assert seen and all(r is not None and "summed over every process" in r for r in seen), seen
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and not trainer.optimizer.state


def test_one_update_per_batch_is_on_policy(model_dirs, tmp_path, monkeypatch):
    """One update per batch: the ratio is 1 whatever the sampling log-probs are (TRL's rule; on a GPU they come from
    generate's KV-cache forward in bf16 and differ from training's); several updates use them."""
    seen = []
    for iterations in (1, 2):
        trainer = _trainer(model_dirs, tmp_path / str(iterations), **{"grpo.num_iterations": iterations})
        real = trainer.policy.grpo_loss

        def spy(batch, advantages, old_logp, *args, real=real, iterations=iterations, **kwargs):
            seen.append((iterations, old_logp is None))
            return real(batch, advantages, old_logp, *args, **kwargs)

        monkeypatch.setattr(trainer.policy, "grpo_loss", spy)
        metrics = trainer.step(1)
        assert metrics["skipped"] == 0
        if iterations == 1:
            assert metrics["ratio_mean"] == 1.0
    assert {s for s in seen if s[0] == 1} == {(1, True)} and {s for s in seen if s[0] == 2} == {(2, False)}


def test_fp16_weights_train_lora_with_loss_scaling(model_dirs, tmp_path):
    """A GPU without bf16 (a T4): fp16 weights, fp32 LoRA, the loss scaled so that small gradients survive the fp16
    activations; the scaler's state is checkpointed."""
    cfg = _cfg(model_dirs["qwen2"], **{"lora.enabled": True, "model.dtype": "fp16", "model.fused_backbone": False})
    trainer = llm_grpo.build(cfg, tmp_path)
    trainer.records = _records()
    trainer.terms.append(RewardTerm("ones", count_ones, 0.5))
    assert trainer.scaler is not None and all(p.dtype == torch.float32 for p in trainer.params)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.step(1)
    assert metrics["skipped"] == 0 and all(torch.isfinite(p).all() for p in trainer.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == trainer.scaler.get_scale()
    trainer.scaler.update(new_scale=2.0)
    trainer.load_state_dict(state)
    assert trainer.scaler.get_scale() == state["grad_scaler"]["scale"]


@pytest.mark.parametrize("phase", ["generation", "training"])
def test_out_of_memory_names_the_settings_to_lower(model_dirs, tmp_path, monkeypatch, phase):
    trainer = _trainer(model_dirs, tmp_path, **{"memory.token_budget": 4096})

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "rollout" if phase == "generation" else "update", oom)
    with pytest.raises(OutOfMemoryAdvice) as info:
        trainer.step(1)
    text = str(info.value)
    assert f"out of memory during {phase}" in text
    names = (["sampling.batch_size", "sampling.max_completion_length", "prompts.per_step", "model.dtype"]
             if phase == "generation" else ["memory.token_budget (now 4096", "memory.gradient_checkpointing",
                                            "grpo.mini_batches", "lora.enabled"])
    for name in names:
        assert name in text


# ---------------------------------------------------------------------------------------------- config errors


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "llm-grpo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for fi in iter_fields(LLMGRPOConfig):
        if not fi.is_section:
            assert fi.help, fi.path
            assert f"--{fi.path}" in out, fi.path


@pytest.mark.parametrize(("args", "message"), [
    (["--sampling.group_size", "1"], "sampling.group_size: must be >= 2 (a group of one has no advantage); got 1"),
    (["--config", "{yaml}"], "grpo.lossy: unknown key; did you mean 'grpo.loss_type'?\n  grpo.loss_type: must be "
     "one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo', 'cispo', 'sapo'; got 'dapoo' (did you mean 'dapo'?)"),
    (["--prompts.train", "missing.jsonl", "--reward.names", "exact_match"],
     "prompts.train: the prompt file 'missing.jsonl' does not exist"),
    (["--prompts.eval", "missing.jsonl"], "prompts.eval: the prompt file 'missing.jsonl' does not exist"),
    (["--prompts.train", "{jsonl}"], "LLMGRPOConfig: reward.names / reward.function: give a reward for your prompts"),
    (["--reward.names", "pickscorex"], "reward.names: check failed with ValueError: unknown reward(s) ['pickscorex']"),
    (["--grpo.delta", "1.1"], "LLMGRPOConfig: grpo.delta: must be > 1 + eps_high = 1.2"),
    (["--sampling.backend", "vllm"], "sampling.backend: 'vllm' needs the vllm package, which is not installed"),
    (["--model.name_or_path", "./no/such/model"], "model.name_or_path: the folder './no/such/model' does not exist"),
    (["--lora.rank", "0"], "lora.rank: must be > 0; got 0"),
    (["--memory.checkpoint_blocks", "2"], "memory: checkpoint_blocks needs gradient_checkpointing (now none)"),
    (["--memory.gradient_checkpointing", "full", "--memory.checkpoint_blocks", "0"],
     "memory.checkpoint_blocks: must be > 0; got 0"),
    (["--no-lora.enabled", "--model.dtype", "bf16"], "model.dtype: full fine-tuning (lora.enabled false) updates"),
])
def test_bad_config_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch, args, message):
    if "vllm" in args and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: its refusal cannot be tested here")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "c.yaml").write_text("grpo:\n  loss_type: dapoo\n  lossy: 1\n")
    args = [a.replace("{jsonl}", str(tmp_path / "p.jsonl")).replace("{yaml}", str(tmp_path / "c.yaml")) for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llm_grpo, "build", lambda *a, **k: pytest.fail("build() ran on a bad config"))
    assert main(["train", "llm-grpo", "--out", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_prompt_plus_completion_longer_than_context_is_refused(model_dirs, tmp_path, capsys, monkeypatch):
    """The tiny models have a 64-token context: a 60-character prompt with 8 completion tokens does not fit. The
    error names the fields and comes before any weight is loaded."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+" * 30, "answer": "1"}) + "\n"
                                      + json.dumps({"prompt": "2=", "answer": "2"}) + "\n")
    monkeypatch.setattr(Policy, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    common = ["--model.name_or_path", str(model_dirs["qwen2"]), "--prompts.train", str(tmp_path / "p.jsonl"),
              "--reward.names", "numeric_answer", "--no-run.progress", "--no-run.tensorboard"]
    rc = main(["train", "llm-grpo", "--out", str(tmp_path / "a"), *common, "--sampling.max_completion_length", "8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("prompts.train: the longest prompt has 60 tokens, which with sampling.max_completion_length = 8 makes "
            "68 > the context of") in err and "prompts.max_prompt_length <= 56" in err
    rc = main(["train", "llm-grpo", "--out", str(tmp_path / "b"), *common, "--sampling.max_completion_length", "64"])
    assert rc == 2 and "sampling.max_completion_length: 64 tokens do not fit the context" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prompts.max_prompt_length: the longest prompt has 58 tokens"):
        llm_grpo.build(_cfg(model_dirs["qwen2"], **{"prompts.train": str(tmp_path / "p.jsonl"),
                                                    "prompts.max_prompt_length": 58,
                                                    "sampling.max_completion_length": 8}), tmp_path)
    # the long prompt only among the evaluation prompts: that field is named (it blamed prompts.train)
    (tmp_path / "short.jsonl").write_text(json.dumps({"prompt": "2=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="prompts.eval: the longest evaluation prompt has 60 tokens"):
        llm_grpo.build(_cfg(model_dirs["qwen2"], **{"prompts.train": str(tmp_path / "short.jsonl"),
                                                    "prompts.eval": str(tmp_path / "p.jsonl"),
                                                    "sampling.max_completion_length": 8}), tmp_path)


def test_adapter_saved_with_checkpointed_layers_has_every_lora_weight(model_dirs, tmp_path):
    """memory.gradient_checkpointing wraps the decoder layers: the adapter saved then (checkpoints' lora/, final/)
    holds every LoRA weight (peft's state dict found none inside a wrapper: an empty adapter was saved)."""
    from safetensors.torch import load_file
    from transformers.modeling_layers import GradientCheckpointingLayer

    from fusedrl.engine.checkpointing import apply_checkpointing
    from fusedrl.engine.llm.policy import decoder_of

    policy = Policy.from_pretrained(str(model_dirs["qwen2"]), lora=LoraSpec(rank=4))
    policy.save_pretrained(tmp_path / "plain")
    assert apply_checkpointing(decoder_of(policy.model), "full", module_types=GradientCheckpointingLayer)
    policy.save_pretrained(tmp_path / "wrapped", tokenizer=False)
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    wrapped = load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    assert plain and wrapped.keys() == plain.keys() and all(torch.equal(wrapped[k], plain[k]) for k in plain)
    assert not (tmp_path / "wrapped" / "tokenizer.json").exists()


def test_mini_batches_gives_that_many_updates(model_dirs, tmp_path, monkeypatch):
    """6 completions in 4 mini-batches: 4 updates of 2, 2, 1, 1 rows (chunk() made 3 of 2)."""
    from fusedrl.engine.llm.trainer import LLMGRPOTrainer

    cfg = _cfg(model_dirs["qwen2"], **{"grpo.mini_batches": 4, "grpo.loss_type": "grpo"})
    trainer = llm_grpo.build(cfg, tmp_path)
    trainer.records = _records()
    trainer.terms.append(RewardTerm("ones", count_ones, 0.5))
    sizes, real = [], LLMGRPOTrainer.update
    monkeypatch.setattr(LLMGRPOTrainer, "update", lambda self, batch, rows, *a: sizes.append(len(rows)) or
                        real(self, batch, rows, *a))
    trainer.step(1)
    assert sizes == [2, 2, 1, 1] and trainer.updates == 4


def test_model_loading_problems_are_config_errors(model_dirs, tmp_path, capsys, monkeypatch):
    """LoRA targets the model lacks, a model that cannot be found: exit status 2 and the field named, no traceback
    and no advice to --resume; the same --out then starts over."""
    out = tmp_path / "run"
    common = ["--out", str(out), "--model.name_or_path", str(model_dirs["qwen2"]), "--no-run.progress",
              "--prompts.train", str(tmp_path / "p.jsonl"), "--reward.names", "numeric_answer",
              "--sampling.max_completion_length", "8"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert main(["train", "llm-grpo", *common, "--lora.enabled", "--lora.target_modules", "q_projj"]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: Target modules {'q_projj'} not found" in err and "Traceback" not in err
    assert "--resume" not in (out / "train.log").read_text()
    import huggingface_hub.constants

    # offline: a hub id not in the cache fails at once, not after network retries (the env var is read at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["train", "llm-grpo", *common, "--model.name_or_path", "no-such-org/no-such-model"]) == 2
    assert "model.name_or_path: could not be loaded" in capsys.readouterr().err


def test_a_reward_that_needs_answers_is_refused_before_the_model_loads(model_dirs, tmp_path, monkeypatch):
    """numeric_answer on prompts without an answer column: a ConfigError from build(), not a traceback at step 1
    followed by the advice to --resume (which would fail the same way)."""
    from fusedrl.engine.llm import policy

    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+1="}\n')
    monkeypatch.setattr(policy.Policy, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = _cfg(model_dirs["qwen2"], **{"prompts.train": str(tmp_path / "p.jsonl")})
    with pytest.raises(ConfigError, match=r"prompts.train: the numeric_answer reward needs reference answers, and 2 "
                                          r"of the 2 training prompts have none or an empty one \(the first: record "
                                          r"0, prompt '1\+1='\): set prompts.answer_field"):
        llm_grpo.build(cfg, tmp_path)
    # a blank CSV cell, and an answer with no number: refused up front too (they crashed the run when first drawn)
    (tmp_path / "q.csv").write_text("question,solution\n1+1=,2\n2+1=,\n")
    over = {"prompts.train": str(tmp_path / "q.csv"), "prompts.prompt_field": "question",
            "prompts.answer_field": "solution"}
    with pytest.raises(ConfigError, match=r"1 of the 2 training prompts have none or an empty one"):
        llm_grpo.build(_cfg(model_dirs["qwen2"], **over), tmp_path)
    (tmp_path / "q.csv").write_text("question,solution\n1+1=,2\n2+1=,N/A\n")
    with pytest.raises(ConfigError, match=r"cannot use the answer of record \d of the training prompts \(prompt "
                                          r"'2\+1='\): has no finite number: 'N/A'"):
        llm_grpo.build(_cfg(model_dirs["qwen2"], **over), tmp_path)


def test_evaluation_prompts_metrics_and_rng(model_dirs, tmp_path):
    """prompts.eval (the first prompts.num_eval of the file, in its order) is what evaluate() samples, one completion
    each with its own seed: the same rows at every call, and the training RNG left as it was."""
    (tmp_path / "train.jsonl").write_text("".join(f'{{"prompt": "{a}+1=", "answer": "{a + 1}"}}\n' for a in range(6)))
    (tmp_path / "eval.jsonl").write_text("".join(f'{{"prompt": "{a}+2=", "answer": "{a + 2}"}}\n' for a in range(5)))
    cfg = _cfg(model_dirs["qwen2"], **{"prompts.train": str(tmp_path / "train.jsonl"),
                                       "prompts.eval": str(tmp_path / "eval.jsonl"), "prompts.num_eval": 3})
    trainer = llm_grpo.build(cfg, tmp_path)
    assert [r.prompt for r in trainer.eval_records] == ["0+2=", "1+2=", "2+2="]
    torch.manual_seed(7)
    state = torch.get_rng_state()
    metrics, rows = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), state)
    assert [r["prompt"] for r in rows] == ["0+2=", "1+2=", "2+2="] and [r["answer"] for r in rows] == ["2", "3", "4"]
    assert set(metrics) == {"eval/reward_mean", "eval/completion_length", "eval/reward/numeric_answer"}
    assert metrics["eval/reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / 3)
    assert trainer.evaluate() == (metrics, rows)


def test_fused_backbone_step_equals_the_stock_step(model_dirs, tmp_path):
    """model.fused_backbone (the default) changes speed, not the step: one GRPO step with LoRA gives the loss and
    the adapter update of the stock model's step (the same rollouts: one seed, log-probs equal to rounding).
    AdamW's eps is set to 1 so that its first update is about lr x gradient: with the default eps it is
    lr x sign(gradient), which turns rounding-level differences of near-zero gradients into whole steps."""
    results = []
    for fused in (True, False):
        cfg = _cfg(model_dirs["qwen2"], **{"lora.enabled": True, "grpo.beta": 0.05, "optim.lr": 1e-2,
                                           "optim.eps": 1.0, "model.fused_backbone": fused})
        torch.manual_seed(0)
        trainer = llm_grpo.build(cfg, tmp_path)
        model = trainer.policy.model
        assert any("forward" in m.__dict__ for m in model.modules()) == fused
        trainer.records = _records()
        trainer.terms.append(RewardTerm("ones", count_ones, 0.5))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        metrics = trainer.step(1)
        results.append((metrics, {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}))
    (fused_m, fused_d), (stock_m, stock_d) = results
    for key in ("loss", "kl", "reward_mean", "completion_length"):
        assert fused_m[key] == pytest.approx(stock_m[key], rel=1e-4, abs=1e-7), key
    scale = max(d.abs().max().item() for d in stock_d.values())
    assert scale > 0
    for name in stock_d:
        assert (fused_d[name] - stock_d[name]).abs().max().item() <= 1e-3 * scale, name


def test_full_fine_tuning_reference_copy_is_patched_too(model_dirs, tmp_path):
    """The frozen reference of full fine-tuning runs on the fused backbone as the policy does (same numbers: a zero
    KL at the first step, and the same speed and memory)."""
    cfg = _cfg(model_dirs["llama"], **{"lora.enabled": False, "grpo.beta": 0.05})
    trainer = llm_grpo.build(cfg, tmp_path)
    for model in (trainer.policy.model, trainer.policy.ref_model):
        assert sum("forward" in m.__dict__ for m in model.modules()) == 5 + 2  # 5 RMSNorms, 2 SwiGLU MLPs


def test_a_stop_string_that_is_a_special_token_stops(model_dirs):
    """A stop string naming a special token (e.g. "<|im_end|>" on a model whose EOS is another token) ends the row:
    the check decodes with special tokens kept (it decoded without them and never saw it)."""
    from fusedrl.engine.llm.generation import _StopStrings

    tok = Policy.from_pretrained(str(model_dirs["qwen2"])).tokenizer
    unk, a = tok.convert_tokens_to_ids("<unk>"), tok.convert_tokens_to_ids("1")
    stop = _StopStrings(tok, ["<unk>"], prompt_len=2, rows=2, device="cpu")
    ids = torch.tensor([[a, a, a, unk], [a, a, a, a]])
    assert stop(ids[:, :3], None).tolist() == [False, False]
    assert stop(ids, None).tolist() == [True, False] and stop.stopped_at.tolist() == [2, -1]
    plain = _StopStrings(tok, ["11"], prompt_len=2, rows=2, device="cpu")
    assert plain.skip_special  # plain-text stops keep decoding without special tokens


def test_the_tiny_tokenizer_keeps_spaces_when_loaded_back(model_dirs):
    """The embedded default's character tokenizer is saved as a generic fast tokenizer; transformers 5's AutoTokenizer
    would rebuild it as the config's Qwen2Tokenizer, which dropped the spaces of a user's prompt."""
    from fusedrl.engine.llm.policy import load_tokenizer
    from fusedrl.engine.llm.tiny import build_tiny_tokenizer

    for arch in ("qwen2", "llama"):
        tok = load_tokenizer(str(model_dirs[arch]))
        assert tok("1 + 2=")["input_ids"] == build_tiny_tokenizer()("1 + 2=")["input_ids"]
        assert tok.decode(tok("1 + 2=")["input_ids"]) == "1 + 2=" and tok.padding_side == "left"
