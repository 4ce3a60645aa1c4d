// CUDA kernels of the fused diffusion step (flow SDE/CPS/dance and DDIM), forward and backward: the twin
// of kernels/diffusion_step/triton_kernels.py, which is the spec (same math in fp32, same
// options, same [B, 2, C] partial-sum layout, C = ceil(D / 4096)).
//
// Forward: a (C, B) grid; each 256-thread block owns 4096 elements of one sample, reads x, m and
// the noise (or the given prev) once, writes mean and prev once, and reduces its sums of
// (prev - mean)^2 and (mean - ref)^2 into part[b, 0|1, c] in a fixed order. A one-block-per-sample
// finish kernel then sums the C partials in a fixed order into logp and kl, so results are
// bitwise reproducible run to run (no atomics). Backward recomputes mean from x and m and writes
// the gradients of x, m (and ref) in one pass.
//
// dtypes: x, m and the outputs (mean/prev; gx/gm) are template parameters (float, at::Half,
// at::BFloat16; 27 forward and 9 backward instantiations). The optional streams (noise, given,
// ref, incoming gradients, gref) carry their dtype at run time: the switch on it is uniform across
// the grid, so it costs a branch, not bandwidth, and spares another factor of 3^k instantiations.
// The Triton constexpr options are run-time flags here for the same reason (compile time); they
// are uniform per launch, so the dead branches are never taken.

#include "shape_text.h"
#include "diffusion_step.h"
#include "step_coeffs.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fusedrl {
namespace {

// 256 threads x 4 elements = Triton's BLOCK (1024); 4 iterations = its ITERS, so C matches.
constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kIters = 4;
constexpr int kBlockElems = kThreads * kVec;
constexpr int64_t kChunk = int64_t{kBlockElems} * kIters;
constexpr int kMaxGridY = 65535;

enum class Dt : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// An optional [B, D] stream whose dtype is known only at run time.
struct AnyIn {
  const void* ptr;
  Dt dtype;
};
struct AnyOut {
  void* ptr;
  Dt dtype;
};

// Everything a launch shares; the flags mirror the Triton constexprs of the same names.
struct StepArgs {
  int64_t B, D;
  int C;
  float level, sigma_max, clip;
  int mode, pred;
  bool has_clip, clipped_eps;
  bool sampled, has_ref, want_logp;                                       // forward
  bool has_g_prev, has_g_mean, has_g_logp, has_g_kl, need_g_ref;          // backward
  bool vec;  // D % 4 == 0 and every [B, D] pointer 4-element aligned: 4-wide loads and stores
};

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements idx .. idx + n - 1 (n <= 4) of ptr as fp32; the rest of out is 0.
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ ptr, int64_t idx, int n, bool vec, float (&out)[kVec]) {
  if (vec && n == kVec) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(ptr + idx);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = static_cast<float>(p.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = j < n ? static_cast<float>(ptr[idx + j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ ptr, int64_t idx, int n, bool vec, const float (&v)[kVec]) {
  if (vec && n == kVec) {
    Pack<T> p;
#pragma unroll
    for (int j = 0; j < kVec; ++j) p.v[j] = static_cast<T>(v[j]);
    *reinterpret_cast<Pack<T>*>(ptr + idx) = p;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < n) ptr[idx + j] = static_cast<T>(v[j]);
    }
  }
}

__device__ __forceinline__ void load4(const AnyIn& t, int64_t idx, int n, bool vec, float (&out)[kVec]) {
  switch (t.dtype) {
    case Dt::kF16: load4(static_cast<const at::Half*>(t.ptr), idx, n, vec, out); break;
    case Dt::kBF16: load4(static_cast<const at::BFloat16*>(t.ptr), idx, n, vec, out); break;
    default: load4(static_cast<const float*>(t.ptr), idx, n, vec, out); break;
  }
}

__device__ __forceinline__ void store4(const AnyOut& t, int64_t idx, int n, bool vec, const float (&v)[kVec]) {
  switch (t.dtype) {
    case Dt::kF16: store4(static_cast<at::Half*>(t.ptr), idx, n, vec, v); break;
    case Dt::kBF16: store4(static_cast<at::BFloat16*>(t.ptr), idx, n, vec, v); break;
    default: store4(static_cast<float*>(t.ptr), idx, n, vec, v); break;
  }
}

// Valid elements in the group of 4 starting at column i of a row of D.
__device__ __forceinline__ int group_size(int64_t i, int64_t D) {
  const int64_t left = D - i;
  return left >= kVec ? kVec : (left > 0 ? static_cast<int>(left) : 0);
}

// Column of this thread's group in iteration `it` of chunk `chunk` (Triton's offs).
__device__ __forceinline__ int64_t group_column(int chunk, int it) {
  return int64_t{chunk} * kChunk + int64_t{it} * kBlockElems + int64_t{threadIdx.x} * kVec;
}

// Sum of (a, b) over the block, in a fixed order (deterministic); the result is valid in thread 0.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (lane == 0) warp_sums[warp] = make_float2(a, b);
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
  if (warp == 0) {
    a = lane < kThreads / 32 ? warp_sums[lane].x : 0.0f;
    b = lane < kThreads / 32 ? warp_sums[lane].y : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
    total = make_float2(a, b);
  }
  __syncthreads();  // warp_sums is reused by the next row of a grid-strided loop
  return total;
}

__device__ __forceinline__ StepCoeffs coefficients(const float* __restrict__ p0, const float* __restrict__ p1,
                                                   int64_t row, const StepArgs& s) {
  return step_coefficients(p0[row], p1[row], s.level, s.sigma_max, s.mode, s.pred, s.has_clip, s.clipped_eps);
}

// Rows beyond gridDim.y (B > 65535) are taken by a grid-strided loop.
template <typename TX, typename TM, typename TO>
__global__ void __launch_bounds__(kThreads) step_fwd_kernel(
    const TX* __restrict__ x, const TM* __restrict__ m, const float* __restrict__ p0, const float* __restrict__ p1,
    AnyIn noise, AnyIn given, AnyIn ref, TO* __restrict__ prev_out, TO* __restrict__ mean_out,
    float* __restrict__ part, StepArgs s) {
  const int chunk = blockIdx.x;
  for (int64_t row = blockIdx.y; row < s.B; row += gridDim.y) {
    const StepCoeffs k = coefficients(p0, p1, row, s);
    const int64_t base = row * s.D;
    float acc_d = 0.0f;
    float acc_k = 0.0f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t col = group_column(chunk, it);
      const int n = group_size(col, s.D);
      if (n == 0) continue;
      const int64_t idx = base + col;
      float xv[kVec], mv[kVec], mean[kVec], prev[kVec], other[kVec];
      load4(x, idx, n, s.vec, xv);
      load4(m, idx, n, s.vec, mv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        mean[j] = k.a * xv[j] + k.b * mv[j];
        if (s.has_clip) mean[j] += k.c * fminf(fmaxf(k.p * xv[j] + k.q * mv[j], -s.clip), s.clip);
      }
      store4(mean_out, idx, n, s.vec, mean);
      if (s.sampled) {
        load4(noise, idx, n, s.vec, other);
#pragma unroll
        for (int j = 0; j < kVec; ++j) prev[j] = mean[j] + k.scale * other[j];
        store4(prev_out, idx, n, s.vec, prev);
      } else if (s.want_logp) {
        load4(given, idx, n, s.vec, prev);
      }
      if (s.want_logp) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float d = prev[j] - mean[j];
          if (j < n) acc_d += d * d;
        }
      }
      if (s.has_ref) {
        load4(ref, idx, n, s.vec, other);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float e = mean[j] - other[j];
          if (j < n) acc_k += e * e;
        }
      }
    }
    const float2 sums = block_sum2(acc_d, acc_k);
    if (threadIdx.x == 0) {
      float* out = part + row * 2 * s.C + chunk;
      out[0] = sums.x;
      out[s.C] = sums.y;
    }
  }
}

// One block per sample: sum its C partials in a fixed order into logp and kl; write std.
__global__ void __launch_bounds__(kThreads) step_finish_kernel(
    const float* __restrict__ p0, const float* __restrict__ p1, const float* __restrict__ part,
    float* __restrict__ logp, float* __restrict__ kl, float* __restrict__ std_out, StepArgs s) {
  const int64_t row = blockIdx.x;
  const StepCoeffs k = coefficients(p0, p1, row, s);
  const float* sums = part + row * 2 * s.C;
  float acc_d = 0.0f;
  float acc_k = 0.0f;
  for (int c = threadIdx.x; c < s.C; c += kThreads) {
    acc_d += sums[c];
    acc_k += sums[s.C + c];
  }
  const float2 total = block_sum2(acc_d, acc_k);
  if (threadIdx.x == 0) {
    std_out[row] = k.std;
    const float inv_d = 1.0f / static_cast<float>(s.D);
    if (s.want_logp) logp[row] = k.cq * (total.x * inv_d) + k.c0;
    if (s.has_ref) kl[row] = total.y * inv_d / (2.0f * k.std * k.std);
  }
}

template <typename TX, typename TM>
__global__ void __launch_bounds__(kThreads) step_bwd_kernel(
    const TX* __restrict__ x, const TM* __restrict__ m, const float* __restrict__ p0, const float* __restrict__ p1,
    AnyIn noise, AnyIn given, AnyIn ref, AnyIn g_prev, AnyIn g_mean, const float* __restrict__ g_logp,
    const float* __restrict__ g_kl, TX* __restrict__ gx_out, TM* __restrict__ gm_out, AnyOut gref, StepArgs s) {
  const int chunk = blockIdx.x;
  const float inv_d = 1.0f / static_cast<float>(s.D);
  for (int64_t row = blockIdx.y; row < s.B; row += gridDim.y) {
    const StepCoeffs k = coefficients(p0, p1, row, s);
    // d logp / d mean = -2 cq (prev - mean) / D ; d kl / d mean = (mean - ref) / (std^2 D)
    const float coef_d = s.has_g_logp ? -2.0f * k.cq * inv_d * g_logp[row] : 0.0f;
    const float coef_k = s.has_g_kl ? g_kl[row] * inv_d / (k.std * k.std) : 0.0f;
    const int64_t base = row * s.D;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t col = group_column(chunk, it);
      const int n = group_size(col, s.D);
      if (n == 0) continue;
      const int64_t idx = base + col;
      float xv[kVec], mv[kVec], y[kVec], mean[kVec], g[kVec], other[kVec];
      load4(x, idx, n, s.vec, xv);
      load4(m, idx, n, s.vec, mv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        mean[j] = k.a * xv[j] + k.b * mv[j];
        y[j] = k.p * xv[j] + k.q * mv[j];
        if (s.has_clip) mean[j] += k.c * fminf(fmaxf(y[j], -s.clip), s.clip);
        g[j] = 0.0f;
      }
      if (s.has_g_mean) {
        load4(g_mean, idx, n, s.vec, other);
#pragma unroll
        for (int j = 0; j < kVec; ++j) g[j] += other[j];
      }
      if (s.has_g_prev) {  // a sampled prev = mean + scale z passes its gradient to mean
        load4(g_prev, idx, n, s.vec, other);
#pragma unroll
        for (int j = 0; j < kVec; ++j) g[j] += other[j];
      }
      if (s.has_g_logp) {
        if (s.sampled) {
          load4(noise, idx, n, s.vec, other);
#pragma unroll
          for (int j = 0; j < kVec; ++j) other[j] = mean[j] + k.scale * other[j];
        } else {
          load4(given, idx, n, s.vec, other);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) g[j] += coef_d * (other[j] - mean[j]);
      }
      if (s.has_g_kl) {
        load4(ref, idx, n, s.vec, other);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float e = coef_k * (mean[j] - other[j]);
          g[j] += e;
          other[j] = -e;
        }
        if (s.need_g_ref) store4(gref, idx, n, s.vec, other);
      }
      float gx[kVec], gm[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        gx[j] = k.a * g[j];
        gm[j] = k.b * g[j];
        if (s.has_clip) {
          // torch.clamp passes the gradient on the bounds too
          const float gy = (y[j] >= -s.clip && y[j] <= s.clip) ? k.c * g[j] : 0.0f;
          gx[j] += k.p * gy;
          gm[j] += k.q * gy;
        }
      }
      store4(gx_out, idx, n, s.vec, gx);
      store4(gm_out, idx, n, s.vec, gm);
    }
  }
}

// ----------------------------------------------------------------------------- host side

bool is_supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

Dt dt_of(at::ScalarType t) {
  return t == at::kHalf ? Dt::kF16 : (t == at::kBFloat16 ? Dt::kBF16 : Dt::kF32);
}

AnyIn any_in(const std::optional<at::Tensor>& t) {
  return t.has_value() ? AnyIn{t->data_ptr(), dt_of(t->scalar_type())} : AnyIn{nullptr, Dt::kF32};
}

// Calls f with a null pointer of the C++ type of t (float, at::Half or at::BFloat16).
template <typename F>
void with_scalar_type(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, "diffusion_step: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(is_supported(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [B, D], got ", shape_text(x.sizes()));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK_VALUE(x.size(0) == 0 || x.size(1) > 0, op, ": x must have at least one element per sample, got ",
                    shape_text(x.sizes()));
}

// A [B, D] stream read or written next to x.
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(is_supported(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", shape_text(t.sizes()),
                    " but x has shape ", shape_text(x.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_like_x(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (t.has_value()) check_like_x(op, name, *t, x);
}

// A per-sample [B] fp32 vector.
void check_per_sample(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape [B] = [", x.size(0),
                    "], got ", shape_text(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_per_sample(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (t.has_value()) check_per_sample(op, name, *t, x);
}

void check_codes(const char* op, int64_t mode, int64_t pred) {
  TORCH_CHECK_VALUE(mode >= kFlowSde && mode <= kFlowDance, op,
                    ": mode must be 0 (flow sde), 1 (flow cps), 2 (ddim) or 3 (flow dance), got ", mode);
  TORCH_CHECK_VALUE(pred >= kPredEpsilon && pred <= kPredV, op,
                    ": pred must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ", pred);
}

// The inputs both launchers share: latents, per-sample schedule values, optional streams, codes.
void check_step_inputs(const char* op, const at::Tensor& x, const at::Tensor& m, const at::Tensor& p0,
                       const at::Tensor& p1, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& given, const std::optional<at::Tensor>& ref, int64_t mode,
                       int64_t pred) {
  check_x(op, x);
  check_like_x(op, "m", m, x);
  check_per_sample(op, "p0", p0, x);
  check_per_sample(op, "p1", p1, x);
  check_like_x(op, "noise", noise, x);
  check_like_x(op, "given", given, x);
  check_like_x(op, "ref", ref, x);
  check_codes(op, mode, pred);
}

// 4-wide accesses need every row to start on a group of 4 and every stream 4-element aligned.
bool can_vectorize(int64_t D, std::initializer_list<const at::Tensor*> tensors) {
  if (D % kVec != 0) return false;
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) {
    return t == nullptr || reinterpret_cast<std::uintptr_t>(t->data_ptr()) % (kVec * t->element_size()) == 0;
  });
}

const at::Tensor* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

StepArgs make_args(const at::Tensor& x, int64_t mode, int64_t pred, double level, double sigma_max, double clip,
                   bool clipped_eps) {
  StepArgs s{};
  s.B = x.size(0);
  s.D = x.size(1);
  s.C = static_cast<int>((s.D + kChunk - 1) / kChunk);
  s.level = static_cast<float>(level);
  s.sigma_max = static_cast<float>(sigma_max);
  s.clip = static_cast<float>(clip);
  s.mode = static_cast<int>(mode);
  s.pred = static_cast<int>(pred);
  s.has_clip = clip > 0;
  s.clipped_eps = clipped_eps;
  return s;
}

dim3 step_grid(const StepArgs& s) {
  return dim3(static_cast<unsigned>(s.C), static_cast<unsigned>(std::min<int64_t>(s.B, kMaxGridY)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diffusion_step_fwd_cuda(
    const at::Tensor& x, const at::Tensor& m, const at::Tensor& p0, const at::Tensor& p1,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& given,
    const std::optional<at::Tensor>& ref, int64_t mode, int64_t pred, double level, double sigma_max,
    double clip, bool clipped_eps, bool want_logp, at::ScalarType out_dtype) {
  constexpr const char* op = "fusedrl_C::diffusion_step_fwd";
  check_step_inputs(op, x, m, p0, p1, noise, given, ref, mode, pred);
  TORCH_CHECK_TYPE(is_supported(out_dtype), op, ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const bool sampled = noise.has_value();
  TORCH_CHECK_VALUE(sampled || !want_logp || given.has_value(), op,
                    ": want_logp without noise needs `given`, the next latent whose log-probability is wanted");

  const c10::cuda::CUDAGuard guard(x.device());
  StepArgs s = make_args(x, mode, pred, level, sigma_max, clip, clipped_eps);
  s.sampled = sampled;
  s.has_ref = ref.has_value();
  s.want_logp = want_logp;
  const auto out_opts = x.options().dtype(out_dtype);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({s.B, s.D}, out_opts);
  at::Tensor prev = sampled ? at::empty({s.B, s.D}, out_opts) : at::empty({0}, out_opts);
  at::Tensor logp = at::empty({want_logp ? s.B : 0}, f32);
  at::Tensor kl = at::empty({s.has_ref ? s.B : 0}, f32);
  at::Tensor std_out = at::empty({s.B}, f32);
  if (s.B == 0) return {prev, mean, logp, kl, std_out};

  at::Tensor part = at::empty({s.B, 2, s.C}, f32);
  s.vec = can_vectorize(s.D, {&x, &m, &mean, sampled ? &prev : nullptr, ptr_or_null(noise), ptr_or_null(given),
                              ptr_or_null(ref)});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_scalar_type(x.scalar_type(), "x", [&](auto* tx) {
    using TX = std::remove_pointer_t<decltype(tx)>;
    with_scalar_type(m.scalar_type(), "m", [&](auto* tm) {
      using TM = std::remove_pointer_t<decltype(tm)>;
      with_scalar_type(out_dtype, "out_dtype", [&](auto* to) {
        using TO = std::remove_pointer_t<decltype(to)>;
        step_fwd_kernel<TX, TM, TO><<<step_grid(s), kThreads, 0, stream>>>(
            x.const_data_ptr<TX>(), m.const_data_ptr<TM>(), p0.const_data_ptr<float>(), p1.const_data_ptr<float>(),
            any_in(noise), any_in(given), any_in(ref), sampled ? prev.mutable_data_ptr<TO>() : nullptr,
            mean.mutable_data_ptr<TO>(), part.mutable_data_ptr<float>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  step_finish_kernel<<<static_cast<unsigned>(s.B), kThreads, 0, stream>>>(
      p0.const_data_ptr<float>(), p1.const_data_ptr<float>(), part.const_data_ptr<float>(),
      want_logp ? logp.mutable_data_ptr<float>() : nullptr, s.has_ref ? kl.mutable_data_ptr<float>() : nullptr,
      std_out.mutable_data_ptr<float>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev, mean, logp, kl, std_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_step_bwd_cuda(
    const at::Tensor& x, const at::Tensor& m, const at::Tensor& p0, const at::Tensor& p1,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& given,
    const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& g_prev,
    const std::optional<at::Tensor>& g_mean, const std::optional<at::Tensor>& g_logp,
    const std::optional<at::Tensor>& g_kl, int64_t mode, int64_t pred, double level, double sigma_max,
    double clip, bool clipped_eps, bool need_g_ref) {
  constexpr const char* op = "fusedrl_C::diffusion_step_bwd";
  check_step_inputs(op, x, m, p0, p1, noise, given, ref, mode, pred);
  check_like_x(op, "g_prev", g_prev, x);
  check_like_x(op, "g_mean", g_mean, x);
  check_per_sample(op, "g_logp", g_logp, x);
  check_per_sample(op, "g_kl", g_kl, x);
  TORCH_CHECK_VALUE(!g_logp.has_value() || noise.has_value() || given.has_value(), op,
                    ": g_logp needs noise (a sampled step) or given (the next latent)");
  TORCH_CHECK_VALUE(!g_kl.has_value() || ref.has_value(), op, ": g_kl needs ref");
  TORCH_CHECK_VALUE(!need_g_ref || ref.has_value(), op, ": need_g_ref needs ref");

  const c10::cuda::CUDAGuard guard(x.device());
  StepArgs s = make_args(x, mode, pred, level, sigma_max, clip, clipped_eps);
  s.sampled = noise.has_value();
  s.has_g_prev = g_prev.has_value();
  s.has_g_mean = g_mean.has_value();
  s.has_g_logp = g_logp.has_value();
  s.has_g_kl = g_kl.has_value();
  s.need_g_ref = need_g_ref && s.has_g_kl;
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gm = at::empty(m.sizes(), m.options());
  // ref reaches the outputs only through kl: without an incoming g_kl its gradient is zero.
  at::Tensor gref = !need_g_ref ? at::empty({0}, x.options().dtype(at::kFloat))
                    : s.need_g_ref ? at::empty(ref->sizes(), ref->options())
                                   : at::zeros(ref->sizes(), ref->options());
  if (s.B == 0) return {gx, gm, gref};

  s.vec = can_vectorize(s.D, {&x, &m, &gx, &gm, s.need_g_ref ? &gref : nullptr, ptr_or_null(noise),
                              ptr_or_null(given), ptr_or_null(ref), ptr_or_null(g_prev), ptr_or_null(g_mean)});
  const AnyOut gref_out{s.need_g_ref ? gref.data_ptr() : nullptr, dt_of(gref.scalar_type())};
  const float* g_logp_ptr = s.has_g_logp ? g_logp->const_data_ptr<float>() : nullptr;
  const float* g_kl_ptr = s.has_g_kl ? g_kl->const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_scalar_type(x.scalar_type(), "x", [&](auto* tx) {
    using TX = std::remove_pointer_t<decltype(tx)>;
    with_scalar_type(m.scalar_type(), "m", [&](auto* tm) {
      using TM = std::remove_pointer_t<decltype(tm)>;
      step_bwd_kernel<TX, TM><<<step_grid(s), kThreads, 0, stream>>>(
          x.const_data_ptr<TX>(), m.const_data_ptr<TM>(), p0.const_data_ptr<float>(), p1.const_data_ptr<float>(),
          any_in(noise), any_in(given), any_in(ref), any_in(g_prev), any_in(g_mean), g_logp_ptr, g_kl_ptr,
          gx.mutable_data_ptr<TX>(), gm.mutable_data_ptr<TM>(), gref_out, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gx, gm, gref};
}

}  // namespace fusedrl
