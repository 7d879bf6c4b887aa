// The decode MLP's gate_up projection and silu*mul as one sm_90a kernel (wgmma), for batches of at
// most 256 rows:
//
//   act[m, j] = silu(g) * u,  g = sum_k x[m, k] w[j, k],  u = sum_k x[m, k] w[I + j, k]
//
// (float32 sums; act rounded once). Why its own kernel (bench/NOTES.md "Session 42"): at M = 256
// cuBLAS runs 0.5B's gate_up (N = 9728, K = 896) as 168 x 128 tiles, 152 CTAs on 132 SMs: a second
// wave of 20 tiles, each a serial K loop, 11.3 us for 5.7 us of weight bytes; then silu*mul reads its
// output back (2.5 us and a launch). Here every CTA holds all rows of x (read from L2 by every CTA:
// the weights leave the DRAM once) and kBH columns of act, so I = 4864 is 122 CTAs, one wave, and the
// epilogue applies silu*mul to the accumulators (gate column j and up column j sit in one thread).
//
// act  [M, I]   row stride lda, inner contiguous (4-byte aligned; lda even)
// x    [M, K]   row stride ldx, inner contiguous (16-byte aligned; ldx % 8 == 0), M <= 256, K % 8 == 0
// w    [2I, K]  contiguous, 16-byte aligned (gate rows 0..I-1, up rows I..2I-1: the fused gate_up
//               weight), I even
// grid ceil(I / kBH), block kThreads, dynamic shared memory kSmem. The K loop (small_m_gemm.cuh) over
// kStages stages of 42 KB (x 32 KB, the 80 weight rows 10 KB); kLag (OPPO_GATE_UP_SILU_LAG) its MMA
// groups in flight at a step's end: 1 (default, 3 stages of copies ahead) or 0 (an A/B: 4 ahead;
// Little's law: 126 KB at ~1.5 us of loaded L2 latency is ~84 GB/s an SM, under the ~112 of session
// 40's probe).
#pragma once
#include "small_m_gemm.cuh"

namespace oppo {
namespace mlp {

struct GateUpSilu : SmallM<80, 5> {
  static constexpr int kBH = 40;                 // act columns per CTA: 40 gate + 40 up weight rows
  static constexpr int kSmem = 1024 /*alignment slack*/ + kStages * kStageBytes;
  static_assert(kBN == 2 * kBH, "gate rows, then up rows");
  static_assert(kSmem <= 232448, "a CTA may have 227 KB of shared memory");
};

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};

template <typename T, int kLag>
__global__ void __launch_bounds__(GateUpSilu::kThreads, 1)
gate_up_silu_kernel(T* __restrict__ act, int64_t lda, const T* __restrict__ x, int64_t ldx,
                    const T* __restrict__ w, int M, int K, int I) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = GateUpSilu;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t s0 = (attn::smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;
  const int c0 = blockIdx.x * C::kBH;
  const int wg = tid >> 7;
  const int nblk = small_m_row_blocks(M);
  float acc[2][C::kBN / 2];
  // weight tile row j: gate row c0 + j (j < 40), else up row I + c0 + j - 40; none past column I
  small_m_k_loop<T, C, kLag>(acc, s0, x, ldx, w, M, K, 0, (K + 63) / 64, nblk, [&](int j) -> int64_t {
    const int col = c0 + (j < C::kBH ? j : j - C::kBH);
    return col < I ? (j < C::kBH ? col : static_cast<int64_t>(I) + col) : -1;
  });

  // accumulator layout (wgmma_ops.cuh): acc[mb][4i + 2h + e] is row 16 warp + g + 8h of the row
  // block, column 8i + 2t + e; gate columns are i < 5, their up columns i + 5
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  using P = Pair<T>;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wg * 128 + mb * 64 + warp * 16 + g + 8 * h;
      if (row < M) {
#pragma unroll
        for (int i = 0; i < C::kBH / 8; ++i) {
          const int col = c0 + 8 * i + 2 * t;
          if (col < I) {
            const int gi = 4 * i + 2 * h, ui = 4 * (i + C::kBH / 8) + 2 * h;
            *reinterpret_cast<typename P::type*>(act + row * lda + col) =
                P::make(silu_f(acc[mb][gi]) * acc[mb][ui], silu_f(acc[mb][gi + 1]) * acc[mb][ui + 1]);
          }
        }
      }
    }
  }
#endif
}

}  // namespace mlp
}  // namespace oppo
