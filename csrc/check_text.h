// The text of the launchers' check messages, built without iostreams (OPPO_CHECK in dispatch.h).
//
// Why: on the GPU machine's build (session 14, H100 image: GCC of Ubuntu 24.04, torch 2.11), a
// failed TORCH_CHECK whose message held an integer killed the process: SIGSEGV in
// std::ostream::_M_insert<long>, a copy of which the extension carried itself (its backtrace
// resolved inside _C.so), out of step with the process's locale facets. Messages of strings
// alone (dtype names, device names) threw cleanly. So a message is one std::string, numbers
// formatted by std::to_string / snprintf, and TORCH_CHECK only inserts that string.
//
// Types a message may hold: strings, characters, booleans, integers, floating point; dispatch.h
// adds c10's ScalarType, Device and IntArrayRef (declared before this header, so the template
// below sees them). Anything else does not compile.
#pragma once
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace oppo {
namespace detail {

inline void append_text(std::string& s, const char* x) { s += x != nullptr ? x : "(null)"; }
inline void append_text(std::string& s, const std::string& x) { s += x; }
inline void append_text(std::string& s, std::string_view x) { s.append(x.data(), x.size()); }
inline void append_text(std::string& s, char x) { s += x; }
inline void append_text(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append_text(std::string& s, T x) {
  s += std::to_string(x);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append_text(std::string& s, T x) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", static_cast<double>(x));
  s += b;
}

}  // namespace detail

template <typename... A>
std::string check_text(const A&... a) {
  std::string s;
  (detail::append_text(s, a), ...);
  return s;
}

}  // namespace oppo
