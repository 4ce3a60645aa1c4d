"""The policy of LLM GRPO: a Hugging Face causal LM (LoRA via peft, or fully fine-tuned), how to get its final
hidden states without computing logits, and the log-probs / GRPO loss from them through the fused kernels.

    policy = Policy.from_pretrained("Qwen/Qwen2.5-0.5B", lora=LoraSpec(rank=16), device="cuda", dtype=torch.bfloat16)
    logp = policy.logprobs(batch)                    # [rows, C] fp32, never the [rows, C, V] logits
    loss, metrics = policy.grpo_loss(batch, advantages, old_logp, ref_logp, loss_type="dapo")

The hidden states come from the decoder stack (`getattr(causal_lm, causal_lm.base_model_prefix)`), i.e. the
model's own forward without its LM head; the head's weight (and bias, softcapping and logit scale, when the
architecture has them) go to `fusedrl.kernels.token_logprobs` / `fused_linear_grpo_loss`. Position ids are
computed from the attention mask (left padding), as `generate` computes them.

The KL reference: with LoRA, the same model with the adapter disabled (`disable_adapter()`), so no second copy
of the weights; for full fine-tuning, a frozen copy made before training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusedrl.kernels import fused_linear_grpo_loss, token_logprobs

from ..checkpointing import unwrapped_name
from ..distributed import (
    fsdp_unsharded,
    load_optimizer_state,
    optimizer_state,
    parameters_on_meta,
    patch_backbones,
    rank_and_world,
    shard_from_rank0,
    shard_like,
    whole_on_rank0,
)

log = logging.getLogger("fusedrl")

__all__ = ["LoraSpec", "Policy", "SeqBatch", "disable_dropout"]


@dataclass
class LoraSpec:
    """LoRA settings (peft)."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: "all-linear"


@dataclass
class SeqBatch:
    """Rows of prompt + completion: prompt_ids / prompt_mask [B, P] (left padded), completion_ids /
    completion_mask [B, C] (right padded)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def trimmed(self) -> SeqBatch:
        """The same rows without columns that are padding in every row (left of the prompts, right of the
        completions), so a micro-batch pays only for its own longest row."""
        p_keep = int(self.prompt_mask.sum(1).max().item()) if self.prompt_mask.numel() else 0
        c_keep = int(self.completion_mask.sum(1).max().item()) if self.completion_mask.numel() else 0
        p_keep, c_keep = max(p_keep, 1), max(c_keep, 1)
        P = self.prompt_ids.shape[1]
        return SeqBatch(self.prompt_ids[:, P - p_keep:], self.prompt_mask[:, P - p_keep:],
                        self.completion_ids[:, :c_keep], self.completion_mask[:, :c_keep])

    def select(self, rows) -> SeqBatch:
        return SeqBatch(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                        self.completion_mask[rows])


def disable_dropout(model: nn.Module) -> int:
    """Set p = 0 on every dropout module (and `attention_dropout` config-driven attention dropout); returns how
    many modules were changed."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p != 0:
            module.p = 0.0
            n += 1
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)
    return n


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft / DDP / compiled wrapper."""
    for _ in range(5):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the causal LM without its head) that returns `last_hidden_state`."""
    lm = _causal_lm(model)
    prefix = getattr(lm, "base_model_prefix", "model")
    decoder = getattr(lm, prefix, None)
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise TypeError(f"{type(lm).__name__}: cannot find the decoder stack (no submodule {prefix!r}); fusedrl's "
                        "LLM GRPO needs a transformers causal LM")
    return decoder


def head_of(model: nn.Module) -> tuple[nn.Module, float | None, float | None]:
    """(the LM head module, softcap or None, logit scale or None) of a causal LM."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(lm).__name__} has no output embeddings with a weight (get_output_embeddings())")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError("the LM head carries a LoRA adapter; the fused loss reads the head's weight directly, so "
                         "remove lm_head from lora.target_modules (or train it with full fine-tuning)")
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        scale = None
    return head, (float(softcap) if softcap else None), (float(scale) if scale not in (None, 1, 1.0) else None)


def context_length(config) -> int | None:
    """The longest sequence a model config allows (max_position_embeddings, n_positions, ...), or None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Policy:
    """A causal LM being trained with GRPO: log-probs and the GRPO loss from hidden states and the LM head.

    model: the (peft-wrapped) causal LM; ref_model: a frozen copy for full fine-tuning with beta > 0 (None with
    LoRA, where the reference is the adapter-off model); temperature: the sampling temperature."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, ref_model: nn.Module | None = None,
                 temperature: float = 1.0):
        self.model = model
        self.tokenizer = tokenizer
        self.ref_model = ref_model
        self.temperature = float(temperature)
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        head_of(model)  # refuse a LoRA'd head now rather than at the first step
        self.forward_module = PolicyForward(model, self.temperature)
        self.ref_forward = PolicyForward(ref_model, self.temperature) if ref_model is not None else None
        self.engine: nn.Module = self.forward_module  # or its DDP wrapper (parallelize)
        self.strategy: str | None = None
        self.world_size = 1
        self.backbone_patch = None  # what fuse_backbone() fused in the model (its summary() for a log)
        # FSDP2 (parallelize("fsdp")) gives every process its shards of rank 0's weights; True on every process when
        # the others built the model with its parameters on the meta device (from_pretrained(weights_from_rank0=True))
        self.weights_from_rank0 = False

    def fuse_backbone(self) -> None:
        """Run the model, and the reference copy of full fine-tuning, on `fusedrl.patch_backbone` (same numbers,
        same speed and memory for both). Before `parallelize`: the patch probes each module on two rows. A
        collective when the weights come from rank 0 (`from_pretrained(weights_from_rank0=True)`): the processes
        that hold none replay rank 0's probes, so every process fuses the same modules."""
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.backbone_patch = patch_backbones(models, weights_from_rank0=self.weights_from_rank0)[0]

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, lora: LoraSpec | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, reference: bool = False, temperature: float = 1.0,
                        revision: str | None = None, trust_remote_code: bool = False,
                        attn_implementation: str | None = None, no_dropout: bool = True,
                        tokenizer: Any = None, weights_from_rank0: bool = False) -> Policy:
        """Load a causal LM with `AutoModelForCausalLM.from_pretrained`, put LoRA on it (or keep it fully
        trainable), and make the frozen reference copy when `reference` is asked for full fine-tuning.

        weights_from_rank0: full fine-tuning under torchrun, to be sharded by `parallelize("fsdp")`: only rank 0
            reads the weights (onto `device`); the other processes build the model from its config with the
            parameters on the meta device, and FSDP2 gives each its shards of rank 0's (one host copy of a 14B model
            and its reference, 112 GB, instead of one per process).
        """
        import transformers

        if weights_from_rank0 and lora is not None:
            raise ValueError("weights_from_rank0 is for full fine-tuning sharded by FSDP2 (lora=None)")
        kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if weights_from_rank0 and rank_and_world()[0] != 0:
            model = _model_without_weights(name_or_path, kwargs)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)
        if tokenizer is None:
            tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        policy = cls.from_model(model, tokenizer, lora=lora, reference=reference, temperature=temperature,
                                no_dropout=no_dropout)
        policy.weights_from_rank0 = weights_from_rank0
        return policy

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None, *, lora: LoraSpec | None = None,
                   reference: bool = False, temperature: float = 1.0, no_dropout: bool = True) -> Policy:
        """Wrap an already loaded causal LM (LoRA added when `lora` is given; full fine-tuning otherwise, with a
        frozen reference copy when `reference`)."""
        if no_dropout:
            disable_dropout(model)
        ref_model = None
        if lora is not None:
            model = add_lora(model, lora)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            if reference:
                ref_model = copy.deepcopy(model).eval()
                for p in ref_model.parameters():
                    p.requires_grad_(False)
        return cls(model, tokenizer, ref_model=ref_model, temperature=temperature)

    # ------------------------------------------------------------------------------------------ forward

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """name -> tensor of every trainable parameter (LoRA weights, or the whole model); names as in the model
        without activation-checkpointing wrappers, so a checkpoint loads with or without them."""
        return {unwrapped_name(n): p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {unwrapped_name(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(f"the checkpoint's tensors do not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]} (was it saved with other LoRA settings?)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shard_like(tensors[name], p))  # an FSDP2 shard takes this process's part

    def _forward_module(self, reference: bool) -> nn.Module:
        if not reference:
            return self.engine
        if self.ref_model is not None:
            return self.ref_forward
        if self.is_peft:
            return self.forward_module  # called inside disable_adapter(); no gradient, so no DDP needed
        raise ValueError("no reference model: full fine-tuning needs a frozen copy (reference=True)")

    def logprobs(self, batch: SeqBatch, *, reference: bool = False,
                 with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, C] fp32 log-probs of the completion tokens (0 where the completion mask is 0), through
        `token_logprobs` (no [B, C, V] logits); `reference`: under the adapter-off model or the frozen copy."""
        ctx: Any = self.model.disable_adapter() if reference and self.ref_model is None and self.is_peft \
            else contextlib.nullcontext()
        module = self._forward_module(reference)
        with ctx:
            out = module(*_inputs(batch), what="logprobs", with_entropy=with_entropy)
        if self.strategy == "fsdp" and not torch.is_grad_enabled():
            # FSDP2 leaves the root's parameters (embeddings, norm, LM head) gathered after a forward with no
            # backward to reshard them: ~2 GB per GPU for a 7B model's reference, held for the rest of the run
            module.reshard()
        return out

    def grpo_loss(self, batch: SeqBatch, advantages: torch.Tensor, old_logp: torch.Tensor | None,
                  ref_logp: torch.Tensor | None, **loss_options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GRPO loss of these rows through `fused_linear_grpo_loss` (hidden states + LM head), through DDP /
        FSDP2 when the policy is parallelized."""
        return self.engine(*_inputs(batch), what="loss", advantages=advantages, old_logp=old_logp,
                           ref_logp=ref_logp, loss_options=loss_options)

    # ------------------------------------------------------------------------------------------ several processes

    def parallelize(self, strategy: str, device: torch.device) -> None:
        """Spread training over the processes of the default process group: "ddp" (DistributedDataParallel over
        the trainable weights; LoRA) or "fsdp" (FSDP2 `fully_shard` of every decoder layer and of the rest,
        reference copy included; full fine-tuning). The LM head's weight is read inside the sharded root's
        forward, where FSDP2 has gathered it, so the fused loss sees the whole [V, H] matrix and its gradient is
        reduce-scattered like any other."""
        import torch.distributed as dist

        if strategy == "ddp":
            from ..distributed import ddp_wrap

            self.engine = ddp_wrap(self.forward_module, device)
        elif strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            def shard(forward: nn.Module) -> None:
                for layer in _decoder_layers(forward.model):
                    fully_shard(layer)
                fully_shard(forward)

            for forward in [self.forward_module] + ([self.ref_forward] if self.ref_model is not None else []):
                # every process gets its shards of rank 0's weights, one whole tensor on the GPU at a time
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    shard_from_rank0(forward, shard, device)
                with torch.no_grad():  # the root's lazy init must come before generate() runs a layer alone
                    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
                    ones = torch.ones_like(ids)
                    forward(ids[:, :1], ones[:, :1], ids[:, 1:], ones[:, 1:], what="logprobs")
                forward.reshard()  # FSDP2 keeps the root gathered after its forward; free it until it is needed
            self.engine = self.forward_module
        else:
            raise ValueError(f"strategy must be 'ddp' or 'fsdp'; got {strategy!r}")
        self.strategy = strategy
        self.world_size = dist.get_world_size()

    def no_sync(self) -> Any:
        """A context in which backward accumulates gradients locally (all but the last micro-batch). Under DDP only:
        FSDP2 reduce-scatters at every backward, since accumulating unsynchronised would hold every parameter's
        whole gradient on each GPU (15 GB for a 7B model), which sharding is there to avoid."""
        if self.strategy == "ddp":
            return self.engine.no_sync()
        return contextlib.nullcontext()

    def generation_context(self) -> Any:
        """Around `generate`: under FSDP2 the root's parameters (embeddings, final norm, LM head) are gathered
        for the duration (each layer gathers its own as it runs)."""
        if self.strategy == "fsdp":
            return fsdp_unsharded(self.forward_module)
        return contextlib.nullcontext()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors as whole CPU tensors on rank 0, {} on the other processes (a collective under
        FSDP2: call it on every process)."""
        return whole_on_rank0(self.trainable_state().items())

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict, whole (a collective under FSDP2: call it on every process)."""
        return optimizer_state(optimizer, self.model if self.strategy == "fsdp" else None)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        load_optimizer_state(optimizer, state, self.model if self.strategy == "fsdp" else None)

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, folder, *, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer: bool = True) -> None:
        """Write the adapter (peft format) or, for full fine-tuning, the model, plus the tokenizer. Under FSDP2
        pass the gathered `full_state()` as state_dict (rank 0 writes it)."""
        if state_dict is not None and not self.is_peft:
            self.model.save_pretrained(str(folder), state_dict=state_dict)
        elif self.is_peft:
            from ..checkpointing import wrappers_lifted

            with wrappers_lifted(self.model):  # else peft leaves out the LoRA layers of checkpointed layers
                self.model.save_pretrained(str(folder))
        else:
            self.model.save_pretrained(str(folder))
        if tokenizer and self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))


def _inputs(batch: SeqBatch) -> tuple[torch.Tensor, ...]:
    return batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask


class PolicyForward(nn.Module):
    """The policy's training forward as one module: the decoder's hidden states at the completion positions, then
    the LM head through the fused kernels (log-probs, or the GRPO loss). One module so that DDP and FSDP2 hooks
    run around all of it: FSDP2 gathers the head's weight for the fused loss as for any layer."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def hidden_states(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """[B, C, H] final hidden states at the positions that predict the completion tokens (position ids from
        the attention mask, as generate computes them for left-padded prompts)."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = decoder_of(self.model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                     use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        P, C = prompt_ids.shape[1], completion_ids.shape[1]
        return hidden[:, P - 1:P + C - 1]

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, *, what: str = "loss",
                advantages=None, old_logp=None, ref_logp=None, loss_options=None, with_entropy: bool = False):
        hidden = self.hidden_states(prompt_ids, prompt_mask, completion_ids, completion_mask)
        head, softcap, scale = head_of(self.model)
        weight, bias = head.weight, getattr(head, "bias", None)
        if scale is not None:
            hidden = hidden * scale
        if what == "logprobs":
            labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))
            return token_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature, softcap=softcap,
                                  return_entropy=with_entropy)
        return fused_linear_grpo_loss(hidden, weight, completion_ids, advantages, completion_mask,
                                      old_logp=old_logp, ref_logp=ref_logp, bias=bias, temperature=self.temperature,
                                      softcap=softcap, **(loss_options or {}))


def _model_without_weights(name_or_path: str, kwargs: dict[str, Any]) -> nn.Module:
    """The causal LM `from_pretrained(name_or_path, **kwargs)` would load, built from its config with the parameters
    on the meta device (buffers real): what a process that takes its weights from rank 0 holds until then."""
    import transformers

    hub = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    config = transformers.AutoConfig.from_pretrained(name_or_path, **hub)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(
            config, **{k: v for k, v in kwargs.items() if k != "revision"})
    model.eval()  # as from_pretrained leaves it
    # generate() reads its defaults (eos / pad ids, sampling settings) from here, as from_pretrained sets them; with no
    # generation_config.json, from_pretrained too keeps the one derived from the config
    with contextlib.suppress(OSError):
        model.generation_config = transformers.GenerationConfig.from_pretrained(name_or_path,
                                                                                revision=kwargs.get("revision"))
    real = [n for n, p in model.named_parameters() if not p.is_meta]
    if real:
        raise RuntimeError(f"{type(model).__name__} built on the meta device holds real parameters ({real[0]}, ...)")
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (transformers' GradientCheckpointingLayer, else the ModuleList of the
    decoder), for per-layer FSDP2 sharding."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    lists = [m for m in decoder_of(model).modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TypeError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(max(lists, key=len))


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer, left-padding, with a pad token (EOS when it has none).

    A local folder whose tokenizer was saved as a generic fast tokenizer (tokenizer_config.json's tokenizer_class
    "TokenizersBackend" / "PreTrainedTokenizerFast", e.g. the embedded default's character tokenizer) loads as one:
    transformers 5's AutoTokenizer builds the model type's class instead (a Qwen2Tokenizer for a Qwen2 config),
    whose own pre-tokenization dropped the spaces of such a vocabulary."""
    import json

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                     trust_remote_code=trust_remote_code)
    generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
    saved = os.path.join(str(name_or_path), "tokenizer_config.json")
    if os.path.isfile(saved) and type(tok).__name__ not in generic:
        with open(saved, encoding="utf-8") as f:
            if json.load(f).get("tokenizer_class") in generic:
                tok = transformers.PreTrainedTokenizerFast.from_pretrained(name_or_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path} has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """`peft.get_peft_model` with LoRA on `spec.target_modules` (default: every linear layer but the head)."""
    try:
        import peft
    except ModuleNotFoundError as exc:
        raise ImportError("LoRA needs the peft package (pip install peft), or use full fine-tuning "
                          "(--no-lora.enabled)") from exc
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha if spec.alpha is not None else 2 * spec.rank,
                          lora_dropout=spec.dropout, target_modules=spec.target_modules or "all-linear",
                          task_type="CAUSAL_LM", bias="none")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D layers
        return peft.get_peft_model(model, cfg)
