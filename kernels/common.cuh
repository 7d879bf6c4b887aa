// Device helpers shared by the kernels. Header-only, raw pointers, no torch headers.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdexcept>

namespace oppo {

template <typename T> struct Vec16;     // 16 bytes of T
template <> struct Vec16<float>         { static constexpr int N = 4; };
template <> struct Vec16<__half>        { static constexpr int N = 8; };
template <> struct Vec16<__nv_bfloat16> { static constexpr int N = 8; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// A divisor fixed at launch (a kernel argument: the GQA group, the kv heads, the row tiles, the
// page size), with n / d and n % d by a multiply-high, an add and a shift instead of the ~20
// instructions of a 32-bit division (I2F, MUFU.RCP: the XU pipe the softmax's exp2 keeps busy).
// Granlund & Montgomery (PLDI 1994), fig. 4.1 with its two shifts merged: l = ceil(log2 d),
// mul = floor(2^32 (2^l - d) / d) + 1 < 2^32, n / d = (umulhi(n, mul) + n) >> l. Exact for
// 1 <= d < 2^31 and 0 <= n < 2^31 (the sum stays below 2^32), which every index the kernels divide
// is; tests/test_divisor.py checks it exhaustively on the host. It converts to int (d), so
// products and comparisons read as before; only int / Divisor and int % Divisor take the fast path.
struct Divisor {
  int d = 1;
  uint32_t mul = 1;
  uint32_t shift = 0;
  Divisor() = default;
  __host__ explicit Divisor(int divisor) : d(divisor) {
    if (divisor < 1) throw std::invalid_argument("oppo::Divisor: the divisor must be at least 1");
    while ((1ull << shift) < static_cast<uint64_t>(divisor)) ++shift;
    mul = static_cast<uint32_t>(((1ull << 32) * ((1ull << shift) - static_cast<uint64_t>(divisor))) /
                                static_cast<uint64_t>(divisor) + 1);
  }
  __host__ __device__ __forceinline__ operator int() const { return d; }
  __host__ __device__ __forceinline__ int div(int n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * mul) >> 32);
#endif
    return static_cast<int>((hi + static_cast<uint32_t>(n)) >> shift);
  }
  __host__ __device__ __forceinline__ int mod(int n) const { return n - div(n) * d; }
};
__host__ __device__ __forceinline__ int operator/(int n, const Divisor& v) { return v.div(n); }
__host__ __device__ __forceinline__ int operator%(int n, const Divisor& v) { return v.mod(n); }

}  // namespace oppo
