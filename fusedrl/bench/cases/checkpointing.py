"""Cases of activation checkpointing (`fusedrl.engine.checkpointing`): one reward-backpropagation step.

The graph is the shape of AlignProp / DRaFT: K denoiser steps, a decode, a frozen ViT reward, all in
one autograd graph, built from small self-contained modules (pre-norm transformer blocks, MLP ratio 4,
tanh-GELU, attention heads of 64):
- denoiser: a DiT-like stack of `dit_depth` blocks of width `d_dit` over N latent tokens, trainable,
  run for K Euler steps x <- x + f(x + t_emb[k]) / K with shared weights;
- decode: tokens mean-pooled `pool`:1 into patches, a linear patch embedding and a class token;
- reward: a ViT-L-like stack (frozen, eval) over those patches; loss = -reward.sum().
Every transformer block (denoiser and reward) is wrapped by `apply_checkpointing`; the provider is
the policy ("none" = no checkpointing).

Sizes (B = 1):
- "default" (GPU): N = 4096 tokens (a 1024 px image in SD3's latent), d_dit = 1152 (18 heads of 64),
  dit_depth = 12, K = 4; ViT-L reward: 24 blocks, d = 1024, 16 heads, 256 patches + cls = 257 tokens.
- "small" (CPU): N = 64, d_dit = 64 (2 heads of 32), dit_depth = 2, K = 2; reward: 2 blocks, d = 64,
  16 patches + cls = 17 tokens.
dtype: bf16 on CUDA (training dtype; fp32 would time the efficient-attention backend), fp32 on CPU.

Ops: "reward_backprop_sdpa" (blocks call F.scaled_dot_product_attention) and
"reward_backprop_fusedrl" (blocks call fusedrl.kernels.flash_attention).

Modes:
- "fwd+bwd": the step: forward, then torch.autograd.grad of the loss w.r.t. the denoiser's
  parameters. Providers: the policies none, full, save_attention, save_attention_and_matmuls, offload.
- "attn_fwd": only the attention forwards of that step (K * dit_depth calls at the denoiser's shape and
  reward-depth calls at the reward's, inputs requiring grad as in training), provider "attention".
  The attention-forward share of the step is attn_fwd / (fwd+bwd, full): the time "full" spends
  rerunning attention and "save_attention" does not.
Target on an H100/H200: save_attention faster than full by at least that share, at <= 1.25x full's
peak memory. `python -m fusedrl.bench.cases.checkpointing` prints exactly those numbers.

What to expect (arithmetic, not measured): save_attention holds, beyond full, each attention call's O
[B, N, d] and fp32 LSE [B, H, N] - about one block input per call, ~0.48 GB at default sizes (48
denoiser calls x 9.7 MB + 24 reward calls x 0.54 MB), next to full's ~0.47 GB of block inputs, 0.38 GB
of denoiser gradients and one block's backward; so its peak ratio to full depends on those other terms.
Host time (see fusedrl.engine.checkpointing, "Cost"): "save_attention" runs without a dispatch mode (its
stash costs a few microseconds per region and per attention call), "save_attention_and_matmuls" on
PyTorch's selective checkpointing, a Python call per aten op and pass; the host ms column shows it, GPU
medians exclude it. `--host` prints the host time per step at a size where every op is tiny ("host":
the default's block counts at width 32 over 16 tokens, fp32 on the CPU), the old SAC implementation of
save_attention included ("save_attention_sac"). On the CPU the peak column is the runner's saved-tensor
estimate, which sees neither the tensors that "offload" packs with its own hooks nor save_attention's
stash (held by the checkpoint, outside autograd's saved tensors): there it reads as full's.

flops: the model FLOPs of the step without recompute, 3x the forward's matmul and attention FLOPs
(attention forward: 4 B N^2 d per call), so `achieved` is useful TFLOP/s: recompute lowers it.
bytes: the parameters read in forward and in backward plus the denoiser's gradients written (2 P_all +
P_dit elements); CPU rows, which have no matmul ceiling, are read against it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusedrl.engine import checkpointing as _checkpointing
from fusedrl.engine.checkpointing import apply_checkpointing, iter_wrappers

from ..providers import Impl
from . import Case, CaseConfig

POLICY_PROVIDERS = ("none", "full", "save_attention", "save_attention_and_matmuls", "offload")
ATTN_PROVIDER = "attention"
MODES = ("fwd+bwd", "attn_fwd")


@dataclass(frozen=True)
class Size:
    batch: int
    tokens: int
    d_dit: int
    heads_dit: int
    dit_depth: int
    steps: int
    pool: int
    d_vit: int
    heads_vit: int
    vit_depth: int

    @property
    def patches(self) -> int:
        return self.tokens // self.pool + 1  # + the class token

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.tokens, self.d_dit, self.dit_depth, self.steps, self.patches, self.d_vit,
                self.vit_depth)


SIZES = {
    "default": Size(batch=1, tokens=4096, d_dit=1152, heads_dit=18, dit_depth=12, steps=4, pool=16, d_vit=1024,
                    heads_vit=16, vit_depth=24),
    "small": Size(batch=1, tokens=64, d_dit=64, heads_dit=2, dit_depth=2, steps=2, pool=4, d_vit=64, heads_vit=2,
                  vit_depth=2),
    # the default's block and attention-call counts with tiny ops: the step time is host time (`--host`)
    "host": Size(batch=1, tokens=16, d_dit=32, heads_dit=2, dit_depth=12, steps=4, pool=4, d_vit=32, heads_vit=2,
                 vit_depth=24),
}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def fusedrl_attention(q, k, v):
    from fusedrl.kernels import flash_attention

    return flash_attention(q, k, v)


ATTENTION = {"reward_backprop_sdpa": sdpa, "reward_backprop_fusedrl": fusedrl_attention}


class Block(nn.Module):
    """Pre-norm transformer block: x + proj(attention(qkv(LN x))), then x + MLP(LN x)."""

    def __init__(self, d: int, heads: int, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Denoiser(nn.Module):
    def __init__(self, s: Size, attention):
        super().__init__()
        self.t_emb = nn.Parameter(torch.randn(s.steps, s.d_dit) * 0.02)
        self.blocks = nn.ModuleList(Block(s.d_dit, s.heads_dit, attention) for _ in range(s.dit_depth))
        self.out = nn.Linear(s.d_dit, s.d_dit)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = x + self.t_emb[step]
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class Reward(nn.Module):
    """Decode (pool tokens into patches) and a ViT over the patches; returns [B] rewards."""

    def __init__(self, s: Size, attention):
        super().__init__()
        self.pool = s.pool
        self.patch = nn.Linear(s.d_dit, s.d_vit)
        self.cls = nn.Parameter(torch.randn(1, 1, s.d_vit) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, s.patches, s.d_vit) * 0.02)
        self.blocks = nn.ModuleList(Block(s.d_vit, s.heads_vit, attention) for _ in range(s.vit_depth))
        self.norm, self.head = nn.LayerNorm(s.d_vit), nn.Linear(s.d_vit, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        patches = self.patch(x.view(B, N // self.pool, self.pool, C).mean(2))
        h = torch.cat([self.cls.expand(B, -1, -1), patches], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0])).squeeze(-1)


class RewardBackprop(nn.Module):
    def __init__(self, s: Size, attention):
        super().__init__()
        self.steps = s.steps
        self.denoiser, self.reward = Denoiser(s, attention), Reward(s, attention)
        self.reward.requires_grad_(False).eval()  # a frozen reward model, gradients flow through it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in range(self.steps):
            x = x + self.denoiser(x, step) / self.steps
        return -self.reward(x).sum()


def build(s: Size, attention, dtype: torch.dtype, device: torch.device) -> RewardBackprop:
    torch.manual_seed(0)
    model = RewardBackprop(s, attention).to(device=device, dtype=dtype)
    apply_checkpointing(model, "none", module_types=Block)
    return model


def set_policy(model: nn.Module, policy: str) -> None:
    for _, wrapper in iter_wrappers(model):
        wrapper.policy = policy


def _block_flops(B: int, N: int, d: int) -> int:
    """Forward FLOPs of one block: qkv, proj, fc1, fc2 (12 N d^2 multiply-adds) and attention (2 N^2 d)."""
    return 2 * B * (12 * N * d * d + 2 * N * N * d)


def step_flops(s: Size) -> int:
    fwd = s.steps * (s.dit_depth * _block_flops(s.batch, s.tokens, s.d_dit) + 2 * s.batch * s.tokens * s.d_dit ** 2)
    fwd += s.vit_depth * _block_flops(s.batch, s.patches, s.d_vit)
    return 3 * fwd


def attention_flops(s: Size) -> int:
    return (s.steps * s.dit_depth * 4 * s.batch * s.tokens ** 2 * s.d_dit
            + s.vit_depth * 4 * s.batch * s.patches ** 2 * s.d_vit)


def step_bytes(model: RewardBackprop) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * params + trainable


def _attention_inputs(s: Size, dtype: torch.dtype, device: torch.device):
    """q, k, v at each attention shape of the step, and how many calls the step makes at it."""
    shapes = [((s.batch, s.heads_dit, s.tokens, s.d_dit // s.heads_dit), s.steps * s.dit_depth),
              ((s.batch, s.heads_vit, s.patches, s.d_vit // s.heads_vit), s.vit_depth)]
    return [([torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3)], calls)
            for shape, calls in shapes]


def _setup_step(op: str, s: Size, dtype: torch.dtype, device: torch.device):
    model = build(s, ATTENTION[op], dtype, device)
    x0 = torch.randn(s.batch, s.tokens, s.d_dit, dtype=dtype, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = (x0, *model.parameters())

    def impl(provider: str) -> Impl:
        def fn():
            set_policy(model, provider)
            return torch.autograd.grad(model(x0), params)

        return Impl(fn, inputs=inputs)

    return impl


def _setup_attention(op: str, s: Size, dtype: torch.dtype, device: torch.device):
    attention = ATTENTION[op]
    sets = _attention_inputs(s, dtype, device)
    inputs = tuple(t for qkv, _ in sets for t in qkv)

    def impl(provider: str) -> Impl:
        def fn():
            for (q, k, v), calls in sets:
                for _ in range(calls):
                    attention(q, k, v)

        return Impl(fn, inputs=inputs)

    return impl


def _dtypes(config: CaseConfig) -> tuple[torch.dtype, ...]:
    return tuple(d for d in config.dtypes if d.itemsize == 2)[:1] or config.dtypes[:1]


def _param_bytes(s: Size, dtype: torch.dtype) -> int:
    """`step_bytes` of the model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = RewardBackprop(s, sdpa)
    return step_bytes(model) * dtype.itemsize // 4


OPS = tuple(ATTENTION)  # known without building the models (cases.collect skips the module when none is asked)


def cases(config: CaseConfig) -> list[Case]:
    s = SIZES[config.sizes]
    found = []
    for op in ATTENTION:
        for dtype in _dtypes(config):
            found.append(Case(op=op, mode="fwd+bwd", shape=s.shape, dtype=dtype, bytes=_param_bytes(s, dtype),
                              flops=step_flops(s), providers=POLICY_PROVIDERS,
                              setup=functools.partial(_setup_step, op, s, dtype, config.device)))
            qkv_out = 4 * (s.steps * s.dit_depth * s.tokens * s.d_dit + s.vit_depth * s.patches * s.d_vit)
            found.append(Case(op=op, mode="attn_fwd", shape=s.shape, dtype=dtype,
                              bytes=s.batch * qkv_out * dtype.itemsize, flops=attention_flops(s),
                              providers=(ATTN_PROVIDER,),
                              setup=functools.partial(_setup_attention, op, s, dtype, config.device)))
    return found


HOST_POLICIES = ("none", "full", "save_attention", "save_attention_sac")


def _policy(name: str):
    """A policy by name; "save_attention_sac" is save_attention's policy function on PyTorch's selective
    checkpointing (its implementation before the stash), for the host-time comparison."""
    return _checkpointing._POLICY_FNS["save_attention"] if name == "save_attention_sac" else name


def host_overhead(size: str = "host", rounds: int = 30, warmup: int = 3, op: str = "reward_backprop_sdpa",
                  policies: tuple[str, ...] = HOST_POLICIES) -> dict[str, float]:
    """Median CPU ms of one step (forward + torch.autograd.grad) per policy at `size`, fp32 on the CPU.
    Policies alternate within each round, so that drift (other load, clocks) reaches them alike."""
    s = SIZES[size]
    device = torch.device("cpu")
    model = build(s, ATTENTION[op], torch.float32, device)
    x0 = torch.randn(s.batch, s.tokens, s.d_dit)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        return torch.autograd.grad(model(x0), params)

    times: dict[str, list[float]] = {name: [] for name in policies}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is one thread; intra-op threads only wait on ops this small
    try:
        for name in policies:
            set_policy(model, _policy(name))
            for _ in range(warmup):
                step()
        for _ in range(rounds):
            for name in policies:
                set_policy(model, _policy(name))
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(ms) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Print, per policy, step time and peak memory, the attention-forward share and the target check."""
    from ..runner import DEFAULT_REPS, WARMUP, _device
    from ..timing import measure

    parser = argparse.ArgumentParser(prog="python -m fusedrl.bench.cases.checkpointing", description=main.__doc__)
    parser.add_argument("--sizes", choices=tuple(SIZES), default=None, help="default on CUDA, small on CPU")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--op", default="reward_backprop_sdpa", choices=tuple(ATTENTION))
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--policies", default="none,full,save_attention")
    parser.add_argument("--host", action="store_true",
                        help="only the CPU host time per step of each policy at the 'host' size (tiny ops)")
    args = parser.parse_args(argv)
    if args.host:
        s = SIZES["host"]
        ms = host_overhead(rounds=args.reps or 30, op=args.op)
        calls = s.steps * s.dit_depth + s.vit_depth
        print(f"{args.op} host size {s.shape} (fp32, CPU, 1 thread; {calls} checkpointed "
              f"blocks and attention calls per step): ms per step (forward + backward)")
        for name, value in ms.items():
            extra = f"  (+{value - ms['full']:.2f} ms over full)" if "full" in ms and name != "full" else ""
            print(f"  {name:<28} {value:10.2f} ms{extra}")
        return 0
    device = _device(args.device)
    sizes = args.sizes or ("default" if device.type == "cuda" else "small")
    s, dtype = SIZES[sizes], torch.bfloat16 if device.type == "cuda" else torch.float32
    reps, warmup = args.reps or min(DEFAULT_REPS[device.type], 20), WARMUP[device.type]

    timings = {}
    impl_for = _setup_step(args.op, s, dtype, device)
    for policy in args.policies.split(","):
        impl = impl_for(policy)
        timings[policy] = measure(impl.fn, device, reps, warmup, impl.inputs)
    del impl_for
    impl = _setup_attention(args.op, s, dtype, device)(ATTN_PROVIDER)
    attn = measure(impl.fn, device, reps, warmup, impl.inputs)

    print(f"{args.op} {sizes} {dtype} on {device}: shape (B, N, d_dit, depth, K, N_vit, d_vit, depth_vit) = "
          f"{s.shape}")
    for policy, t in timings.items():
        print(f"  {policy:<28} {t.median_ms:10.3f} ms   peak {t.peak_mb:10.1f} MB")
    print(f"  {'attention forwards':<28} {attn.median_ms:10.3f} ms")
    if "full" in timings:
        full = timings["full"]
        share = attn.median_ms / full.median_ms
        print(f"attention-forward share of the full-checkpointing step: {100 * share:.1f}%")
        if "save_attention" in timings:
            sa = timings["save_attention"]
            gain = 1 - sa.median_ms / full.median_ms
            ratio = sa.peak_mb / full.peak_mb if full.peak_mb else float("nan")
            met = gain >= share and ratio <= 1.25
            print(f"save_attention vs full: {100 * gain:.1f}% faster (target >= {100 * share:.1f}%), "
                  f"{ratio:.2f}x the peak memory (target <= 1.25x): {'MET' if met else 'NOT MET'}"
                  + ("" if device.type == "cuda" else " [CPU: peak is the saved-tensor estimate]"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
