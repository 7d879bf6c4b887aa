// Argument checks and the dtype dispatch shared by the launchers.
#pragma once
#include <string>
#include <torch/all.h>

namespace oppo {
namespace detail {
// c10 types in check messages (check_text.h), formatted without an ostream of this extension.
inline void append_text(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append_text(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append_text(std::string& s, c10::IntArrayRef a) {
  s += '[';
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  s += ']';
}
}  // namespace detail
}  // namespace oppo
#include "check_text.h"

// TORCH_CHECK with the message built by oppo::check_text (why: check_text.h). Every check of the
// launchers goes through it.
#define OPPO_CHECK(cond, ...) TORCH_CHECK(cond, ::oppo::check_text(__VA_ARGS__))

#define OPPO_CHECK_CUDA(x, op) OPPO_CHECK((x).is_cuda(), op ": " #x " must be a CUDA tensor")
#define OPPO_CHECK_DTYPE(x, dt, op) \
  OPPO_CHECK((x).scalar_type() == (dt), op ": " #x " has dtype ", (x).scalar_type(), ", expected ", (dt))

// The checks the attention launchers share: ranks, q against the caches' head dim and kv heads,
// out's shape, the dtypes (q bf16/fp16, caches like q, out like q or float32) and the head dim.
// `q_shape` names q's layout in the message ("[B, Hq, D]" or "[Nq, Hq, D]").
inline void check_attention_tensors(const char* op, const char* q_shape, const at::Tensor& out, const at::Tensor& q,
                                    const at::Tensor& k_cache, const at::Tensor& v_cache) {
  OPPO_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op, ": bad ranks/shapes");
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  OPPO_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, op, ": q ", q_shape,
             " must match the cache's D, Hq % Hkv == 0");
  OPPO_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape");
  OPPO_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op, ": q must be bf16 or fp16, got ",
             q.scalar_type());
  OPPO_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
             ": q and caches must share a dtype");
  OPPO_CHECK(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat, op,
             ": out must be q's dtype or float32");
  OPPO_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128, got ", D);
}

// The checks the small-M GEMM launchers (gate_up_silu.cu, linear_ksplit.cu) share on x [M, K] and
// w [*, K]: CUDA, 2-D, bf16/fp16 alike; at most max_rows rows (the kernels hold the whole batch); K a
// positive multiple of 8 within 32-bit indexing; x's rows contiguous and 16-byte aligned; w contiguous
// and 16-byte aligned. `w_shape` names w's layout in the message ("[2I, K]" or "[N, K]").
inline void check_small_m_operands(const char* op, const char* w_shape, const at::Tensor& x, const at::Tensor& w,
                                   int64_t max_rows) {
  OPPO_CHECK(x.is_cuda() && w.is_cuda(), op, ": x and w must be CUDA tensors");
  OPPO_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x [M, K] and w ", w_shape, " must be 2-D");
  const int64_t M = x.size(0), K = x.size(1);
  OPPO_CHECK(w.size(1) == K, op, ": w must be ", w_shape, " with x's K = ", K, ", got ", w.sizes());
  OPPO_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op, ": x must be bf16 or fp16, got ",
             x.scalar_type());
  OPPO_CHECK(w.scalar_type() == x.scalar_type(), op, ": x and w must share a dtype");
  OPPO_CHECK(M <= max_rows, op, ": at most ", max_rows, " rows (the kernel holds the whole batch), got ", M);
  OPPO_CHECK(K > 0 && K % 8 == 0 && K < (1LL << 31) && x.stride(0) < (1LL << 31), op,
             ": K must be a positive multiple of 8 within 32-bit indexing, got ", K);
  OPPO_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, op,
             ": x's rows must be contiguous, 16-byte aligned");
  OPPO_CHECK(w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, op,
             ": w must be contiguous, 16-byte aligned");
}

// Only the three float types the runtime uses are instantiated.
#define OPPO_DISPATCH_FLOAT(scalar_type, op, ...)                                  \
  [&] {                                                                            \
    switch (scalar_type) {                                                         \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); } \
      case at::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); } \
      case at::ScalarType::BFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: OPPO_CHECK(false, op ": unsupported dtype ", scalar_type);        \
    }                                                                              \
  }()
