"""fusedrl.integrations.trl: TRL 1.16's GRPOTrainer with fusedrl's log-prob (and loss) kernels.

Everything runs on a tiny Qwen2 (hidden 32, 2 layers, vocabulary 300) built from a config, saved with
`save_pretrained` and loaded with `from_pretrained`, and a word-level tokenizer built in the test:
nothing is downloaded. The trainers run in fp32 (`bf16=False`; GRPOConfig's default bf16=True would
put TRL's own LM head under bf16 autocast on the CPU, whose rounding hides fp32-level differences).
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fusedrl.kernels  # noqa: E402
from fusedrl.integrations import trl as fused_trl  # noqa: E402

try:
    fused_trl.check_trl_version()
    TRL_SUPPORTED = True
except RuntimeError:
    TRL_SUPPORTED = False
needs_trl = pytest.mark.skipif(not TRL_SUPPORTED, reason=f"needs trl{fused_trl.SUPPORTED_TRL}")

if TRL_SUPPORTED:
    import trl.trainer.utils as trl_utils
    from trl import GRPOConfig, GRPOTrainer
    from trl.kernels import ChunkedLogProbFunction

# transformers 5 deprecates the `gradient_checkpointing` names that TRL uses; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")

VOCAB = 300
PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23", "w7"]
# Wall-clock keys of the log history, which differ between any two runs.
TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL unpatched."""
    if TRL_SUPPORTED:
        fused_trl.unpatch_grpo_trainer()
    yield
    if TRL_SUPPORTED:
        fused_trl.unpatch_grpo_trainer()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of fusedrl.kernels.token_logprobs / grpo_loss (the integration looks them up per call)."""
    counts = {"token_logprobs": 0, "grpo_loss": 0}
    for name in counts:
        original = getattr(fusedrl.kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fusedrl.kernels, name, counted)
    return counts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 and a word-level tokenizer ("w3" ... "w299"), saved the way a checkpoint is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def reward_len_and_w1(completions, **kwargs):
    """Deterministic: one point per "w1" token, plus a little per word."""
    return [float(c.count("w1")) + 0.1 * len(c.split()) for c in completions]


class RecordingGRPOTrainer(GRPOTrainer if TRL_SUPPORTED else object):
    """GRPOTrainer keeping every log-prob / entropy tensor it computes (also checks that a subclass calling
    super() goes through the patch)."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self.recorded.append((logps.detach().clone(), None if entropies is None else entropies.detach().clone()))
        return logps, entropies, aux


def make_trainer(model_dir, output_dir, **overrides) -> RecordingGRPOTrainer:
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", seed=0, bf16=False, max_steps=3,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=4,
                    max_completion_length=6, beta=0.1, temperature=0.9, learning_rate=1e-2, logging_steps=1,
                    save_strategy="no", dataloader_num_workers=0)
    settings.update(overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    # AutoTokenizer would pick the Qwen2 tokenizer class from config.json; this one is a plain word-level one.
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    trainer = RecordingGRPOTrainer(model=model, reward_funcs=reward_len_and_w1, args=GRPOConfig(**settings),
                                   train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 2}),
                                   processing_class=tokenizer)
    trainer.recorded = []
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Version check
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.16.0", "1.16.7", "1.16.1rc1", "1.16.2+local"])
def test_supported_versions_accepted(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    assert fused_trl.check_trl_version() == version


# "1.160.0" passes a string comparison; "1.17.0.dev0" passes Version(v) < Version("1.17") (a pre-release of 1.17).
@pytest.mark.parametrize("version", ["1.15.9", "1.16.0.dev0", "1.17.0", "1.17.0.dev0", "1.160.0", "1.9.0",
                                     "2.0.0", "not-a-version"])
def test_unsupported_versions_refused(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"trl>=1\.16,<1\.17.*trl {version} is installed"):
        fused_trl.patch_grpo_trainer()
    assert fused_trl.patched_state() is None
    if TRL_SUPPORTED:
        assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


# ---------------------------------------------------------------------------------------------------------------
# Patch / unpatch
# ---------------------------------------------------------------------------------------------------------------


@needs_trl
def test_patch_is_reversible_and_idempotent():
    compute_loss = GRPOTrainer.__dict__["_compute_loss"]
    get_logps = GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"]

    fused_trl.patch_grpo_trainer()
    fused_trl.patch_grpo_trainer()  # a second call does not wrap twice
    assert isinstance(trl_utils._ChunkedLogProbFunction, fused_trl.FusedChunkedLogProb)
    assert trl_utils._ChunkedLogProbFunction.original is ChunkedLogProbFunction
    assert GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"].__wrapped__ is get_logps
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss
    assert fused_trl.patched_state() == {"loss": False, "backbone": False}

    fused_trl.patch_grpo_trainer(loss=True)
    assert GRPOTrainer.__dict__["_compute_loss"].__wrapped__ is compute_loss
    assert fused_trl.patched_state() == {"loss": True, "backbone": False}
    fused_trl.patch_grpo_trainer(loss=False)
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss

    with fused_trl.grpo_trainer_patched(loss=True):
        assert fused_trl.patched_state() == {"loss": True, "backbone": False}
    assert fused_trl.patched_state() == {"loss": False, "backbone": False}  # the state before the with-block

    init = GRPOTrainer.__dict__["__init__"]
    fused_trl.patch_grpo_trainer(backbone=True)
    assert GRPOTrainer.__dict__["__init__"].__wrapped__ is init
    assert fused_trl.patched_state() == {"loss": False, "backbone": True}
    fused_trl.patch_grpo_trainer()
    assert GRPOTrainer.__dict__["__init__"] is init

    fused_trl.unpatch_grpo_trainer()
    fused_trl.unpatch_grpo_trainer()
    assert fused_trl.patched_state() is None
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert GRPOTrainer.__dict__["_get_per_token_logps_and_entropies"] is get_logps
    assert GRPOTrainer.__dict__["_compute_loss"] is compute_loss


# ---------------------------------------------------------------------------------------------------------------
# The replaced kernel call, against TRL's kernel
# ---------------------------------------------------------------------------------------------------------------


def _kernel_inputs(n=37, hidden_size=24, vocab=301, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


def _run(apply, hidden, weight, bias, targets, *, temperature, softcap, logit_scale, outputs, frozen=False):
    """(outputs, grads of hidden / weight / bias) of sum(logp * g1 + entropy * g2)."""
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen),
              None if bias is None else bias.clone().requires_grad_()]
    result = apply(leaves[0], leaves[1], leaves[2], targets, temperature, 32768, softcap, logit_scale, outputs)
    g = torch.Generator().manual_seed(1)
    objective = (result[0] * torch.randn(result[0].shape, generator=g)).sum()
    if result[1] is not None:
        objective = objective + (result[1] * torch.randn(result[1].shape, generator=g)).sum()
    if objective.requires_grad:
        objective.backward()
    return result, [None if t is None else t.grad for t in leaves]


@needs_trl
@pytest.mark.parametrize("bias, softcap, logit_scale, temperature, frozen, outputs", [
    (False, None, 1.0, 1.0, False, ("log_probs", "entropy")),
    (True, 3.0, 0.5, 0.7, False, ("log_probs", "entropy")),
    (False, 2.0, 1.0, 1.3, True, ("log_probs",)),
    (True, None, 2.0, 0.9, True, ("log_probs", "entropy")),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_apply_matches_trl_kernel(calls, use_backend, backend, bias, softcap, logit_scale, temperature, frozen,
                                        outputs):
    use_backend(backend)
    inputs = _kernel_inputs(bias=bias)
    options = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, outputs=outputs, frozen=frozen)
    want, want_grads = _run(ChunkedLogProbFunction.apply, *inputs, **options)
    with fused_trl._grpo_scope():
        got, got_grads = _run(fused_trl.FusedChunkedLogProb(ChunkedLogProbFunction).apply, *inputs, **options)
    assert calls["token_logprobs"] == 1

    assert len(got) == 5 and got[2:] == (None, None, None)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if "entropy" in outputs:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    else:
        assert got[1] is None and want[1] is None
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        if w is None:
            assert g is None, f"{name} got a gradient it should not have"
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"d/d{name}")
    if frozen:
        assert got_grads[1] is None


@needs_trl
def test_fused_apply_no_valid_token_stays_differentiable():
    """TRL keeps an all-masked micro-batch connected to the model (a zero loss must still backward)."""
    hidden, weight, _, targets = _kernel_inputs(n=0)
    hidden.requires_grad_()
    with fused_trl._grpo_scope():
        logp, entropy, *_ = fused_trl.FusedChunkedLogProb(ChunkedLogProbFunction).apply(
            hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
    assert logp.shape == entropy.shape == (0,) and logp.requires_grad
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape


@needs_trl
def test_fused_apply_under_bf16_autocast(calls):
    """TRL projects in the autocast dtype: so does the patch (bf16 inputs), accumulating in fp32, so that it
    is at least as close as TRL's kernel to the exact log-probs of the bf16-rounded inputs."""
    hidden, weight, _, targets = _kernel_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.8, 32768, None, 1.0,
                                            ("log_probs", "entropy"))
        with fused_trl._grpo_scope():
            got = fused_trl.FusedChunkedLogProb(ChunkedLogProbFunction).apply(
                hidden, weight, None, targets, 0.8, 32768, None, 1.0, ("log_probs", "entropy"))
    assert calls["token_logprobs"] == 1
    logits = hidden.bfloat16().double() @ weight.bfloat16().double().T / 0.8
    exact = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert got[0].dtype == want[0].dtype == torch.float32
    fused_error, trl_error = (got[0] - exact).abs().max().item(), (want[0] - exact).abs().max().item()
    assert fused_error <= trl_error + 1e-6 and fused_error < 1e-4


@needs_trl
def test_other_callers_and_outputs_keep_trl_kernel(calls):
    """Outside GRPOTrainer (SFT, DPO, ... use the same fused LM head), or for outputs fusedrl does not
    compute, the call goes to TRL's kernel unchanged."""
    hidden, weight, _, targets = _kernel_inputs()
    shim = fused_trl.FusedChunkedLogProb(ChunkedLogProbFunction)
    args = (hidden, weight, None, targets, 1.0, 32768, None, 1.0)
    want = ChunkedLogProbFunction.apply(*args, ("log_probs", "entropy"))
    got = shim.apply(*args, ("log_probs", "entropy"))
    with fused_trl._grpo_scope():
        got_top1 = shim.apply(*args, ("log_probs", "is_top1"))
    assert calls["token_logprobs"] == 0
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got_top1[4] is not None and got_top1[4].dtype == torch.bool


# ---------------------------------------------------------------------------------------------------------------
# GRPOTrainer's log-prob method: the patched forward against TRL's, values and gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    if not TRL_SUPPORTED:
        pytest.skip(f"needs trl{fused_trl.SUPPORTED_TRL}")
    return make_trainer(model_dir, tmp_path_factory.mktemp("unit_trainer"), num_generations=2,
                        per_device_train_batch_size=2, gradient_accumulation_steps=1)


def _batch(seed=0, batch=3, prompt_len=5, completion_len=6):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(3, VOCAB, (batch, completion_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -3:] = 0  # an early eos
    completion_mask[2, -1:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _logps_and_grads(trainer, input_ids, attention_mask, logits_to_keep):
    trainer.model.zero_grad(set_to_none=True)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
    g = torch.Generator().manual_seed(2)
    ((logps * torch.randn(logps.shape, generator=g)).sum()
     + (entropies * torch.randn(entropies.shape, generator=g)).sum()).backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), grads


@needs_trl
@pytest.mark.parametrize("frozen_head", [False, True])
def test_patched_logps_and_grads_match_trl(trainer, calls, frozen_head):
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    head = trainer.model.get_output_embeddings().weight
    head.requires_grad_(not frozen_head)
    try:
        want = _logps_and_grads(trainer, input_ids, attention_mask, completion_ids.size(1))
        fused_trl.patch_grpo_trainer()
        got = _logps_and_grads(trainer, input_ids, attention_mask, completion_ids.size(1))
    finally:
        head.requires_grad_(True)
    assert calls["token_logprobs"] == 1

    assert got[0].dtype == want[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # TRL's zeros where the completion is padding
    assert (got[0][completion_mask == 0] == 0).all() and (got[1][completion_mask == 0] == 0).all()
    assert got[2].keys() == want[2].keys()
    assert ("lm_head.weight" in got[2]) == (not frozen_head)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# GRPOTrainer's loss through fusedrl.kernels.grpo_loss
# ---------------------------------------------------------------------------------------------------------------

LOSS_CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="dapo", training=False),
    dict(loss_type="grpo"),
    dict(loss_type="bnpo", delta=1.1),  # delta < 1 + eps_high: TRL's clip metrics use the clamped ratio
    dict(loss_type="dr_grpo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence", token_advantages=True),
    dict(loss_type="cispo", epsilon_high=1.1),
    dict(loss_type="sapo", beta=0.0),
    dict(loss_type="dapo", use_bias_correction_kl=False, tool_mask=True),
]


def _loss_inputs(trainer, *, token_advantages=False, tool_mask=False):
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(seed=3)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, torch.cat([prompt_mask, completion_mask], 1), completion_ids.size(1))
    g = torch.Generator().manual_seed(4)
    shape = completion_ids.shape
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(shape if token_advantages else shape[:1], generator=g),
        # Spread around the current log-probs, so that ratios fall on both sides of the clip range.
        "old_per_token_logps": logps + 0.4 * torch.randn(shape, generator=g),
        "ref_per_token_logps": logps + 0.3 * torch.randn(shape, generator=g),
        "num_items_in_batch": completion_mask.sum() * 2,
    }
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(shape, generator=g) > 0.3).long()
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._metrics["eval"].clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    if loss.requires_grad:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {mode: dict(values) for mode, values in trainer._metrics.items()}
    return loss.detach(), grads, metrics


@needs_trl
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_patched_loss_matches_trl(trainer, calls, monkeypatch, case):
    case = dict(case)
    training = case.pop("training", True)
    token_advantages, tool_mask = case.pop("token_advantages", False), case.pop("tool_mask", False)
    for name in ("delta", "use_bias_correction_kl"):
        if name in case:
            monkeypatch.setattr(trainer.args, name, case.pop(name))
    for name, value in case.items():
        monkeypatch.setattr(trainer, name, value)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 2, raising=False)
    monkeypatch.setattr(trainer.args, "steps_per_generation", 4)
    inputs = _loss_inputs(trainer, token_advantages=token_advantages, tool_mask=tool_mask)
    trainer.model.train(training)
    try:
        want = _loss_and_grads(trainer, inputs)
        fused_trl.patch_grpo_trainer(loss=True)
        got = _loss_and_grads(trainer, inputs)
    finally:
        trainer.model.train(True)
    assert calls["grpo_loss"] == 1 and calls["token_logprobs"] == 1

    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-6, rtol=1e-4, msg=name)
    for mode in want[2]:
        assert got[2][mode].keys() == want[2][mode].keys(), mode
        for key, values in want[2][mode].items():
            assert got[2][mode][key] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), key
    assert want[2]["train" if training else "eval"], "TRL logged no metric: the case tests nothing"


@needs_trl
def test_uncovered_loss_config_runs_trl_loss(trainer, calls, monkeypatch, caplog):
    """A configuration grpo_loss does not cover (here: the high-entropy token mask) runs TRL's own loss, and says
    so as a warning (printed with no logging configured)."""
    monkeypatch.setattr(trainer, "top_entropy_quantile", 0.5)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    monkeypatch.setattr(fused_trl, "_said", set())
    inputs = _loss_inputs(trainer)
    want = _loss_and_grads(trainer, inputs)
    fused_trl.patch_grpo_trainer(loss=True)
    with caplog.at_level("WARNING", logger="fusedrl"):
        got = _loss_and_grads(trainer, inputs)
    assert any(r.levelname == "WARNING" and "top_entropy_quantile < 1" in r.getMessage() for r in caplog.records)
    assert calls["grpo_loss"] == 0 and calls["token_logprobs"] == 1
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert got[2]["train"].keys() == want[2]["train"].keys()


# ---------------------------------------------------------------------------------------------------------------
# A real GRPOTrainer run, patched and unpatched, with the same seed
# ---------------------------------------------------------------------------------------------------------------

RUN_CONFIGS = {
    "dapo-token": dict(loss_type="dapo"),
    # Two iterations per generation: old log-probs are computed too, and ratios move away from 1.
    "grpo-sequence-2iter": dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2),
}


@pytest.fixture(scope="module")
def baseline_runs(model_dir, tmp_path_factory):
    """Unpatched runs, computed once per configuration."""
    cache = {}

    def get(name):
        if name not in cache:
            fused_trl.unpatch_grpo_trainer()
            cache[name] = _train(make_trainer(model_dir, tmp_path_factory.mktemp(f"base_{name}"), **RUN_CONFIGS[name]))
        return cache[name]

    return get


def _train(trainer):
    trainer.train()
    history = [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in trainer.state.log_history]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return history, trainer.recorded, params


@needs_trl
@pytest.mark.slow
@pytest.mark.parametrize("loss, backbone", [(False, False), (True, False), (True, True)],
                         ids=["logprobs", "logprobs+loss", "logprobs+loss+backbone"])
@pytest.mark.parametrize("config", list(RUN_CONFIGS))
def test_grpo_trainer_run_matches_unpatched(model_dir, tmp_path, baseline_runs, calls, config, loss, backbone):
    want_history, want_recorded, want_params = baseline_runs(config)
    initial = dict(transformers.AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    calls["token_logprobs"] = calls["grpo_loss"] = 0
    with fused_trl.grpo_trainer_patched(loss=loss, backbone=backbone):
        trainer = make_trainer(model_dir, tmp_path, **RUN_CONFIGS[config])
        got_history, got_recorded, got_params = _train(trainer)
    # backbone: the policy and TRL's reference model (full fine-tuning, beta > 0) both on the fused modules (TRL
    # sets the models' own forward on the instance: its fused LM head)
    for model in (trainer.model, trainer.ref_model):
        assert sum(m.__dict__.get("_fusedrl_backbone", False) for m in model.modules()) == (5 + 2 if backbone else 0)
    # Every log-prob call (policy, reference model, old policy) went through fusedrl, and the loss did if asked.
    assert calls["token_logprobs"] >= len(got_recorded) > 0
    assert (calls["grpo_loss"] > 0) == loss

    assert len(got_history) == len(want_history) == 4  # 3 steps and the summary
    for step, (got, want) in enumerate(zip(got_history, want_history)):
        assert got.keys() == want.keys(), step
        for key, value in want.items():
            if isinstance(value, (int, float)):
                assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-6), (step, key, got[key], value)
    assert {"loss", "kl", "entropy", "clip_ratio/region_mean"} <= want_history[1].keys()
    assert want_history[1]["kl"] > 0  # the policy has moved away from the reference model

    assert len(got_recorded) == len(want_recorded)
    for (got_logps, got_entropies), (want_logps, want_entropies) in zip(got_recorded, want_recorded):
        torch.testing.assert_close(got_logps, want_logps, atol=1e-4, rtol=1e-4)
        if want_entropies is not None:
            torch.testing.assert_close(got_entropies, want_entropies, atol=1e-4, rtol=1e-4)
    for name in want_params:
        # Adam turns gradient entries that are ~0 up to rounding into steps of +-lr, so the runs' parameters are
        # compared relative to how far training moved them.
        moved = (want_params[name] - initial[name]).norm()
        assert (got_params[name] - want_params[name]).norm() <= 1e-3 * moved + 1e-7, name
