"""Parity of fusedrl's LLM GRPO update with TRL 1.16's GRPOTrainer on the same batch.

A tiny Qwen2 with a LoRA adapter (random adapter weights, so the policy differs from the adapter-off reference)
samples completions with fusedrl's generation; the batch (left-padded prompts, completions, masks, group
advantages, the sampled log-probs shifted off-policy so that the clipping acts, and the adapter-off reference
log-probs) then goes both to TRL's own `GRPOTrainer._compute_loss` (a real trainer built on the same model, its
own forward and LM head) and to fusedrl's update (hidden states + LM head through `fused_linear_grpo_loss`, cut
into token-budget micro-batches). Loss and gradient of every LoRA weight must agree, for every loss type TRL and
fusedrl share, at token and sequence level, with and without the KL term and two-sided clipping.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("peft")

from fusedrl.engine.advantages import group_advantages  # noqa: E402
from fusedrl.engine.config import build_config  # noqa: E402
from fusedrl.engine.llm.config import LLMGRPOConfig  # noqa: E402
from fusedrl.engine.llm.data import PromptRecord  # noqa: E402
from fusedrl.engine.llm.generation import generate_completions  # noqa: E402
from fusedrl.engine.llm.policy import LoraSpec, Policy, SeqBatch  # noqa: E402
from fusedrl.engine.llm.tiny import build_tiny_model  # noqa: E402
from fusedrl.engine.llm.trainer import LLMGRPOTrainer  # noqa: E402
from fusedrl.integrations import trl as fused_trl  # noqa: E402

try:
    fused_trl.check_trl_version()
except RuntimeError as exc:  # pragma: no cover - another TRL
    pytest.skip(str(exc), allow_module_level=True)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PROMPTS = ["1+1=", "12 3+45=", "9", "7+7+7="]
G, MAX_LEN, TEMPERATURE = 3, 6, 0.8
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _rewards(texts):
    return torch.tensor([float(t.count("1")) + 0.1 * len(t) for t in texts])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(policy, batch, advantages, old_logp, ref_logp, TRL trainer) shared by every parameter set."""
    folder = build_tiny_model(tmp_path_factory.mktemp("trl_parity") / "qwen2", arch="qwen2", hidden_size=32, seed=2)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(folder), lora=LoraSpec(rank=4), temperature=TEMPERATURE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ro = generate_completions(policy.model.eval(), policy.tokenizer, PROMPTS, group_size=G, max_new_tokens=MAX_LEN,
                              temperature=TEMPERATURE)
    batch = SeqBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    advantages = group_advantages(_rewards(ro.texts), G)
    assert advantages.abs().max() > 0.5
    drift = 0.3 * torch.randn(ro.old_logp.shape, generator=g) + 0.15 * torch.sign(advantages)[:, None]
    old_logp = (ro.old_logp - drift) * ro.completion_mask  # off-policy: ratios beyond both clip bounds
    with torch.no_grad():
        ref_logp = policy.logprobs(batch, reference=True)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_out")), use_cpu=True, report_to="none", seed=0,
                      bf16=False, per_device_train_batch_size=G * len(PROMPTS), num_generations=G,
                      max_completion_length=MAX_LEN, temperature=TEMPERATURE, gradient_checkpointing=False,
                      save_strategy="no")
    trainer = GRPOTrainer(model=policy.model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                          processing_class=policy.tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return policy, batch, advantages, old_logp, ref_logp, trainer


def _trl_loss_and_grads(case, loss_type, level, beta, delta):
    policy, batch, advantages, old_logp, ref_logp, trainer = case
    trainer.loss_type, trainer.beta, trainer.importance_sampling_level = loss_type, beta, level
    trainer.epsilon_low = EPS_LOW
    trainer.epsilon_high = 1.3 if loss_type == "cispo" else EPS_HIGH
    trainer.args.delta = delta
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask,
              "completion_ids": batch.completion_ids, "completion_mask": batch.completion_mask,
              "advantages": advantages, "old_per_token_logps": old_logp,
              "num_items_in_batch": batch.completion_mask.sum().float()}
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_loss_and_grads(case, loss_type, level, beta, delta, token_budget):
    policy, batch, advantages, old_logp, ref_logp, _ = case
    cfg = build_config(LLMGRPOConfig, {
        "model.name_or_path": None, "lora.enabled": True, "sampling.group_size": G, "prompts.per_step": len(PROMPTS),
        "sampling.max_completion_length": MAX_LEN, "sampling.temperature": TEMPERATURE, "grpo.loss_type": loss_type,
        "grpo.importance_level": level, "grpo.beta": beta, "grpo.eps_low": EPS_LOW,
        "grpo.eps_high": 1.3 if loss_type == "cispo" else EPS_HIGH, "grpo.delta": delta,
        "memory.token_budget": token_budget, "optim.max_grad_norm": None})  # TRL clips in its optimizer step
    sgd = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    sgd.zero_grad = lambda set_to_none=True: None  # keep the gradient for the comparison
    trainer = LLMGRPOTrainer(policy, [], [PromptRecord(p) for p in PROMPTS], cfg, optimizer=sgd)
    policy.model.train()
    policy.model.zero_grad()
    rows = list(range(batch.completion_ids.shape[0]))
    out, reason = trainer.update(batch, rows, advantages, old_logp, ref_logp if beta else None,
                                 batch.completion_mask)
    assert reason is None
    return torch.tensor(out["loss"]), {n: p.grad.clone() for n, p in policy.model.named_parameters()
                                       if p.requires_grad}, out


CASES = [("grpo", "token", 0.0, None), ("grpo", "sequence", 0.04, None), ("bnpo", "token", 0.04, 1.5),
         ("dr_grpo", "token", 0.0, None), ("dapo", "token", 0.04, None), ("dapo", "sequence", 0.0, 1.5),
         ("cispo", "token", 0.0, None), ("sapo", "token", 0.04, None), ("luspo", "sequence", 0.0, None)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_matches_trl_grpo_trainer(case, use_backend, backend):
    """Each case: TRL's loss and LoRA gradients vs fusedrl's, the latter once as one micro-batch and once cut into
    micro-batches of at most 24 tokens (the accumulated gradient is the whole batch's)."""
    use_backend(backend)
    budgets = (None, 24) if backend == "torch" else (None,)  # interpreted Triton is slow: one micro-batch there
    for loss_type, level, beta, delta in CASES:
        want_loss, want_grads = _trl_loss_and_grads(case, loss_type, level, beta, delta)
        assert max(g.abs().max() for g in want_grads.values()) > 0
        for budget in budgets:
            loss, grads, metrics = _fused_loss_and_grads(case, loss_type, level, beta, delta, budget)
            where = f"{loss_type}/{level}/beta={beta}/delta={delta}/budget={budget}"
            torch.testing.assert_close(loss, want_loss.float(), rtol=2e-5, atol=1e-6,
                                       msg=lambda m, w=where: f"loss vs TRL ({w}): {m}")
            assert grads.keys() == want_grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=2e-6,
                                           msg=lambda m, w=where, n=name: f"d loss / d {n} vs TRL ({w}): {m}")
            if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                assert metrics["clip_ratio/region_mean"] > 0, where  # the clipping acts on this batch
