// Host launchers of log-probabilities from logits (csrc/logprobs.cu), registered as the CUDA
// kernels of `fusedrl_C::logprobs_fwd` / `_bwd` by bindings/registration.cpp. The argument lists
// are those of the Python custom ops in kernels/logprobs/op.py, minus `backend`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedrl {

// logits [B, T, V] (rows may be strided, the vocabulary is contiguous), labels [B, T] int32/int64
// -> (logp [B, T] fp32, entropy [B, T] fp32 or empty(0), lse [B, T] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                 double temperature, int64_t ignore_index,
                                                                 bool want_entropy);

// -> grad of logits, [B, T, V] contiguous in logits' dtype
at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, const std::optional<at::Tensor>& g_logp,
                             const std::optional<at::Tensor>& g_entropy, double temperature, int64_t ignore_index);

}  // namespace fusedrl
