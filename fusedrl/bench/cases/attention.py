"""Cases of `flash_attention`: softmax attention forward ("fwd", under no_grad) and forward + backward
("fwd+bwd": the gradient of <out, dout> with respect to q, k and v); causal cases have the modes
"fwd_causal" and "fwd+bwd_causal".

Shapes (B, H, N, D), self-attention (Nq = Nkv = N, Hq = Hkv = H):
- "default" (a GPU):
  - the sweep of flash-attn's own benchmark: D = 64 and 128, N = 1024 ... 16384, B * N = 16384 tokens
    and H * D = 2048, causal and not (16-bit dtypes only);
  - real models, not causal: SD1.5's UNet (N = 4096 at D = 40 in the 64 x 64 latent blocks, N = 1024
    at D = 80 in the 32 x 32 ones, 8 heads, batch 8), SD3 / Flux joint attention over 4096 image +
    333 text tokens (SD3: 24 heads x 64, batch 2; Flux: 24 heads x 128, batch 1), CLIP ViT-L/14 as a
    reward model (257 tokens, 16 heads x 64, batch 64).
- "small" (a CPU, seconds): N = 128 causal and not, N = 257 (CLIP-like), N = 300 at D = 40.

Compute-bound: counted in FLOPs and read against the bf16 matmul ceiling. Forward: the two matmuls
q k^T and p v, 4 B H Nq Nkv D flops, halved when causal (the tiles above the diagonal are skipped).
The backward is counted as 2.5 forwards (its five matmuls; the recomputation of the scores is not
counted, as flash-attn's benchmark does not count it), so "fwd+bwd" = 3.5 forwards.
Minimal bytes (e = bytes per element): forward reads q, k, v and writes out: 4 B H N D e; forward +
backward also reads q, k, v, out, dout and writes dq, dk, dv: 12 B H N D e in all.

Providers:
- "eager": the plain formula, softmax(q k^T * scale) v with the [N, N] scores materialized (fp32
  softmax); "compile": torch.compile of it. Both are skipped when the scores would need more than
  8 GiB (2 GiB on a CPU).
- "torch" / "triton" / "cuda": `fusedrl.kernels.flash_attention` with that backend forced.
- "sdpa_math", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn": torch's scaled_dot_product_attention
  restricted to one backend with torch.nn.attention.sdpa_kernel (a backend that refuses the inputs,
  e.g. flash with fp32 or cuDNN with D = 40, gives a skipped row with torch's reason).
- "flash_attn": flash-attn 2's `flash_attn_func` ([B, N, H, D] inputs made once, outside the
  timing), when the package is installed.

`fusedrl bench --ops attention --sizes small` runs the small cases on a CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fusedrl.kernels import flash_attention
from fusedrl.kernels.attention.api import SPEC

from ..providers import COMPILE, EAGER, STANDARD, Impl, Skip, pick, require
from . import Case, CaseConfig

SDPA = {"sdpa_math": "MATH", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_flash": "FLASH_ATTENTION",
        "sdpa_cudnn": "CUDNN_ATTENTION"}
FLASH_ATTN = "flash_attn"
PROVIDERS = STANDARD + tuple(SDPA) + (FLASH_ATTN,)
MODES = ("fwd", "fwd+bwd")
BWD_OVER_FWD = 2.5
# Above this, the eager formula's [B, H, N, N] fp32 scores (kept twice for its backward) are not tried.
EAGER_SCORE_BYTES = {"cuda": 8 * 2**30, "cpu": 2 * 2**30}


def _sweep() -> list[tuple[tuple[int, int, int, int], bool]]:
    shapes = []
    for D in (64, 128):
        for N in (1024, 2048, 4096, 8192, 16384):
            for causal in (False, True):
                shapes.append(((max(1, 16384 // N), 2048 // D, N, D), causal))
    return shapes


MODELS = [
    (8, 8, 4096, 40),    # SD1.5 UNet, 64 x 64 latent tokens
    (8, 8, 1024, 80),    # SD1.5 UNet, 32 x 32 latent tokens
    (2, 24, 4429, 64),   # SD3 joint attention: 4096 image + 333 text tokens
    (1, 24, 4429, 128),  # Flux-sized heads over the same tokens
    (64, 16, 257, 64),   # CLIP ViT-L/14 reward model
]
SMALL = [((1, 2, 128, 64), False), ((1, 2, 128, 64), True), ((2, 4, 257, 64), False), ((1, 2, 300, 40), False)]


def _naive(q, k, v, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        Nq, Nkv = q.shape[-2], k.shape[-2]
        future = torch.ones(Nq, Nkv, dtype=torch.bool, device=q.device).triu(Nkv - Nq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def _public(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal)


def _sdpa(name: str, device: torch.device):
    def factory():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA[name], None)
        if backend is None:
            raise Skip(f"torch {torch.__version__} has no SDPBackend.{SDPA[name]}")
        if device.type != "cuda" and name in ("sdpa_efficient", "sdpa_cudnn"):
            raise Skip(f"SDPBackend.{SDPA[name]} runs on CUDA only")

        def fn(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return fn

    return factory


def _flash_attn(device: torch.device):
    if device.type != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    require("flash_attn", "flash-attn")
    from flash_attn import flash_attn_func

    return flash_attn_func


def _setup(mode: str, shape, causal: bool, dtype: torch.dtype, device: torch.device):
    B, H, N, D = shape
    grad = mode != "fwd"
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype)
    score_bytes = 2 * B * H * N * N * 4

    def impl(provider: str) -> Impl:
        if provider in (EAGER, COMPILE) and score_bytes > EAGER_SCORE_BYTES[device.type]:
            raise Skip(f"the formula's [B, H, N, N] scores need {score_bytes / 2**30:.0f} GiB")
        if provider == FLASH_ATTN:  # its own [B, N, H, D] layout, made here, outside the timing
            flash = _flash_attn(device)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in (q, k, v))
            dt = dout.transpose(1, 2).contiguous()
            if mode == "fwd":
                def call():
                    with torch.no_grad():
                        return flash(qt, kt, vt, causal=causal)
            else:
                def call():
                    return torch.autograd.grad(flash(qt, kt, vt, causal=causal), (qt, kt, vt), dt)
            return Impl(call, inputs=(q, k, v, dout, qt, kt, vt, dt), error_is_skip=True)
        peers = {name: _sdpa(name, device) for name in SDPA}
        fn, env = pick(provider, eager=_naive, public=_public, spec=SPEC, tensors=(q, k, v), peers=peers)
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return fn(q, k, v, causal)
        else:
            def call():
                return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
        return Impl(call, env=env, inputs=(q, k, v, dout), error_is_skip=provider == COMPILE or provider in SDPA)

    return impl


def _flops(shape, causal: bool, mode: str) -> int:
    B, H, N, D = shape
    fwd = 4 * B * H * N * N * D // (2 if causal else 1)
    return int(fwd * (1 + BWD_OVER_FWD)) if mode == "fwd+bwd" else fwd


def _bytes(shape, mode: str, dtype: torch.dtype) -> int:
    B, H, N, D = shape
    return (12 if mode == "fwd+bwd" else 4) * B * H * N * D * dtype.itemsize


def cases(config: CaseConfig) -> list[Case]:
    if config.sizes == "small":
        points = [(shape, causal, config.dtypes) for shape, causal in SMALL]
    else:
        sixteen = tuple(d for d in config.dtypes if d.itemsize == 2) or config.dtypes
        points = [(shape, causal, sixteen) for shape, causal in _sweep()]
        points += [(shape, False, config.dtypes) for shape in MODELS]
    found = []
    for shape, causal, dtypes in points:
        for mode in MODES:
            for dtype in dtypes:
                found.append(Case(
                    op="flash_attention", mode=mode + ("_causal" if causal else ""), shape=shape, dtype=dtype,
                    bytes=_bytes(shape, mode, dtype), flops=_flops(shape, causal, mode), providers=PROVIDERS,
                    setup=functools.partial(_setup, mode, shape, causal, dtype, config.device)))
    return found
