// Host launcher of the GRPO loss family's per-row kernel (csrc/grpo_loss.cu), registered as the CUDA
// kernel of `fusedrl_C::grpo_rows` by bindings/registration.cpp. The argument list is that of the
// Python custom op `fusedrl::grpo_rows` in kernels/grpo_loss/op.py, minus `backend`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedrl {

// Columns of the row sums, in the order of kernels/grpo_loss/triton_kernels.py's STATS:
// loss, count, kl, low, high, ratio, entropy, dl_dw, w_row, cispo.
constexpr int64_t kGrpoStats = 10;

// logp, old_logp, ref_logp, entropy [B, T]; advantages [B] or [B, T] (any of float32, float16,
// bfloat16, float64, each its own); mask [B, T] float32; all contiguous on one CUDA device
// -> (m dl/dlogp [B, T] fp32, row sums [B, kGrpoStats] fp32)
std::tuple<at::Tensor, at::Tensor> grpo_rows_cuda(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                                                  const at::Tensor& advantages, const at::Tensor& mask,
                                                  const std::optional<at::Tensor>& ref_logp,
                                                  const std::optional<at::Tensor>& entropy, double eps_low,
                                                  double eps_high, double delta, double beta, double tau_pos,
                                                  double tau_neg, int64_t loss_kind, int64_t kl_kind, bool sequence,
                                                  bool has_delta, bool bias_correction);

}  // namespace fusedrl
