"""End-to-end training steps: fusedrl's path against the same step written plainly in PyTorch, as the research
repositories and TRL write it. Models have random weights from configs (nothing is downloaded); the peak
memory column is the point as much as the time.

Ops (mode "train": the forward and backward of one optimizer step, without the optimizer update):
- diffusion_grpo_step: Flow-GRPO's training pass over T trained timesteps of a micro-batch of B images on an
  SD3-shaped transformer with LoRA (rank 8 on the attention projections), CFG as one batched call of 2B:
  for each timestep the velocity, the SDE step's log-prob of the recorded next latents, the clipped GRPO loss,
  backward. "eager" (the plain loop): diffusers' attention, Flow-GRPO's formula in eager ops
  (`reference.flow_sde_step`), the clipped loss in torch ops. "fusedrl": `flow_sde_step` and `grpo_loss`;
  "fusedrl_save_attention" / "fusedrl_full": with those checkpointing policies on the transformer blocks;
  "fusedrl_full_half": "full" on the first half of the blocks only (`memory.checkpoint_blocks`), the other half
  keeping their activations: the memory-for-time trade between "fusedrl" and "fusedrl_full";
  "fusedrl_backbone" / "fusedrl_backbone_save_attention": "fusedrl" / "fusedrl_save_attention" with the LoRA
  linears (and the q-k RMSNorms) on `fusedrl.patch_backbone`, the trainers' default (model.fused_backbone).
  Shapes: default SD3.5-Medium-sized (24 layers, width 1536, dual attention in the first 13) at 512 px
  (64 x 64 latents), B = 8 (one group), T = 2; small: a 2-layer width-32 model, 16 x 16 latents, B = 2, T = 2.
- reward_backprop_step: DRaFT-K on an SD1.5-shaped UNet (LoRA) with DDIM (eta 1, CFG 7.5 as one call of 2B):
  K denoising steps with gradient from noise, the loss the mean of the final latents' squares (the reward's
  place), backward through all K. "eager": the plain loop, DDPO's formula in eager ops, no checkpointing
  (memory grows with K; at real size it may not fit, and its row says so); "fusedrl": the `ddim_step` kernel,
  every step checkpointed ("full"), as `engine.diffusion.differentiable` runs it; "fusedrl_backbone": the same with
  the LoRA linears on `fusedrl.patch_backbone`. Shapes: default SD1.5-sized
  (860M) at 512 px, B = 1, K = 50 (DRaFT through all 50 steps); small: a 2-level width-16 UNet, B = 1, K = 4.
- llm_grpo_step: the GRPO ("dapo") loss of B completions of T tokens after a P-token prompt, on a causal LM with
  LoRA on the attention projections (and, on a GPU, activation checkpointing of every layer: TRL's default),
  on policy. "eager": the model's logits [B, T, V] in fp32, log_softmax + gather, the loss in torch ops;
  "trl": TRL 1.16's training path (`add_fused_lm_head`: the backbone's hidden states at the scored positions
  through its chunked `ChunkedLogProbFunction`, log-probs and entropy), the same loss; "fusedrl": the hidden
  states through `fused_linear_grpo_loss` (log-probs, entropy and loss; no [B, T, V] logits);
  "fusedrl_fused": the same with token_logprobs' fused strategy (the default is chunked on a GPU);
  "fusedrl_offload": "fusedrl" with fusedrl's own checkpointing of the layers in place of transformers' ("full",
  the layers' inputs kept in pinned CPU memory between forward and backward: memory.offload_block_inputs; on the
  CPU, where the other providers run without checkpointing, it checkpoints and offloads nothing);
  "fusedrl_backbone" / "fusedrl_backbone_offload": "fusedrl" / "fusedrl_offload" with the decoder's RMSNorms,
  SwiGLU MLPs and LoRA linears fused (`fusedrl.patch_backbone`, the engine's default: model.fused_backbone). Every
  forward passes use_cache=False (without transformers' checkpointing a training forward would build a KV cache
  of every layer, as the engine's does not). Shapes
  (B x P x T x hidden size): default Qwen2.5-1.5B-shaped at 8 x 256 x 1024 and Llama-3.1-8B-shaped at
  8 x 256 x 4096 (issue 7's 40 GB target); small: a 2-layer width-64 Llama, 4 x 16 x 48.

bytes: the weights read once; flops: 2 x the forward FLOPs of every model call, counted by torch's
FlopCounterMode on the meta device (`counted`): the forward and the backward's activation gradients, the work
any implementation must do (LoRA's weight gradients and checkpointing's recomputation are not counted). The
fraction-of-ceiling column reads these steps against the bf16 matmul rate.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from fusedrl.kernels.logprobs.hidden_op import ENV_STRATEGY

from .. import trl_peer
from ..providers import EAGER, Impl, Skip
from . import Case, CaseConfig

# "eager" is the plain PyTorch loop (the baseline of the "vs eager" column)
DIFFUSION_PROVIDERS = (EAGER, "fusedrl", "fusedrl_save_attention", "fusedrl_full", "fusedrl_full_half",
                       "fusedrl_backbone", "fusedrl_backbone_save_attention")
# provider -> (checkpointing policy, checkpoint only the first half of the blocks)
DIFFUSION_POLICIES = {"fusedrl_save_attention": ("save_attention", False), "fusedrl_full": ("full", False),
                      "fusedrl_full_half": ("full", True), "fusedrl_backbone_save_attention": ("save_attention", False)}
BACKPROP_PROVIDERS = (EAGER, "fusedrl", "fusedrl_backbone")
BACKBONE = "fusedrl_backbone"  # providers named so also run on fusedrl.patch_backbone (the engines' default)
LLM_PROVIDERS = (EAGER, "trl", "fusedrl", "fusedrl_fused", "fusedrl_offload", "fusedrl_backbone",
                 "fusedrl_backbone_offload")
LLM_OFFLOAD = ("fusedrl_offload", "fusedrl_backbone_offload")
NOISE_LEVEL = 0.7
CLIP = 1e-4


def _use_backbone(model, provider: str) -> None:
    """The fused backbone on `model` for providers named fusedrl_backbone*, the stock modules for the others."""
    from fusedrl.backbone import patch_backbone, unpatch_backbone

    if provider.startswith(BACKBONE):
        patch_backbone(model)
    else:
        unpatch_backbone(model)


SD3_CONFIGS = {
    "default": dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "small": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                  pooled_projection_dim=32, pos_embed_max_size=16),
}
# (batch, latent side, text tokens, trained timesteps or K)
DIFFUSION_SHAPES = {"default": (8, 64, 333, 2), "small": (2, 16, 8, 2)}
BACKPROP_SHAPES = {"default": (1, 64, 77, 50), "small": (1, 16, 8, 4)}  # (batch, latent side, text tokens, K)
UNET_CONFIGS = {
    "default": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "small": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8),
}
# LLM cases: (model, B completions, prompt tokens P, completion tokens T); models: (transformers class, config)
LLM_MODELS = {
    "tiny-llama": ("LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                            tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                              tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                              tie_word_embeddings=False)),
}
LLM_CASES = {"default": [("qwen2.5-1.5b", 8, 256, 1024), ("llama-3.1-8b", 8, 256, 4096)],
             "small": [("tiny-llama", 4, 16, 48)]}
TRL_CHUNK = 4096  # TRL 1.16's _CHUNKED_LOGPROB_CHUNK_SIZE (trl.trainer.utils; not importable without datasets)


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise Skip(f"{module} is not installed") from exc


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- diffusion


@contextlib.contextmanager
def _built_as(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """Modules built inside are allocated on `device` in `dtype` from the start: an 8B model built in fp32 and
    cast would need 1.5x its bf16 size at once, and a CPU init of billions of weights takes minutes."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _denoiser(cls_name: str, config: dict, device: torch.device, dtype: torch.dtype):
    """A diffusers denoiser (`cls_name`) with random weights in `dtype`, built where it runs (a 2B-parameter init
    on the CPU takes most of a minute), with LoRA (fp32) on its attention projections."""
    _need("diffusers")
    _need("peft")
    import diffusers
    from peft import LoraConfig

    torch.manual_seed(0)
    with _built_as(device, dtype):
        model = getattr(diffusers, cls_name)(**config)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _velocity(model, x, t, emb, pooled, guidance: float = 4.5):
    """CFG as one batched call of 2B (Flow-GRPO's transformer call), the guided velocity in fp32."""
    dtype = next(model.parameters()).dtype
    xx, tt = torch.cat([x, x]).to(dtype), torch.cat([t, t])
    out = model(hidden_states=xx, timestep=tt, encoder_hidden_states=emb.to(dtype), pooled_projections=pooled.to(dtype),
                return_dict=False)[0].float()
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _plain_logp(x, v, sigma, sigma_next, prev):
    from fusedrl.kernels.diffusion_step import reference

    return reference.flow_sde_step(x, v, sigma, sigma_next, noise_level=NOISE_LEVEL, sde_type="sde",
                                   sigma_max=float("nan"), noise=None, prev_sample=prev, ref_mean=None,
                                   want_logp=True, out_dtype=torch.float32)[1]


def _plain_clipped_loss(logp, old, adv):
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
    return torch.maximum(unclipped, clipped).mean()


def _diffusion_setup(size: str, dtype: torch.dtype, device: torch.device) -> Callable[[str], Impl]:
    B, side, text, T = DIFFUSION_SHAPES[size]
    cfg = SD3_CONFIGS[size]
    model = _denoiser("SD3Transformer2DModel", SD3_CONFIGS[size], device, dtype)
    g = torch.Generator().manual_seed(1)
    C = cfg["in_channels"]
    lat = torch.randn((B, T + 1, C, side, side), generator=g).to(device)  # recorded latents of T steps
    emb = torch.randn((2 * B, text, cfg["joint_attention_dim"]), generator=g).to(device)
    pooled = torch.randn((2 * B, cfg["pooled_projection_dim"]), generator=g).to(device)
    sig = torch.linspace(0.9, 0.5, T + 1)
    adv = torch.randn((B,), generator=g).to(device)
    old = torch.zeros((B,), device=device)  # set below from the plain formula, so ratios are near 1

    def step(provider: str):
        from fusedrl.kernels import flow_sde_step, grpo_loss

        for i in range(T):
            x, prev = lat[:, i], lat[:, i + 1]
            s0 = torch.full((B,), float(sig[i]), device=device)
            s1 = torch.full((B,), float(sig[i + 1]), device=device)
            v = _velocity(model, x, s0 * 1000, emb, pooled)
            if provider == EAGER:
                loss = _plain_clipped_loss(_plain_logp(x, v, s0, s1, prev), old, adv)
            else:
                logp = flow_sde_step(x, v, s0, s1, noise_level=NOISE_LEVEL, prev_sample=prev).logp
                loss = grpo_loss(logp[:, None], old[:, None], adv, torch.ones_like(logp[:, None]), loss_type="grpo",
                                 eps_low=CLIP, eps_high=CLIP)[0]
            (loss / T).backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    with torch.no_grad():
        s0 = torch.full((B,), float(sig[0]), device=device)
        old.copy_(_plain_logp(lat[:, 0], _velocity(model, lat[:, 0], s0 * 1000, emb, pooled), s0,
                              torch.full((B,), float(sig[1]), device=device), lat[:, 1]))
    applied: dict[str, tuple[str, bool]] = {"policy": ("none", False)}

    def impl(provider: str) -> Impl:
        _use_backbone(model, provider)
        policy, half = DIFFUSION_POLICIES.get(provider, ("none", False))
        if (policy, half) != applied["policy"]:
            from fusedrl.engine.checkpointing import apply_checkpointing, remove_checkpointing
            from fusedrl.engine.diffusion.policy import block_names

            remove_checkpointing(model)
            if policy != "none":
                blocks = set(block_names(model))
                apply_checkpointing(model, policy, predicate=lambda name, _m: name in blocks,
                                    limit=max(1, len(blocks) // 2) if half else None)
            applied["policy"] = (policy, half)

        def fn():
            model.zero_grad(set_to_none=True)
            return step(provider)

        # Without checkpointing a real-size group may not fit the card: then the row says so (a skip, not a bug).
        return Impl(fn, inputs=(lat, emb, pooled), oom_is_skip=policy == "none" and device.type == "cuda",
                    report_resident=True)

    return impl


def _backprop_setup(size: str, dtype: torch.dtype, device: torch.device) -> Callable[[str], Impl]:
    from fusedrl.engine.checkpointing import checkpoint

    B, side, text, K = BACKPROP_SHAPES[size]
    cfg = UNET_CONFIGS[size]
    model = _denoiser("UNet2DConditionModel", UNET_CONFIGS[size], device, dtype)
    g = torch.Generator().manual_seed(2)
    C = cfg["in_channels"]
    x0 = torch.randn((B, C, side, side), generator=g).to(device)
    noise = torch.randn((K, B, C, side, side), generator=g).to(device)
    emb = torch.randn((2 * B, text, cfg["cross_attention_dim"]), generator=g).to(device)
    # DDIM over K of SD1.5's 1000 training steps (scaled-linear betas, steps_offset 1, set_alpha_to_one False:
    # the last step goes to alphas_cumprod[0], so every step has noise), t from high to low
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    stride = 1000 // K
    ts = torch.tensor([(K - 1 - i) * stride + 1 for i in range(K)])
    a_t = [float(alphas[t]) for t in ts]
    a_prev = [float(alphas[max(t - stride, 0)]) for t in ts.tolist()]

    def transition(provider: str, x, i):
        from fusedrl.kernels import ddim_step
        from fusedrl.kernels.diffusion_step import reference

        t = torch.full((2 * B,), int(ts[i]), device=device)
        out = model(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0].float()
        uncond, cond = out.chunk(2)
        eps = uncond + 7.5 * (cond - uncond)
        at = torch.full((B,), a_t[i], device=device)
        ap = torch.full((B,), a_prev[i], device=device)
        if provider == EAGER:
            return reference.ddim_step(eps, x, at, ap, eta=1.0, prediction_type="epsilon", clip_sample_range=None,
                                       use_clipped_model_output=False, noise=noise[i], prev_sample=None,
                                       ref_mean=None, want_logp=False, out_dtype=torch.float32)[0]
        # as engine.diffusion.differentiable does: the kernel's mean and std, plus the given noise
        st = ddim_step(eps, x, at, ap, eta=1.0, prev_sample=x)
        return st.mean + st.std.view(-1, 1, 1, 1) * noise[i]

    def impl(provider: str) -> Impl:
        _use_backbone(model, provider)

        def fn():
            model.zero_grad(set_to_none=True)
            x = x0
            for i in range(K):
                if provider == EAGER:
                    x = transition(provider, x, i)
                else:  # every denoising step checkpointed, as the reward-backprop trainer runs it
                    x = checkpoint(functools.partial(transition, provider), x, i, policy="full")
            x.float().square().mean().backward()
            return [p.grad for p in model.parameters() if p.requires_grad]

        # The plain loop keeps every step's activations: at real sizes it may not fit (then the row says so).
        return Impl(fn, inputs=(x0, noise, emb), oom_is_skip=provider == EAGER and device.type == "cuda",
                    report_resident=True)

    return impl


# ----------------------------------------------------------------------------------------------- LLM


def _llm(name: str, device: torch.device | str, dtype: torch.dtype | None = None):
    import transformers

    cls, cfg = LLM_MODELS[name]
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**cfg)
    with _built_as(device, dtype):
        return getattr(transformers, cls)(config)


def _dapo(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's "dapo" loss on policy (old = current log-probs, ratio 1), in torch ops: token-level, over the tokens."""
    ratio = torch.exp(logp - logp.detach())
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
    return (per_token * mask).sum() / mask.sum()


def _llm_setup(name: str, B: int, P: int, T: int, dtype: torch.dtype, device: torch.device) -> Callable[[str], Impl]:
    _need("transformers")
    _need("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _llm(name, device, dtype)
    if device.type == "cuda":  # TRL's GRPOConfig default, the same for every provider
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, P + T), generator=g).to(device)
    labels = ids[:, P:]
    mask = torch.ones((B, T), device=device)
    adv = torch.randn((B,), generator=g).to(device)
    base = model.get_base_model()
    offloading = {"on": False}

    def use_offload(on: bool) -> None:
        """fusedrl's checkpointing with the layers' inputs offloaded, or transformers' (TRL's default) back."""
        if on == offloading["on"]:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        from fusedrl.engine.checkpointing import apply_checkpointing, remove_checkpointing

        if on:
            if device.type == "cuda":
                model.gradient_checkpointing_disable()
            apply_checkpointing(base.model, "full", module_types=GradientCheckpointingLayer, offload_inputs=True)
        else:
            remove_checkpointing(base.model)
            if device.type == "cuda":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        offloading["on"] = on

    def impl(provider: str) -> Impl:
        from fusedrl.kernels import fused_linear_grpo_loss

        use_offload(provider in LLM_OFFLOAD)
        _use_backbone(model, provider)

        if provider == "trl":
            ChunkedLogProbFunction = trl_peer.chunked_logprob_function()

        def fn():
            model.zero_grad(set_to_none=True)
            if provider == EAGER:  # the logits [B, T, V] in fp32, log_softmax and gather
                # of the scored positions only (logits_to_keep, as TRL asks for them: not the prompt's)
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=labels.shape[1] + 1).logits[:, :-1]
                logits = logits.float()
                loss = _dapo(torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1), adv, mask)
            elif provider == "trl":  # TRL 1.16's fused LM head (add_fused_lm_head): its chunked kernel on the
                # scored positions, + entropy
                hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1:-1]
                keep = mask.bool()
                out = ChunkedLogProbFunction.apply(hidden[keep], base.lm_head.weight, None, labels[keep], 1.0,
                                                   TRL_CHUNK, None, 1.0, ("entropy",))
                logp = torch.zeros(mask.shape, dtype=out[0].dtype, device=device).masked_scatter(keep, out[0])
                loss = _dapo(logp.float(), adv, mask)
            else:
                hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1:-1]
                loss = fused_linear_grpo_loss(hidden, base.lm_head.weight, labels, adv, mask, with_entropy=True,
                                              loss_type="dapo")[0]
            loss.backward()
            return [p.grad for p in model.parameters() if p.requires_grad]

        # Without a fused head the [B, T, V] logits of a real-size case may not fit: then the row says so.
        env = {ENV_STRATEGY: "fused"} if provider == "fusedrl_fused" else {}
        return Impl(fn, env=env, inputs=(ids,), oom_is_skip=provider == EAGER and device.type == "cuda",
                    report_resident=True)

    return impl


# ----------------------------------------------------------------------------------------------- cases


@functools.cache
def counted(op: str, size: str) -> tuple[int, int]:
    """(parameters, forward FLOPs of one call) of the case's model at the case's shape, counted by torch's
    FlopCounterMode on the meta device (nothing allocated, nothing run). One call: the CFG batch of 2B for
    the diffusion models, B sequences of P + T tokens for the LM (`op`: the LM's name in LLM_MODELS)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        if op in LLM_MODELS:
            model = _llm(op, "meta")
            B, P, T = next((b, p, t) for name, b, p, t in LLM_CASES[size] if name == op)
            args, kwargs = (), {"input_ids": torch.zeros((B, P + T), dtype=torch.long)}
        elif op == "reward_backprop_step":
            import diffusers

            B, side, text, _ = BACKPROP_SHAPES[size]
            cfg = UNET_CONFIGS[size]
            model = diffusers.UNet2DConditionModel(**cfg)
            args = (torch.randn(2 * B, cfg["in_channels"], side, side), torch.full((2 * B,), 500))
            kwargs = {"encoder_hidden_states": torch.randn(2 * B, text, cfg["cross_attention_dim"])}
        else:
            import diffusers

            B, side, text, _ = DIFFUSION_SHAPES[size]
            cfg = SD3_CONFIGS[size]
            model = diffusers.SD3Transformer2DModel(**cfg)
            args, kwargs = (), {"hidden_states": torch.randn(2 * B, cfg["in_channels"], side, side),
                                "timestep": torch.full((2 * B,), 500.0),
                                "encoder_hidden_states": torch.randn(2 * B, text, cfg["joint_attention_dim"]),
                                "pooled_projections": torch.randn(2 * B, cfg["pooled_projection_dim"])}
        with FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    return _params(model), int(counter.get_total_flops())


def _case(op: str, size: str, shape: tuple[int, ...], calls: int, dtype: torch.dtype, providers, setup,
          model: str | None = None) -> Case:
    """bytes: the weights read once; flops: 2 x the forward FLOPs of every model call (the forward and the
    backward's activation gradients; LoRA's weight gradients and checkpointing's recompute are not counted)."""
    try:
        params, fwd = counted(model or op, size)
    except ImportError:  # the case's setup reports the missing package as a skip
        params, fwd = 0, 0
    return Case(op, "train", shape, dtype, params * (2 if dtype == torch.bfloat16 else 4), providers, setup,
                flops=2 * fwd * calls or None)


# its case ops, known without building the models' FLOP counts (cases.collect skips the module when none is asked)
OPS = ("diffusion_grpo_step", "reward_backprop_step", "llm_grpo_step")


def cases(config: CaseConfig) -> list[Case]:
    size = "small" if config.sizes == "small" or config.device.type != "cuda" else "default"
    device = config.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, side, text, T = DIFFUSION_SHAPES[size]
    Bb, sideb, textb, K = BACKPROP_SHAPES[size]
    out = [
        _case("diffusion_grpo_step", size, (B, side, side, text, T), T, dtype, DIFFUSION_PROVIDERS,
              functools.partial(_diffusion_setup, size, dtype, device)),
        _case("reward_backprop_step", size, (Bb, sideb, sideb, textb, K), K, dtype, BACKPROP_PROVIDERS,
              functools.partial(_backprop_setup, size, dtype, device)),
    ]
    for name, Bl, P, Tl in LLM_CASES[size]:  # shape: B x P x T x hidden size (which model)
        hidden = LLM_MODELS[name][1]["hidden_size"]
        out.append(_case("llm_grpo_step", size, (Bl, P, Tl, hidden), 1, dtype, LLM_PROVIDERS,
                         functools.partial(_llm_setup, name, Bl, P, Tl, dtype, device), model=name))
    return out
