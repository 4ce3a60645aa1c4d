// Registers the CUDA kernels of csrc/ as torch ops in the `fusedrl_C` namespace
// (torch.ops.fusedrl_C.diffusion_step_fwd / _bwd, logprobs_fwd / _bwd, grpo_rows). The Python custom
// ops in kernels/diffusion_step/op.py, kernels/logprobs/op.py and kernels/grpo_loss/op.py call them
// with the same arguments, minus `backend`, so each schema below must list exactly those arguments
// in that order.
//
// Loading the shared library runs these static registrations; that is all the JIT build
// (torch.ops.load_library) and the CMake build need. The ahead-of-time build `fusedrl._C` is
// imported as a Python module, so when cpp_extension compiles this file (it defines
// TORCH_EXTENSION_NAME) it also gets an empty module init; the CMake build defines no such macro
// and stays free of Python symbols.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>  // first, as Python's headers require
#endif

#include <torch/library.h>

#include "diffusion_step.h"
#include "grpo_loss.h"
#include "logprobs.h"

TORCH_LIBRARY(fusedrl_C, m) {
  m.def(
      "diffusion_step_fwd(Tensor x, Tensor m, Tensor p0, Tensor p1, Tensor? noise, Tensor? given, Tensor? ref, "
      "int mode, int pred, float level, float sigma_max, float clip, bool clipped_eps, bool want_logp, "
      "ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "diffusion_step_bwd(Tensor x, Tensor m, Tensor p0, Tensor p1, Tensor? noise, Tensor? given, Tensor? ref, "
      "Tensor? g_prev, Tensor? g_mean, Tensor? g_logp, Tensor? g_kl, int mode, int pred, float level, "
      "float sigma_max, float clip, bool clipped_eps, bool need_g_ref) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, bool want_entropy) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor entropy, Tensor? g_logp, Tensor? g_entropy, "
      "float temperature, int ignore_index) -> Tensor");
  m.def(
      "grpo_rows(Tensor logp, Tensor? old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor? entropy, "
      "float eps_low, float eps_high, float delta, float beta, float tau_pos, float tau_neg, int loss_kind, "
      "int kl_kind, bool sequence, bool has_delta, bool bias_correction) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrl_C, CUDA, m) {
  m.impl("diffusion_step_fwd", &fusedrl::diffusion_step_fwd_cuda);
  m.impl("diffusion_step_bwd", &fusedrl::diffusion_step_bwd_cuda);
  m.impl("logprobs_fwd", &fusedrl::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &fusedrl::logprobs_bwd_cuda);
  m.impl("grpo_rows", &fusedrl::grpo_rows_cuda);
}

#ifdef TORCH_EXTENSION_NAME
#define FUSEDRL_CONCAT_(a, b) a##b
#define FUSEDRL_CONCAT(a, b) FUSEDRL_CONCAT_(a, b)
#define FUSEDRL_STR_(x) #x
#define FUSEDRL_STR(x) FUSEDRL_STR_(x)

PyMODINIT_FUNC FUSEDRL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      FUSEDRL_STR(TORCH_EXTENSION_NAME),
      "fusedrl CUDA kernels; importing this module registers the torch.ops.fusedrl_C ops.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
#endif
