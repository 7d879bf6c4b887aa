// CUDA implementations of the attention ops (launchers in csrc/*.cu). Until a kernel exists its
// op has no CUDA implementation, and the Python dispatch runs the reference and says so.
#pragma once
#include <ATen/ATen.h>

#define OPPO_REGISTER_CUDA_ATTENTION(m)
