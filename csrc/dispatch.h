// Argument checks and the dtype dispatch shared by the launchers.
#pragma once
#include <torch/all.h>

#define OPPO_CHECK_CUDA(x, op) TORCH_CHECK((x).is_cuda(), op ": " #x " must be a CUDA tensor")
#define OPPO_CHECK_DTYPE(x, dt, op) \
  TORCH_CHECK((x).scalar_type() == (dt), op ": " #x " has dtype ", (x).scalar_type(), ", expected ", (dt))

// Only the three float types the runtime uses are instantiated.
#define OPPO_DISPATCH_FLOAT(scalar_type, op, ...)                                  \
  [&] {                                                                            \
    switch (scalar_type) {                                                         \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); } \
      case at::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); } \
      case at::ScalarType::BFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, op ": unsupported dtype ", scalar_type);        \
    }                                                                              \
  }()
