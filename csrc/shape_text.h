// A tensor's sizes (or strides) as text for error messages, "[2, 7]".
//
// Built with std::to_string rather than c10's operator<< for ArrayRef: on the GPU machine (H200, torch 2.11,
// nvcc 13.0; 2026-11-27) every TORCH_CHECK that streamed a tensor's sizes() from these nvcc-compiled files killed
// the process with SIGSEGV instead of raising, while the checks streaming a device or a dtype raised cleanly
// (tests/test_cuda_build.py's bad-input tests). The same sources raise cleanly on the CPU build machine with torch
// 2.11 and 2.14. Whether this sidesteps the crash is to be confirmed on the GPU.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>
#include <string>

inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(static_cast<long long>(sizes[i]));
  }
  return out + "]";
}
