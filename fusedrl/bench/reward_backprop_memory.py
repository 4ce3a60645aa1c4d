"""Peak memory of one reward-backprop step against the number K of denoising steps with gradient, on the CPU:
each (K, checkpointing) pair measured as the growth of peak RSS in a fresh child process (`rss.py`).

The step is `engine.diffusion.differentiable`'s: S denoising steps of an SD3-shaped flow transformer (built from a
config, random weights, LoRA), the last K with gradient, each checkpointed with `checkpointing` ("none": every
activation kept), the VAE decode checkpointed in every case (so the only difference is the denoiser steps),
then the mean pixel value as the reward and backward. The child first runs one full sampling pass without
gradient (warm-up), resets its peak, and reports how far the step lifts its peak above its resident memory:
the step's transient working memory plus what the gradient graph holds, i.e. about one step's activations
(the recompute) for a checkpointed step whatever K is, and K steps' activations without checkpointing.

    python benchmarks/bench_reward_backprop_memory.py --csv benchmarks/results/reward_backprop_memory_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .rss import peak_growth_mb

__all__ = ["SIZES", "Size", "format_table", "main", "measure", "write_csv"]


@dataclass(frozen=True)
class Size:
    """The benchmark model and batch: a latent of `latent` x `latent` (x8 px), `layers` joint transformer blocks of
    `heads` x 16 channels, `batch` samples, `steps` denoising steps."""

    latent: int = 64
    layers: int = 4
    heads: int = 4
    batch: int = 2
    steps: int = 8


SIZES = {
    "tiny": Size(latent=32, layers=4, heads=4, batch=4, steps=4),
    "small": Size(latent=64, layers=4, heads=4, batch=2, steps=8),
}

SETUP = """
import torch
torch.set_num_threads(1)
import diffusers
from fusedrl.engine.diffusion import DiffusionPolicy, LoraOptions, build_tiny_pipeline
from fusedrl.engine.diffusion import differentiable as D
size = {size}
pipe = build_tiny_pipeline("sd3")
torch.manual_seed(0)
pipe.transformer = diffusers.SD3Transformer2DModel(
    sample_size=size["latent"], patch_size=2, in_channels=4, out_channels=4, num_layers=size["layers"],
    attention_head_dim=16, num_attention_heads=size["heads"], joint_attention_dim=64,
    caption_projection_dim=16 * size["heads"], pooled_projection_dim=64, pos_embed_max_size=size["latent"] // 2)
policy = DiffusionPolicy(pipe, device="cpu", lora=LoraOptions(rank=4), defaults={{"max_sequence_length": 4}})
px = size["latent"] * policy.vae_scale_factor
emb = policy.encode_prompts(["a red apple"] * size["batch"])
schedule = policy.schedule(size["steps"], px, px)
x = D.initial_latents(policy, size["batch"], D.noise_generators(size["batch"], 0), height=px, width=px)
with torch.no_grad():   # warm-up: the inference peak is the baseline
    D.decode(policy, D.denoise(policy, emb, schedule, x, grad_steps=0, guidance_scale=1.0))
"""

CALL = """
lat = D.denoise(policy, emb, schedule, x, grad_steps={k}, guidance_scale=1.0, checkpointing={policy!r})
(-D.decode(policy, lat, checkpointing="full").mean()).backward()
"""


def measure(ks: Sequence[int] = (1, 2, 4, 8), policies: Sequence[str] = ("full", "none"), size: Size | str = "small",
            jobs: int = 1, timeout: float = 600) -> list[dict]:
    """Peak RSS growth (MB) of one reward-backprop step for each K and checkpointing policy; one row per pair,
    each measured in its own child process, `jobs` children at a time (each runs on one thread)."""
    from concurrent.futures import ThreadPoolExecutor

    size = SIZES[size] if isinstance(size, str) else size
    if max(ks) > size.steps:
        raise ValueError(f"K = {max(ks)} exceeds the {size.steps} sampling steps of this size")
    # glibc's malloc keeps freed blocks below its (growing) mmap threshold in the heap, so a freed activation
    # can hide behind the RSS of the next one or not: a fixed 64 KiB threshold maps every large tensor on its
    # own and unmaps it when freed, so the peak RSS follows the peak of live tensors.
    env = {"TRITON_INTERPRET": "0", "FUSEDRL_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    setup = SETUP.format(size=json.dumps(asdict(size)))
    pairs = [(policy, k) for policy in policies for k in ks]

    def one(pair: tuple[str, int]) -> dict:
        policy, k = pair
        t0 = time.perf_counter()
        mb = peak_growth_mb(setup, CALL.format(k=k, policy=policy), env, timeout=timeout)
        return {"k": k, "checkpointing": policy, "peak_growth_mb": round(mb, 2),
                "seconds": round(time.perf_counter() - t0, 2), **asdict(size)}

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, pairs))


def format_table(rows: Sequence[dict]) -> str:
    """K down, one column per checkpointing policy, peak RSS growth in MB."""
    policies = list(dict.fromkeys(r["checkpointing"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    value = {(r["k"], r["checkpointing"]): r["peak_growth_mb"] for r in rows}
    head = f"{'K':>3} | " + " | ".join(f"{'ckpt ' + p:>16}" for p in policies)
    lines = ["peak RSS growth of one reward-backprop step (MB)", head, "-" * len(head)]
    for k in ks:
        lines.append(f"{k:>3} | " + " | ".join(f"{value.get((k, p), float('nan')):>16.1f}" for p in policies))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Append `rows` (with date and machine columns) to a CSV, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    full = [{**meta, **r} for r in rows]
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(full[0]))
        if new:
            writer.writeheader()
        writer.writerows(full)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model and batch size")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="values of K")
    parser.add_argument("--policies", nargs="+", default=["full", "none"], help="checkpointing policies")
    parser.add_argument("--jobs", type=int, default=1, help="child processes at a time (peaks are per process)")
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV")
    args = parser.parse_args(argv)
    rows = measure(args.k, args.policies, args.size, jobs=args.jobs)
    print(format_table(rows))
    if args.csv:
        print(f"rows appended to {write_csv(rows, args.csv)}")
    return 0
