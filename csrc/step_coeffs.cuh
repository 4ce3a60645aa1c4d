// Per-sample coefficients of one diffusion transition, the CUDA twin of `_coefficients` in
// kernels/diffusion_step/triton_kernels.py (that file is the spec; keep the two in step).
//
// Every step (flow "sde", flow "cps", flow "dance", DDIM) is one affine Gaussian transition:
//   mean = a x + b m  (+ c clamp(p x + q m, -clip, clip)  when the DDIM x0 is clipped)
//   prev = mean + scale z
//   logp = cq MEAN_D((prev - mean)^2) + c0,   kl = MEAN_D((mean - ref)^2) / (2 std^2)
// All math is fp32, as in the Triton kernels. `/` and sqrtf round correctly (the Triton side asks
// for div_rn / sqrt_rn to match) and logf is the accurate one, as long as the build does not pass
// --use_fast_math (it must not: small stds make logp sensitive).
//
// The header also compiles as plain C++ (no nvcc), so tests/test_step_coeffs_host.py checks these
// coefficients against the float64 reference on a machine without a GPU.
#pragma once

#if defined(__CUDACC__)
#define FUSEDRL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <math.h>
#define FUSEDRL_HOST_DEVICE inline
#endif

namespace fusedrl {

// The `mode` and `pred` codes of the custom ops (FLOW_SDE, ... in triton_kernels.py).
constexpr int kFlowSde = 0;
constexpr int kFlowCps = 1;
constexpr int kDdim = 2;
constexpr int kFlowDance = 3;
constexpr int kPredEpsilon = 0;
constexpr int kPredSample = 1;
constexpr int kPredV = 2;

constexpr float kLogSqrt2Pi = 0.9189385332046727f;

struct StepCoeffs {
  float a, b, c, p, q, scale, std, cq, c0;
};

// p0, p1 are (sigma, sigma_next) for the flow steps and (alpha_t, alpha_prev) for DDIM. `level` is
// noise_level ("sde", "dance"), sin(noise_level pi / 2) ("cps", from the host) or eta (DDIM).
FUSEDRL_HOST_DEVICE StepCoeffs step_coefficients(float p0, float p1, float level, float sigma_max, int mode, int pred,
                                                 bool has_clip, bool clipped_eps) {
  StepCoeffs k{};  // c = p = q = 0 unless the DDIM x0 is clipped
  if (mode == kFlowSde || mode == kFlowDance) {
    const float sigma = p0;
    const float dt = p1 - sigma;
    if (mode == kFlowSde) {
      // Flow-GRPO evaluates the std at sigmas[1] on the first step, where sigma / (1 - sigma) is infinite.
      const float s = sigma == 1.0f ? sigma_max : sigma;
      k.std = level * sqrtf(sigma / (1.0f - s));
    } else {
      k.std = level;  // DanceGRPO: the same SDE step with a constant std (its eta)
    }
    k.a = 1.0f + k.std * k.std / (2.0f * sigma) * dt;
    k.b = (1.0f + k.std * k.std * (1.0f - sigma) / (2.0f * sigma)) * dt;
    k.scale = k.std * sqrtf(-dt);
    k.cq = -0.5f / (k.scale * k.scale);
    k.c0 = -logf(k.scale) - kLogSqrt2Pi;
  } else if (mode == kFlowCps) {
    const float sigma = p0;
    const float sigma_next = p1;
    k.std = sigma_next * level;
    // sqrt(sigma_next^2 - std^2) as sigma_next sqrt((1 - level)(1 + level)): equal in exact arithmetic, and never
    // negative: contracted to an fma, the difference left -(rounding of sigma_next^2) at level = 1, and NaN
    const float root = sigma_next * sqrtf((1.0f - level) * (1.0f + level));
    k.a = (1.0f - sigma_next) + root;
    k.b = -sigma * (1.0f - sigma_next) + (1.0f - sigma) * root;
    k.scale = k.std;
    // CPS drops the Gaussian constants: logp = -MEAN((prev - mean)^2).
    k.cq = -1.0f;
    k.c0 = 0.0f;
  } else {  // DDIM
    const float alpha_t = p0;
    const float alpha_prev = p1;
    const float beta_t = 1.0f - alpha_t;
    const float variance = (1.0f - alpha_prev) / beta_t * (1.0f - alpha_t / alpha_prev);
    k.std = level * sqrtf(variance);
    // sqrt(1 - alpha_prev - std^2) as sqrt((1 - alpha_prev) (1 - level^2 (1 - alpha_t / alpha_prev) / beta_t)):
    // the same in exact arithmetic, and exactly 0 (not sqrt of a rounding residual) at alpha_t = 0, eta = 1
    const float keep = 1.0f - level * level * ((1.0f - alpha_t / alpha_prev) / beta_t);
    const float direction = sqrtf(fmaxf((1.0f - alpha_prev) * keep, 0.0f));
    const float sa_t = sqrtf(alpha_t);
    const float sb_t = sqrtf(beta_t);
    const float sa_p = sqrtf(alpha_prev);
    // x0 = px x + pm m ; eps = ux x + um m
    float px, pm, ux, um;
    if (pred == kPredEpsilon) {
      px = 1.0f / sa_t;
      pm = -sb_t / sa_t;
      ux = 0.0f;
      um = 1.0f;
    } else if (pred == kPredSample) {
      px = 0.0f;
      pm = 1.0f;
      ux = 1.0f / sb_t;
      um = -sa_t / sb_t;
    } else {  // v-prediction
      px = sa_t;
      pm = -sb_t;
      ux = sb_t;
      um = sa_t;
    }
    float c_x0 = sa_p;
    if (clipped_eps) {  // eps re-derived from the (clipped) x0, as diffusers' use_clipped_model_output
      ux = 1.0f / sb_t;
      um = 0.0f;
      c_x0 = sa_p - direction * sa_t / sb_t;
    }
    if (has_clip) {
      k.a = direction * ux;
      k.b = direction * um;
      k.c = c_x0;
      k.p = px;
      k.q = pm;
    } else {
      k.a = direction * ux + c_x0 * px;
      k.b = direction * um + c_x0 * pm;
    }
    k.scale = k.std;
    k.cq = -0.5f / (k.std * k.std);
    k.c0 = -logf(k.std) - kLogSqrt2Pi;
  }
  return k;
}

}  // namespace fusedrl
