"""A Flow-GRPO loop written out plainly, with fusedrl's fused SDE step swapped in.

The fusedrl-specific lines are the import of the step function and, optionally, one call on the transformer
once its LoRA adapter is added; everything else is plain diffusers, peft and torch, laid out like Flow-GRPO's
`train_sd3.py`:

    # before: from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    from fusedrl.integrations.flow_grpo import sde_step_with_logprob
    fusedrl.patch_backbone(pipe.transformer)   # LoRA linears, SD3.5's q-k RMSNorms: fused (--no-backbone: not)

Each step: (1) sample a group of images per prompt with SDE steps, recording every latent and the log-prob
of each transition; (2) score the images and turn the rewards into group-normalized advantages; (3) for
every timestep, recompute the log-prob under the current policy (same step function, `prev_sample=`
the recorded latent) and take a PPO-clipped ratio loss, plus Flow-GRPO's KL to the reference model (the
transformer with its LoRA adapter switched off); one optimizer step per batch.

    python examples/flow_grpo_loop.py                     # tiny SD3-shaped model built offline, CPU, seconds
    python examples/flow_grpo_loop.py --model stabilityai/stable-diffusion-3.5-medium --resolution 512 \\
        --num-inference-steps 10 --guidance-scale 4.5 --reward jpeg_compressibility --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

import fusedrl
from fusedrl.engine.advantages import group_advantages
from fusedrl.engine.rewards import load_reward
from fusedrl.integrations.flow_grpo import sde_step_with_logprob  # <- the drop-in

PROMPTS = ["a red apple", "a blue car", "a white cat", "a green tree"]
# Flow-GRPO's LoRA targets in the SD3 transformer's joint attention.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="an SD3 pipeline path or hub id; default: --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random SD3-shaped pipeline built offline (the default without --model)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (each samples a fresh batch)")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4, help="images per prompt (the GRPO group)")
    p.add_argument("--num-inference-steps", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default: 32 tiny, 512 real)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="> 1 runs classifier-free guidance")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: 4 tiny, 128 real)")
    p.add_argument("--noise-level", type=float, default=0.7, help="Flow-GRPO's SDE noise level a")
    p.add_argument("--sde-type", choices=["sde", "cps"], default="sde")
    p.add_argument("--reward", default="target_color",
                   help="a fusedrl.engine.rewards name: target_color, brightness, jpeg_compressibility, aesthetic, "
                        "pickscore, ...")
    p.add_argument("--reward-path", default=None, help="weights of a learned reward (path or hub id)")
    p.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip (Flow-GRPO's default)")
    p.add_argument("--adv-clip", type=float, default=5.0, help="clamp advantages to [-adv_clip, adv_clip]")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference forward)")
    p.add_argument("--inner-epochs", type=int, default=1, help="passes over each sampled batch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-backbone", action="store_true",
                   help="leave the transformer's LoRA linears and RMSNorms stock (no fusedrl.patch_backbone)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="model weights (default: bf16 on a GPU, fp32 on the CPU); LoRA weights stay fp32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    args.resolution = args.resolution or (32 if args.tiny else 512)
    args.max_sequence_length = args.max_sequence_length or (4 if args.tiny else 128)
    return args


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


def predict(pipe, latents, t, embeds, pooled, guidance_scale, autocast):
    """The transformer's velocity at latents x_t (with CFG when guidance_scale > 1: embeds are [uncond; cond])."""
    cfg = guidance_scale > 1.0
    x = torch.cat([latents, latents]) if cfg else latents
    with autocast:
        v = pipe.transformer(hidden_states=x.to(pipe.transformer.dtype), timestep=t.expand(x.shape[0]),
                             encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
    v = v.float()
    if cfg:
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    torch.manual_seed(args.seed)

    pipe = load_pipeline(args, device, dtype)
    transformer, scheduler = pipe.transformer, pipe.scheduler
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-4)
    reward_fn = load_reward(args.reward, args.reward_path)  # learned rewards load onto the GPU when there is one
    initial = [p.detach().clone() for p in trainable]
    cfg = args.guidance_scale > 1.0
    G, S = args.group_size, args.num_inference_steps
    latent_hw = args.resolution // pipe.vae_scale_factor
    history = []

    for step in range(args.steps):
        start = time.perf_counter()
        # ---- 1. sample B = prompts x G images, recording latents and log-probs (no grad)
        first = step * args.prompts_per_step
        prompts = [args.prompts[(first + i) % len(args.prompts)] for i in range(args.prompts_per_step)]
        batch_prompts = [p for p in prompts for _ in range(G)]
        B = len(batch_prompts)
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                prompt=batch_prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
                max_sequence_length=args.max_sequence_length)
        if cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        scheduler.set_timesteps(S, device=device)
        timesteps = scheduler.timesteps  # [S], from 1000 down
        generator = torch.Generator(device).manual_seed(args.seed * 100_003 + step)
        latents = torch.randn(B, transformer.config.in_channels, latent_hw, latent_hw, generator=generator,
                              device=device)
        all_latents, all_log_probs = [latents], []
        transformer.eval()
        with torch.no_grad():
            for t in timesteps:
                v = predict(pipe, latents, t, embeds, pooled, args.guidance_scale, autocast)
                latents, log_prob, _, _ = sde_step_with_logprob(scheduler, v, t.unsqueeze(0), latents,
                                                                noise_level=args.noise_level, generator=generator,
                                                                sde_type=args.sde_type)
                all_latents.append(latents)
                all_log_probs.append(log_prob)
            vae = pipe.vae
            z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            images = (vae.decode(z.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
        all_latents = torch.stack(all_latents, dim=1)      # [B, S + 1, C, h, w]
        old_log_probs = torch.stack(all_log_probs, dim=1)  # [B, S]

        # ---- 2. rewards and group-normalized advantages
        rewards = reward_fn(images, batch_prompts)  # [B] fp32
        advantages = group_advantages(rewards, group_size=G, clip=args.adv_clip)  # [B]

        # ---- 3. the clipped-ratio loss over every noisy timestep; one optimizer step for the batch. CPS's last
        # step goes to sigma = 0 with no noise (std 0: the KL divides by it): left out, as Flow-GRPO's
        # timestep_fraction 0.99 leaves it out
        transformer.train()
        losses, kls, clipped = [], [], []
        trained = range(S - 1) if args.sde_type == "cps" else range(S)
        for _ in range(args.inner_epochs):
            for j in trained:
                t = timesteps[j]
                x_t, x_next = all_latents[:, j], all_latents[:, j + 1]
                v = predict(pipe, x_t, t, embeds, pooled, args.guidance_scale, autocast)
                _, log_prob, mean, std = sde_step_with_logprob(scheduler, v, t.unsqueeze(0), x_t,
                                                               noise_level=args.noise_level, prev_sample=x_next,
                                                               sde_type=args.sde_type)
                ratio = torch.exp(log_prob - old_log_probs[:, j])
                unclipped = -advantages * ratio
                clipped_loss = -advantages * torch.clamp(ratio, 1.0 - args.clip_range, 1.0 + args.clip_range)
                loss = torch.maximum(unclipped, clipped_loss).mean()
                if args.beta > 0:
                    with torch.no_grad():
                        transformer.disable_adapters()  # the reference policy: the base model
                        v_ref = predict(pipe, x_t, t, embeds, pooled, args.guidance_scale, autocast)
                        transformer.enable_adapters()
                        _, _, mean_ref, _ = sde_step_with_logprob(scheduler, v_ref, t.unsqueeze(0), x_t,
                                                                  noise_level=args.noise_level, prev_sample=x_next,
                                                                  sde_type=args.sde_type)
                    kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std**2)
                    loss = loss + args.beta * kl.mean()
                    kls.append(kl.mean().item())
                (loss / len(trained)).backward()
                losses.append(loss.item())
                clipped.append(((ratio - 1).abs() > args.clip_range).float().mean().item())
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0).item()
            optimizer.step()
            optimizer.zero_grad()

        metrics = {"step": step + 1, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                   "loss": sum(losses) / len(losses), "kl": sum(kls) / len(kls) if kls else 0.0,
                   "clip_frac": sum(clipped) / len(clipped), "grad_norm": grad_norm,
                   "seconds": time.perf_counter() - start}
        history.append(metrics)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
              flush=True)

    change = sum((p.detach() - p0).square().sum().item() for p, p0 in zip(trainable, initial)) ** 0.5
    print(f"done: {args.steps} steps, LoRA weights moved by {change:.4g} (L2)")
    return {"history": history, "param_change": change}


if __name__ == "__main__":
    main()
