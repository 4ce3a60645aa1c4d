"""An AlignProp / DRaFT-K reward-backpropagation loop written out plainly, with fusedrl's checkpoint policies
and a batched differentiable reward.

Each step samples images with the flow ODE (Euler steps), keeping the autograd graph only through the last
K steps (DRaFT-K; AlignProp's truncated backprop), decodes them with the VAE, scores them with a
differentiable reward and backpropagates -reward into LoRA weights of the transformer. The memory of
those K denoiser calls is bounded by activation checkpointing from `fusedrl.engine.checkpointing`:

    v = checkpoint(transformer, hidden_states=x, ..., policy="save_attention")   # --checkpoint-scope step
    apply_checkpointing(transformer, "save_attention", module_types=JointTransformerBlock)   # ... blocks

Policies: "none", "full" (plain torch.utils.checkpoint), "save_attention" (keeps each attention's output and
log-sum-exp, so backward does not rerun the attention forward), "save_attention_and_matmuls", "offload".
The transformer's LoRA linears (and SD3.5's q-k RMSNorms) run on fused code: `fusedrl.patch_backbone(transformer)`
once the adapter is added (`--no-backbone` leaves them stock).

    python examples/alignprop_loop.py                     # tiny SD3-shaped model + tiny aesthetic reward, CPU
    python examples/alignprop_loop.py --model stabilityai/stable-diffusion-3.5-medium --resolution 512 \\
        --num-inference-steps 20 --backprop-steps 2 --reward aesthetic --reward-path /models/clip-vit-large \\
        --policy save_attention --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

import fusedrl
from fusedrl.engine.checkpointing import POLICIES, apply_checkpointing, checkpoint
from fusedrl.engine.rewards import load_reward

PROMPTS = ["a red apple", "a blue car", "a white cat", "a green tree"]
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="an SD3 pipeline path or hub id; default: --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random SD3-shaped pipeline and a tiny aesthetic reward built offline "
                        "(the default without --model)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--num-inference-steps", type=int, default=4)
    p.add_argument("--backprop-steps", type=int, default=2, help="K: the last K denoising steps keep their graph")
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default: 32 tiny, 512 real)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="> 1 runs classifier-free guidance")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: 4 tiny, 128 real)")
    p.add_argument("--policy", choices=POLICIES, default="save_attention", help="activation checkpointing policy")
    p.add_argument("--checkpoint-scope", choices=["step", "blocks"], default="step",
                   help="checkpoint each denoiser call (step) or each transformer block (blocks)")
    p.add_argument("--reward", default="aesthetic",
                   help="a differentiable fusedrl.engine.rewards name: aesthetic, pickscore, hpsv2, target_color, ...")
    p.add_argument("--reward-path", default=None,
                   help="the reward's weights (for aesthetic: a CLIP ViT-L/14 folder holding the LAION head file); "
                        "with --tiny and no path, a tiny random aesthetic model is built")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--no-backbone", action="store_true",
                   help="leave the transformer's LoRA linears and RMSNorms stock (no fusedrl.patch_backbone)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="model weights (default: bf16 on a GPU, fp32 on the CPU); LoRA weights stay fp32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    args.resolution = args.resolution or (32 if args.tiny else 512)
    args.max_sequence_length = args.max_sequence_length or (4 if args.tiny else 128)
    if not 1 <= args.backprop_steps <= args.num_inference_steps:
        p.error("--backprop-steps must be between 1 and --num-inference-steps")
    return args


def build_tiny_aesthetic(path: Path) -> str:
    """A tiny random CLIP vision tower (32 px, patch 8) and an aesthetic MLP head, saved like the real ones
    (save_pretrained + the head file), so that load_reward("aesthetic", path) loads them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fusedrl.engine.rewards import AestheticMLP

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    torch.save(AestheticMLP(16).state_dict(), path / "aesthetic_head.pth")
    return str(path)


def load_pipeline(args, device, dtype):
    if args.tiny:
        from fusedrl.engine.diffusion import tiny_model_dir  # a tiny SD3 saved with save_pretrained, cached

        # The tiny model has no T5 encoder; the pipeline then feeds zeros for its tokens, as SD3 allows.
        path, absent = tiny_model_dir("sd3"), {"text_encoder_3": None, "tokenizer_3": None}
    else:
        path, absent = args.model, {}
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **absent).to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        if module is not None:
            module.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                            target_modules=LORA_TARGETS))
    for p in pipe.transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # train the LoRA weights in fp32 (the base weights stay in `dtype`)
    if not args.no_backbone:  # the LoRA linears (and SD3.5's q-k RMSNorms) on fused code
        print(fusedrl.patch_backbone(pipe.transformer).summary())
    return pipe


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    torch.manual_seed(args.seed)

    pipe = load_pipeline(args, device, dtype)
    transformer, scheduler, vae = pipe.transformer, pipe.scheduler, pipe.vae
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-4)
    initial = [p.detach().clone() for p in trainable]

    if args.reward_path is None and args.tiny and args.reward == "aesthetic":
        with tempfile.TemporaryDirectory(prefix="fusedrl_tiny_aesthetic_") as tmp:
            reward_fn = load_reward("aesthetic", build_tiny_aesthetic(Path(tmp)))
    else:
        reward_fn = load_reward(args.reward, args.reward_path)  # learned rewards load onto the GPU when there is one
    if not reward_fn.differentiable:
        raise SystemExit(f"reward {args.reward!r} is not differentiable; reward backpropagation needs one")

    # Where the checkpoints go: around every denoiser call ("step", below), or around every transformer block
    # (then the denoiser calls run plain). The VAE decode below runs under the policy either way.
    step_policy = args.policy
    if args.checkpoint_scope == "blocks":
        block_type = type(transformer.transformer_blocks[0])  # JointTransformerBlock for SD3
        apply_checkpointing(transformer, args.policy, module_types=block_type)
        step_policy = "none"

    cfg = args.guidance_scale > 1.0
    S, K = args.num_inference_steps, args.backprop_steps
    latent_hw = args.resolution // pipe.vae_scale_factor
    history = []

    def velocity(latents, t, embeds, pooled):
        x = torch.cat([latents, latents]) if cfg else latents
        with autocast:
            v = checkpoint(transformer, hidden_states=x.to(transformer.dtype), timestep=t.expand(x.shape[0]),
                           encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False,
                           policy=step_policy)[0]
        v = v.float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + args.guidance_scale * (v_cond - v_uncond)
        return v

    transformer.train()
    for step in range(args.steps):
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prompts = [args.prompts[(step * args.batch_size + i) % len(args.prompts)] for i in range(args.batch_size)]
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
                max_sequence_length=args.max_sequence_length)
        if cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])

        # ---- sample with the Euler ODE: the first S - K steps without a graph, the last K with one
        scheduler.set_timesteps(S, device=device)
        sigmas = scheduler.sigmas.float()  # [S + 1], from 1 down to 0
        generator = torch.Generator(device).manual_seed(args.seed * 100_003 + step)
        latents = torch.randn(len(prompts), transformer.config.in_channels, latent_hw, latent_hw,
                              generator=generator, device=device)
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(i >= S - K):
                latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity(latents, t, embeds, pooled)

        # ---- decode (differentiable, checkpointed too) and score
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        decoded = checkpoint(vae.decode, z.to(vae.dtype), return_dict=False, policy=args.policy)[0]
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        rewards = reward_fn(images, prompts)  # [B] fp32, differentiable w.r.t. images
        loss = -rewards.mean()

        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad()

        metrics = {"step": step + 1, "reward_mean": rewards.mean().item(), "loss": loss.item(),
                   "grad_norm": grad_norm, "seconds": time.perf_counter() - start}
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        history.append(metrics)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
              flush=True)

    change = sum((p.detach() - p0).square().sum().item() for p, p0 in zip(trainable, initial)) ** 0.5
    print(f"done: {args.steps} steps, LoRA weights moved by {change:.4g} (L2)")
    return {"history": history, "param_change": change}


if __name__ == "__main__":
    main()
