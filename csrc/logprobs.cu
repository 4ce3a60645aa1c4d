// CUDA kernels of log-probabilities (and entropy) from logits, forward and backward: the twin of
// kernels/logprobs/triton_kernels.py, which is the spec (same math in fp32, same outputs, same
// treatment of ignored rows, out-of-range labels and -inf logits).
//
// Forward: one 256-thread block per row of [B, T, V] logits (rows past the grid's 65535 blocks are
// taken by a grid-strided loop); the row is read once. With x = logit / T, each thread keeps an
// online log-sum-exp of the values it reads:
//     m = running max,   s = sum exp(x - m),   u = sum exp(x - m) (x - m).
// When m moves to m', s and u are rescaled by a = exp(m - m'), and u also gains (m - m') s,
// because x - m' = (x - m) + (m - m'). The same identity merges two threads' triples:
//     m = max(m1, m2),  a_i = exp(m_i - m),
//     s = a1 s1 + a2 s2,   u = a1 (u1 + (m1 - m) s1) + a2 (u2 + (m2 - m) s2),
// first across a warp with shuffles, then across the block's warps in shared memory (a fixed
// order: results are bitwise reproducible run to run, no atomics). Then
//     lse = m + log s,   H = log s - u / s,   logp = min(x[label] - lse, 0).
// Backward reads the row once more and writes the gradient once:
//     dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / T,   p = exp(x - lse).
//
// Access: when every row starts on 16 bytes and V is a multiple of the vector width (4 fp32, 8
// fp16/bf16 elements), each thread reads 16-byte packs; otherwise (e.g. V = 50257) it reads single
// elements with the block's threads side by side, which is still coalesced. Each thread loads
// kUnroll groups before using any, so that two 16-byte loads per thread are in flight.
//
// dtypes: logits (float, at::Half, at::BFloat16) and labels (int32, int64) are template
// parameters, as are the two layouts and the forward's entropy flag: 24 forward and 12 backward
// instantiations. The backward's "which incoming gradients" flags are run-time flags, uniform per
// launch, so they cost a branch and not bandwidth.
//
// No --use_fast_math (kernels/cuda_ext.py): expf/logf are the accurate ones.

#include "shape_text.h"
#include "logprobs.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fusedrl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;
constexpr int64_t kMaxBlocks = 65535;
// A finite "minus infinity" as the starting max (the Triton kernel's NEG_BIG): with it, (m - m') s
// is 0 * finite before the first finite value, never 0 * -inf.
constexpr float kNegBig = -1.0e30f;

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// What every launch shares. Rows are numbered row = b * T + t; the logits of a row start at
// b * stride_b + t * stride_t (int64: B * T * V passes 2^31 at LLM sizes).
struct RowArgs {
  int64_t N, T, V, stride_b, stride_t;
  int64_t ignore_index;
  float inv_temp;
  bool has_g_logp, has_g_entropy;  // backward
};

template <typename T>
__device__ __forceinline__ const T* row_ptr(const T* logits, int64_t row, const RowArgs& a) {
  const int64_t b = row / a.T;
  const int64_t t = row - b * a.T;
  return logits + b * a.stride_b + t * a.stride_t;
}

// Column of element j of group k of this thread in the tile starting at `start`. Vector layout:
// a group is VEC neighbours (one 16-byte access); scalar layout: neighbouring threads take
// neighbouring columns, so each of the VEC loads of a warp is one coalesced transaction.
template <int VEC, bool kVector>
__device__ __forceinline__ int64_t column(int64_t start, int k, int j) {
  if constexpr (kVector) {
    return start + (int64_t{k} * kThreads + threadIdx.x) * VEC + j;
  } else {
    return start + (int64_t{k} * VEC + j) * kThreads + threadIdx.x;
  }
}

template <typename T>
constexpr int64_t kTile = int64_t{kThreads} * kUnroll * kVec<T>;

// x[k][j] = logit / T at column(start, k, j), or -inf past the end of the row (p = 0 there).
// In the vector layout V is a multiple of VEC, so a group is wholly inside the row or wholly past it.
template <typename T, bool kVector>
__device__ __forceinline__ void load_tile(const T* __restrict__ row, int64_t start, int64_t V, float inv_temp,
                                          float (&x)[kUnroll][kVec<T>]) {
  constexpr int VEC = kVec<T>;
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    if constexpr (kVector) {
      const int64_t col = column<VEC, true>(start, k, 0);
      if (col < V) {
        const Pack<T> p = *reinterpret_cast<const Pack<T>*>(row + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[k][j] = static_cast<float>(p.v[j]) * inv_temp;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[k][j] = -CUDART_INF_F;
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t col = column<VEC, false>(start, k, j);
        x[k][j] = col < V ? static_cast<float>(row[col]) * inv_temp : -CUDART_INF_F;
      }
    }
  }
}

template <typename T, bool kVector>
__device__ __forceinline__ void store_tile(T* __restrict__ row, int64_t start, int64_t V,
                                           const float (&g)[kUnroll][kVec<T>]) {
  constexpr int VEC = kVec<T>;
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    if constexpr (kVector) {
      const int64_t col = column<VEC, true>(start, k, 0);
      if (col < V) {
        Pack<T> p;
#pragma unroll
        for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(g[k][j]);
        *reinterpret_cast<Pack<T>*>(row + col) = p;
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t col = column<VEC, false>(start, k, j);
        if (col < V) row[col] = static_cast<T>(g[k][j]);
      }
    }
  }
}

// Online log-sum-exp state of a set of values (see the top of the file).
struct Stats {
  float m, s, u;
};

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m;  // <= 0; 0 for the side that holds the max
  const float db = b.m - m;
  const float ea = expf(da);
  const float eb = expf(db);
  return {m, ea * a.s + eb * b.s, ea * (a.u + da * a.s) + eb * (b.u + db * b.s)};
}

// The stats of the whole warp, valid in lane 0.
__device__ __forceinline__ Stats warp_merge(Stats st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Stats other{__shfl_down_sync(0xffffffffu, st.m, off), __shfl_down_sync(0xffffffffu, st.s, off),
                      __shfl_down_sync(0xffffffffu, st.u, off)};
    st = merge(st, other);
  }
  return st;
}

// The stats of the whole block, valid in thread 0.
__device__ __forceinline__ Stats block_merge(Stats st) {
  __shared__ Stats warp_stats[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  st = warp_merge(st);
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_stats[lane] : Stats{kNegBig, 0.0f, 0.0f};  // the identity of merge
    st = warp_merge(st);
  }
  __syncthreads();  // warp_stats is reused by the block's next row
  return st;
}

template <typename T, typename L, bool kEntropy, bool kVector>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(const T* __restrict__ logits,
                                                                const L* __restrict__ labels,
                                                                float* __restrict__ logp_out,
                                                                float* __restrict__ entropy_out,
                                                                float* __restrict__ lse_out, RowArgs a) {
  constexpr int VEC = kVec<T>;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const T* x_row = row_ptr(logits, row, a);
    // Thread 0 fetches the label and its logit now, so that their latency overlaps the row's.
    int64_t label = 0;
    float x_label = 0.0f;
    if (threadIdx.x == 0) {
      label = static_cast<int64_t>(labels[row]);
      if (label != a.ignore_index && label >= 0 && label < a.V) {
        x_label = static_cast<float>(x_row[label]) * a.inv_temp;
      }
    }

    Stats st{kNegBig, 0.0f, 0.0f};
    for (int64_t start = 0; start < a.V; start += kTile<T>) {
      float x[kUnroll][VEC];
      load_tile<T, kVector>(x_row, start, a.V, a.inv_temp, x);
      // One rescale per tile, not per element: the max moves rarely after the first tiles.
      float tile_max = x[0][0];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) tile_max = fmaxf(tile_max, x[k][j]);
      }
      if (tile_max > st.m) {
        const float d = st.m - tile_max;
        const float alpha = expf(d);
        if constexpr (kEntropy) st.u = alpha * (st.u + d * st.s);
        st.s *= alpha;
        st.m = tile_max;
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = x[k][j] - st.m;
          const float e = expf(d);  // 0 at x = -inf (masked vocabulary, past the row's end)
          st.s += e;
          if constexpr (kEntropy) st.u += e > 0.0f ? e * d : 0.0f;  // p log p = 0 at p = 0, never 0 * -inf
        }
      }
    }

    st = block_merge(st);
    if (threadIdx.x == 0) {
      const float log_s = logf(st.s);
      const float lse = st.m + log_s;
      lse_out[row] = lse;
      const bool valid = label != a.ignore_index;
      float logp = 0.0f;
      if (valid) {
        // A label outside [0, V) is NaN, never an out-of-bounds read. x_label <= lse in exact
        // arithmetic; rounding must not make a log-probability positive. The clamp keeps NaN
        // (from NaN logits) a NaN.
        const float d = x_label - lse;
        logp = (label < 0 || label >= a.V) ? CUDART_NAN_F : (d > 0.0f ? 0.0f : d);
      }
      logp_out[row] = logp;
      if constexpr (kEntropy) entropy_out[row] = valid ? log_s - st.u / st.s : 0.0f;
    }
  }
}

template <typename T, typename L, bool kVector>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(
    const T* __restrict__ logits, const L* __restrict__ labels, const float* __restrict__ lse_in,
    const float* __restrict__ entropy_in, const float* __restrict__ g_logp_in,
    const float* __restrict__ g_entropy_in, T* __restrict__ grad, RowArgs a) {
  constexpr int VEC = kVec<T>;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    T* out = grad + row * a.V;
    // Every thread reads the same label: one broadcast transaction per warp.
    const int64_t label = static_cast<int64_t>(labels[row]);
    if (label == a.ignore_index) {  // no gradient; the logits need not be read
      float zeros[kUnroll][VEC] = {};
      for (int64_t start = 0; start < a.V; start += kTile<T>) store_tile<T, kVector>(out, start, a.V, zeros);
      continue;
    }
    const float lse = lse_in[row];
    const float g_logp = a.has_g_logp ? g_logp_in[row] : 0.0f;
    const float g_ent = a.has_g_entropy ? g_entropy_in[row] : 0.0f;
    const float entropy = a.has_g_entropy ? entropy_in[row] : 0.0f;
    const T* x_row = row_ptr(logits, row, a);
    for (int64_t start = 0; start < a.V; start += kTile<T>) {
      float x[kUnroll][VEC];
      float g[kUnroll][VEC];
      load_tile<T, kVector>(x_row, start, a.V, a.inv_temp, x);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float log_p = x[k][j] - lse;
          const float p = expf(log_p);
          const bool is_label = column<VEC, kVector>(start, k, j) == label;
          float d = (is_label ? g_logp : 0.0f) - g_logp * p;
          if (a.has_g_entropy) d -= g_ent * p * (p > 0.0f ? log_p + entropy : 0.0f);  // never 0 * -inf
          g[k][j] = d * a.inv_temp;
        }
      }
      store_tile<T, kVector>(out, start, a.V, g);
    }
  }
}

// ----------------------------------------------------------------------------- host side

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls f with a null pointer of the C++ type of the logits (float, at::Half or at::BFloat16).
template <typename F>
void with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, "logits must be float32, float16 or bfloat16, got ", t);
  }
}

template <typename F>
void with_label_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kInt: f(static_cast<int32_t*>(nullptr)); break;
    case at::kLong: f(static_cast<int64_t*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, "labels must be int32 or int64, got ", t);
  }
}

// Calls f with std::true_type or std::false_type: a run-time flag as a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.is_cuda(), op, ": logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK_TYPE(is_float_type(logits.scalar_type()), op, ": logits must be float32, float16 or bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(2) >= 1, op,
                    ": logits must have shape [B, T, V] with V >= 1, got ", shape_text(logits.sizes()));
  TORCH_CHECK_VALUE(logits.size(2) == 1 || logits.stride(2) == 1, op,
                    ": logits must have a contiguous vocabulary (stride 1 in the last dimension), got strides ",
                    shape_text(logits.strides()));
}

// A per-row [B, T] tensor: on the logits' device, that shape, contiguous.
void check_per_row(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits is on ",
                    logits.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), op, ": ", name,
                    " must have shape [B, T] = [", logits.size(0), ", ", logits.size(1), "], got ",
                    shape_text(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_labels(const char* op, const at::Tensor& labels, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong, op,
                   ": labels must be int32 or int64, got ", labels.scalar_type());
  check_per_row(op, "labels", labels, logits);
}

void check_fp32_per_row(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_per_row(op, name, t, logits);
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite float > 0, got ", temperature);
}

bool is_aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0;
}

// 16-byte accesses need every row of the logits to start on 16 bytes and V % VEC == 0. The strides
// of a dimension of size 1 are never used, so they do not count.
bool rows_are_aligned(const at::Tensor& logits) {
  const int64_t vec = 16 / static_cast<int64_t>(logits.element_size());
  if (logits.size(2) % vec != 0 || !is_aligned(logits.data_ptr())) return false;
  for (int d = 0; d < 2; ++d) {
    if (logits.size(d) > 1 && logits.stride(d) % vec != 0) return false;
  }
  return true;
}

RowArgs make_args(const at::Tensor& logits, double temperature, int64_t ignore_index) {
  RowArgs a{};
  a.T = logits.size(1);
  a.N = logits.size(0) * a.T;
  a.V = logits.size(2);
  a.stride_b = logits.stride(0);
  a.stride_t = logits.stride(1);
  a.ignore_index = ignore_index;
  // As the Triton launcher: 1 / T rounded once to fp32, then x * inv_temp per element.
  a.inv_temp = static_cast<float>(1.0 / temperature);
  return a;
}

dim3 row_grid(const RowArgs& a) {
  return dim3(static_cast<unsigned>(std::min(a.N, kMaxBlocks)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                 double temperature, int64_t ignore_index,
                                                                 bool want_entropy) {
  constexpr const char* op = "fusedrl_C::logprobs_fwd";
  check_logits(op, logits);
  check_labels(op, labels, logits);
  check_temperature(op, temperature);

  const c10::cuda::CUDAGuard guard(logits.device());
  const RowArgs a = make_args(logits, temperature, ignore_index);
  const auto f32 = logits.options().dtype(at::kFloat);
  const int64_t B = logits.size(0);
  at::Tensor logp = at::empty({B, a.T}, f32);
  at::Tensor lse = at::empty({B, a.T}, f32);
  at::Tensor entropy = want_entropy ? at::empty({B, a.T}, f32) : at::empty({0}, f32);
  if (a.N == 0) return {logp, entropy, lse};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_float_type(logits.scalar_type(), [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    with_label_type(labels.scalar_type(), [&](auto* lp) {
      using L = std::remove_pointer_t<decltype(lp)>;
      with_flag(want_entropy, [&](auto entropy_flag) {
        with_flag(rows_are_aligned(logits), [&](auto vector_flag) {
          logprobs_fwd_kernel<T, L, decltype(entropy_flag)::value, decltype(vector_flag)::value>
              <<<row_grid(a), kThreads, 0, stream>>>(
                  logits.const_data_ptr<T>(), labels.const_data_ptr<L>(), logp.mutable_data_ptr<float>(),
                  want_entropy ? entropy.mutable_data_ptr<float>() : nullptr, lse.mutable_data_ptr<float>(), a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {logp, entropy, lse};
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, const std::optional<at::Tensor>& g_logp,
                             const std::optional<at::Tensor>& g_entropy, double temperature, int64_t ignore_index) {
  constexpr const char* op = "fusedrl_C::logprobs_bwd";
  check_logits(op, logits);
  check_labels(op, labels, logits);
  check_fp32_per_row(op, "lse", lse, logits);
  if (g_logp.has_value()) check_fp32_per_row(op, "g_logp", *g_logp, logits);
  if (g_entropy.has_value()) {
    check_fp32_per_row(op, "g_entropy", *g_entropy, logits);
    // The entropy of the forward enters the gradient of the entropy; without g_entropy it may be
    // the empty tensor of a forward that did not compute it.
    check_fp32_per_row(op, "entropy (needed with g_entropy)", entropy, logits);
  }
  check_temperature(op, temperature);

  const c10::cuda::CUDAGuard guard(logits.device());
  RowArgs a = make_args(logits, temperature, ignore_index);
  a.has_g_logp = g_logp.has_value();
  a.has_g_entropy = g_entropy.has_value();
  at::Tensor grad = at::empty({logits.size(0), a.T, a.V}, logits.options());  // contiguous, whatever the logits' strides
  if (a.N == 0) return grad;

  // grad is contiguous, so with V % VEC == 0 its rows are aligned whenever the logits' rows are.
  const bool vector = rows_are_aligned(logits) && is_aligned(grad.data_ptr());
  const float* g_logp_ptr = a.has_g_logp ? g_logp->const_data_ptr<float>() : nullptr;
  const float* g_entropy_ptr = a.has_g_entropy ? g_entropy->const_data_ptr<float>() : nullptr;
  const float* entropy_ptr = a.has_g_entropy ? entropy.const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_float_type(logits.scalar_type(), [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    with_label_type(labels.scalar_type(), [&](auto* lp) {
      using L = std::remove_pointer_t<decltype(lp)>;
      with_flag(vector, [&](auto vector_flag) {
        logprobs_bwd_kernel<T, L, decltype(vector_flag)::value><<<row_grid(a), kThreads, 0, stream>>>(
            logits.const_data_ptr<T>(), labels.const_data_ptr<L>(), lse.const_data_ptr<float>(), entropy_ptr,
            g_logp_ptr, g_entropy_ptr, grad.mutable_data_ptr<T>(), a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

}  // namespace fusedrl
