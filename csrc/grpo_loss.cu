// CUDA kernel of the GRPO loss family: per-token loss, its derivative and the per-row sums, one
// block per sequence (row of [B, T]). The twin of `_grpo_row_kernel` in
// kernels/grpo_loss/triton_kernels.py, which is the spec (same math in fp32, same outputs).
//
// Per token, with w the log importance weight (the token's log-ratio, or under GSPO the row's masked
// mean log-ratio), r = exp(w) and A the advantage:
//     clip family: l = -min(r' A, clamp(r, 1 - eps_low, 1 + eps_high) A), r' = min(r, delta) if delta
//     cispo:       l = -sg(min(r, eps_high)) A logp
//     sapo:        l = -sigmoid(tau (r - 1)) 4 / tau A
//     + beta KL,   KL = k(logp, ref) (* r with TRL's bias correction)
// The kernel writes m dl/dlogp (at token level the derivative through w included; under GSPO the host
// adds the row term) and the kGrpoStats row sums (csrc/grpo_loss.h). torch.min's gradient at a tie
// goes half to each side, as in autograd; clip counts use r' (TRL counts after the delta clamp).
//
// Layout: 256 threads per row, thread i takes tokens i, i + 256, ... (coalesced), keeps its partial
// sums in registers, and the block reduces them in a fixed order (warp shuffles, then the warps'
// results in shared memory): bitwise reproducible run to run, no atomics. GSPO first reduces the
// row's masked log-ratio the same way, then broadcasts w_row. Rows past the grid's 65535 blocks are
// taken by a grid-strided loop.
//
// dtypes: each of logp/old/ref/adv/entropy may be float32, float16, bfloat16 or float64, chosen at
// run time per input (a uniform branch per load, no instantiation per combination); mask is float32.
// The loss kind is the only template parameter (3 instantiations); the other flags are run-time
// flags, uniform per launch. No --use_fast_math (kernels/cuda_ext.py): expf/logf are the accurate ones.

#include "shape_text.h"
#include "grpo_loss.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace fusedrl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 65535;

enum class LossKind : int { kClip = 0, kCispo = 1, kSapo = 2 };
enum KlKind : int { kK3 = 0, kK2 = 1, kK1 = 2 };
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// One input of any float dtype, read as fp32.
struct Input {
  const void* ptr;
  int dtype;
};

// min / max that propagate NaN, as torch.clamp and torch.min do (fminf / fmaxf return the other operand: a NaN
// log-prob gave a finite loss)
__device__ __forceinline__ float min_nan(float a, float b) { return (isnan(a) || isnan(b)) ? a + b : fminf(a, b); }
__device__ __forceinline__ float max_nan(float a, float b) { return (isnan(a) || isnan(b)) ? a + b : fmaxf(a, b); }

__device__ __forceinline__ float load(const Input& in, int64_t i) {
  switch (in.dtype) {
    case kF16: return static_cast<float>(static_cast<const at::Half*>(in.ptr)[i]);
    case kBF16: return static_cast<float>(static_cast<const at::BFloat16*>(in.ptr)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(in.ptr)[i]);
    default: return static_cast<const float*>(in.ptr)[i];
  }
}

struct Args {
  Input logp, old, adv, ref, ent;
  const float* mask;
  float* grad;
  float* stats;
  int64_t B, T;
  float eps_low, eps_high, delta, beta, tau_pos, tau_neg;
  int kl_kind;
  bool has_old, adv_per_token, sequence, has_delta, has_kl, bias_correction, has_entropy;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums each of v[0..K) over the block, in a fixed order; the sums are valid in thread 0.
// smem holds K * kWarps floats.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* smem) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * kWarps + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < kWarps ? smem[k * kWarps + lane] : 0.0f);
  }
  __syncthreads();  // smem is reused by the next reduction
}

// Partial sums of one thread, in the order of the stats columns minus w_row.
enum Sum : int { kLoss, kCount, kKl, kLow, kHigh, kRatio, kEnt, kDw, kCispoSum, kNumSums };

template <LossKind kKind>
__global__ void __launch_bounds__(kThreads) grpo_rows_kernel(Args a) {
  __shared__ float smem[kNumSums * kWarps];
  __shared__ float w_shared;
  for (int64_t row = blockIdx.x; row < a.B; row += gridDim.x) {
    const int64_t base = row * a.T;

    float w_row = 0.0f;
    if (a.sequence && a.has_old) {  // first pass: the row's masked mean log-ratio
      float acc[2] = {0.0f, 0.0f};
      for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
        const int64_t i = base + t;
        const float m = a.mask[i];
        acc[0] += (load(a.logp, i) - load(a.old, i)) * m;
        acc[1] += m;
      }
      block_sum<2>(acc, smem);
      if (threadIdx.x == 0) w_shared = acc[0] / fmaxf(acc[1], 1.0f);
      __syncthreads();
      w_row = w_shared;  // w_shared is next written after the reductions below, which sync the block
    }
    const float a_row = a.adv_per_token ? 0.0f : load(a.adv, row);
    const float lo = 1.0f - a.eps_low;
    const float hi = 1.0f + a.eps_high;

    float s[kNumSums];
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) s[k] = 0.0f;
    for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
      const int64_t i = base + t;
      const float m = a.mask[i];
      const float lp = load(a.logp, i);
      const float lr = a.has_old ? lp - load(a.old, i) : 0.0f;  // no old: old = logp.detach(), ratio 1
      const float adv = a.adv_per_token ? load(a.adv, i) : a_row;
      const float w = a.sequence ? w_row : lr;
      const float r = expf(w);
      float direct = 0.0f;  // dl/dlogp other than through w
      float loss, d_w;
      if constexpr (kKind == LossKind::kClip) {
        const float c2 = min_nan(max_nan(r, lo), hi);
        const float d_c2 = (r >= lo && r <= hi) ? r : 0.0f;
        float r1 = r, d_r1 = r;
        if (a.has_delta) {
          r1 = min_nan(r, a.delta);
          d_r1 = r <= a.delta ? r : 0.0f;
        }
        const float x = r1 * adv;
        const float y = c2 * adv;
        loss = -min_nan(x, y);
        d_w = -adv * (x < y ? d_r1 : (x > y ? d_c2 : 0.5f * (d_r1 + d_c2)));
        // TRL counts clipping on the ratio after the delta clamp
        s[kLow] += (r1 < lo && adv < 0.0f) ? m : 0.0f;
        s[kHigh] += (r1 > hi && adv > 0.0f) ? m : 0.0f;
      } else if constexpr (kKind == LossKind::kCispo) {
        const float cr = min_nan(r, a.eps_high);
        loss = -cr * adv * lp;
        direct = -cr * adv;
        d_w = 0.0f;
        s[kCispoSum] += (r > a.eps_high && adv > 0.0f) ? m : 0.0f;
      } else {
        const float tau = adv > 0.0f ? a.tau_pos : a.tau_neg;
        const float sig = 1.0f / (1.0f + expf(-(tau * (r - 1.0f))));
        loss = -sig * 4.0f / tau * adv;
        d_w = -4.0f * adv * sig * (1.0f - sig) * r;
      }
      if (a.has_kl) {
        const float d = load(a.ref, i) - lp;
        float kl, d_kl;
        if (a.kl_kind == kK3) {
          const float e = expf(d);
          kl = e - d - 1.0f;
          d_kl = 1.0f - e;
        } else if (a.kl_kind == kK2) {
          kl = 0.5f * d * d;
          d_kl = -d;
        } else {
          kl = -d;
          d_kl = 1.0f;
        }
        if (a.bias_correction) {
          d_w += a.beta * kl * r;
          kl = kl * r;
          d_kl = d_kl * r;
        }
        loss += a.beta * kl;
        direct += a.beta * d_kl;
        s[kKl] += kl * m;
      }
      float grad;
      if (a.sequence) {
        grad = m * direct;
        s[kDw] += m * d_w;
      } else {
        grad = m * (direct + d_w);
      }
      a.grad[i] = grad;
      s[kLoss] += loss * m;
      s[kCount] += m;
      s[kRatio] += r * m;
      if (a.has_entropy) s[kEnt] += load(a.ent, i) * m;
    }

    block_sum<kNumSums>(s, smem);
    if (threadIdx.x == 0) {
      float* out = a.stats + row * kGrpoStats;
      out[0] = s[kLoss];
      out[1] = s[kCount];
      out[2] = s[kKl];
      out[3] = s[kLow];
      out[4] = s[kHigh];
      out[5] = s[kRatio];
      out[6] = s[kEnt];
      out[7] = s[kDw];
      out[8] = w_row;
      out[9] = s[kCispoSum];
    }
  }
}

// ----------------------------------------------------------------------------- host side

constexpr const char* kOp = "fusedrl_C::grpo_rows";

int dtype_code(const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
  return kF32;  // unreachable
}

// A [B, T] tensor (or, for the advantages, [B]) on logp's device, contiguous.
void check_like_logp(const char* name, const at::Tensor& t, const at::Tensor& logp, bool per_row_ok = false) {
  TORCH_CHECK_VALUE(t.device() == logp.device(), kOp, ": ", name, " is on ", t.device(), " but logp is on ",
                    logp.device());
  const bool full = t.dim() == 2 && t.size(0) == logp.size(0) && t.size(1) == logp.size(1);
  const bool per_row = per_row_ok && t.dim() == 1 && t.size(0) == logp.size(0);
  TORCH_CHECK_VALUE(full || per_row, kOp, ": ", name, " must have shape ",
                    per_row_ok ? "[B] or [B, T]" : "[B, T]", " with [B, T] = [", logp.size(0), ", ", logp.size(1),
                    "], got ", shape_text(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

Input input(const char* name, const at::Tensor& t, const at::Tensor& logp, bool per_row_ok = false) {
  const int code = dtype_code(name, t);
  check_like_logp(name, t, logp, per_row_ok);
  return {t.const_data_ptr(), code};
}

Input optional_input(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& logp) {
  if (!t.has_value()) return {nullptr, kF32};
  return input(name, *t, logp);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grpo_rows_cuda(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                                                  const at::Tensor& advantages, const at::Tensor& mask,
                                                  const std::optional<at::Tensor>& ref_logp,
                                                  const std::optional<at::Tensor>& entropy, double eps_low,
                                                  double eps_high, double delta, double beta, double tau_pos,
                                                  double tau_neg, int64_t loss_kind, int64_t kl_kind, bool sequence,
                                                  bool has_delta, bool bias_correction) {
  TORCH_CHECK_VALUE(logp.is_cuda(), kOp, ": logp must be a CUDA tensor, got one on ", logp.device());
  TORCH_CHECK_VALUE(logp.dim() == 2, kOp, ": logp must have shape [B, T], got ", shape_text(logp.sizes()));
  Args a{};
  a.logp = input("logp", logp, logp);
  a.old = optional_input("old_logp", old_logp, logp);
  a.adv = input("advantages", advantages, logp, /*per_row_ok=*/true);
  a.ref = optional_input("ref_logp", ref_logp, logp);
  a.ent = optional_input("entropy", entropy, logp);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kFloat, kOp, ": mask must be float32, got ", mask.scalar_type());
  check_like_logp("mask", mask, logp);
  TORCH_CHECK_VALUE(loss_kind >= 0 && loss_kind <= 2, kOp,
                    ": loss_kind must be 0 (clip family), 1 (cispo) or 2 (sapo), got ", loss_kind);
  TORCH_CHECK_VALUE(kl_kind >= 0 && kl_kind <= 2, kOp, ": kl_kind must be 0 (k3), 1 (k2) or 2 (k1), got ", kl_kind);

  a.B = logp.size(0);
  a.T = logp.size(1);
  a.mask = mask.const_data_ptr<float>();
  // As the Triton launcher: the scalars are fp32 in the kernel.
  a.eps_low = static_cast<float>(eps_low);
  a.eps_high = static_cast<float>(eps_high);
  a.delta = static_cast<float>(delta);
  a.beta = static_cast<float>(beta);
  a.tau_pos = static_cast<float>(tau_pos);
  a.tau_neg = static_cast<float>(tau_neg);
  a.kl_kind = static_cast<int>(kl_kind);
  a.has_old = old_logp.has_value();
  a.adv_per_token = advantages.dim() == 2;
  a.sequence = sequence;
  a.has_delta = has_delta;
  a.has_kl = ref_logp.has_value();
  a.bias_correction = bias_correction;
  a.has_entropy = entropy.has_value();

  const c10::cuda::CUDAGuard guard(logp.device());
  const auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor grad = at::empty({a.B, a.T}, f32);
  at::Tensor stats = at::empty({a.B, kGrpoStats}, f32);
  if (a.B == 0) return {grad, stats};
  a.grad = grad.mutable_data_ptr<float>();
  a.stats = stats.mutable_data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(std::min(a.B, kMaxBlocks)));
  switch (loss_kind) {
    case 0: grpo_rows_kernel<LossKind::kClip><<<grid, kThreads, 0, stream>>>(a); break;
    case 1: grpo_rows_kernel<LossKind::kCispo><<<grid, kThreads, 0, stream>>>(a); break;
    default: grpo_rows_kernel<LossKind::kSapo><<<grid, kThreads, 0, stream>>>(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad, stats};
}

}  // namespace fusedrl
