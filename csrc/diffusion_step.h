// Host launchers of the fused diffusion step (csrc/diffusion_step.cu), registered as the CUDA
// kernels of `fusedrl_C::diffusion_step_fwd` / `_bwd` by bindings/registration.cpp. The argument
// lists are those of the Python custom ops in kernels/diffusion_step/op.py, minus `backend`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedrl {

// -> (prev [B, D] or empty(0), mean [B, D], logp [B] fp32 or empty(0), kl [B] fp32 or empty(0), std [B] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> diffusion_step_fwd_cuda(
    const at::Tensor& x, const at::Tensor& m, const at::Tensor& p0, const at::Tensor& p1,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& given,
    const std::optional<at::Tensor>& ref, int64_t mode, int64_t pred, double level, double sigma_max,
    double clip, bool clipped_eps, bool want_logp, at::ScalarType out_dtype);

// -> (grad x like x, grad m like m, grad ref like ref or empty(0) fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_step_bwd_cuda(
    const at::Tensor& x, const at::Tensor& m, const at::Tensor& p0, const at::Tensor& p1,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& given,
    const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& g_prev,
    const std::optional<at::Tensor>& g_mean, const std::optional<at::Tensor>& g_logp,
    const std::optional<at::Tensor>& g_kl, int64_t mode, int64_t pred, double level, double sigma_max,
    double clip, bool clipped_eps, bool need_g_ref);

}  // namespace fusedrl
