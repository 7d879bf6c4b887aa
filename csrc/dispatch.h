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
