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
