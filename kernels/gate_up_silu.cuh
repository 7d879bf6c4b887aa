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
// grid ceil(I / kBH), block kThreads (two warpgroups; warpgroup g holds rows 128 g .. 128 g + 127 as
// two m64 blocks, and issues the MMAs of those that hold rows < M only: a batch of 64 rows costs a
// quarter of 256's tensor time), dynamic shared memory kSmem.
//
// The K loop runs in steps of 64 (one 128-byte swizzle panel of x and of the CTA's 80 weight rows) over
// kStages stages filled by cp.async from every thread (out-of-range rows and columns zero-filled):
// step kb waits for its stage, fences it to the async proxy and passes one barrier, issues its 8 MMAs a
// warpgroup (2 row blocks x 4 k16 steps, m64n80k16), refills the stage that step kb - 1 - kLag read,
// and waits until at most kLag MMA groups are in flight. kLag = 1 (the default): the tensor pipe runs
// across steps, 3 stages (126 KB) of copies in flight ahead; kLag = 0 (an A/B,
// OPPO_GATE_UP_SILU_LAG=0): each step's MMAs done before the next, 4 stages (168 KB) in flight, for
// when the copies' latency, not the MMAs, paces the loop (Little's law: 126 KB at ~1.5 us of loaded L2
// latency is ~84 GB/s an SM, under the ~112 of session 40's probe).
#pragma once
#include "paged_prefill_wgmma.cuh"  // sm_90a helpers: 128-byte swizzle, descriptors, fences; wgmma::Ops

namespace oppo {
namespace mlp {

struct GateUpSilu {
  static constexpr int kBH = 40;                 // act columns per CTA
  static constexpr int kBN = 2 * kBH;            // weight rows per CTA (gate, then up): the MMA's N
  static constexpr int kRows = 256;              // x rows per CTA: the whole batch
  static constexpr int kThreads = 256;
  static constexpr int kStages = 5;
  static constexpr int kABytes = kRows * 128;    // a stage's x panel: 256 rows x 64 elements
  static constexpr int kBBytes = kBN * 128;      // a stage's weight panel: 80 rows x 64 elements
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmem = 1024 /*alignment slack*/ + kStages * kStageBytes;
  static_assert(kStageBytes % 1024 == 0, "each panel on a 1024-byte boundary (the swizzle's period)");
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
  using Ops = wgmma::Ops<T>;
  using attn::wgp::swz;
  using attn::wgp::desc128;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t s0 = (attn::smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;
  const int c0 = blockIdx.x * C::kBH;
  const int nk = (K + 63) / 64;

  // k-block kb into stage s (nothing past the last k-block; the group is committed anyway, so
  // that the wait below counts the same number of groups at every step). Thread tid copies 16-byte
  // chunk tid % 8 of x rows tid / 8 + 32 i (i < 8) and of weight rows tid / 8 + 32 i (i < 3, rows
  // < 80); out-of-range rows and columns are zero-filled (src-size 0), so the loop has no branch.
  const int ch = tid & 7, r0 = tid >> 3;
  auto load = [&](int kb, int s) {
    if (kb < nk) {
      const uint32_t a_s = s0 + s * C::kStageBytes, b_s = a_s + C::kABytes;
      const int k = kb * 64 + ch * 8;
      const bool k_ok = k < K;
#pragma unroll
      for (int i = 0; i < C::kRows / 32; ++i) {
        const int r = r0 + 32 * i;
        const bool ok = k_ok && r < M;
        attn::wgp::cp_async_16_s(a_s + swz(C::kRows, r, ch), ok ? x + r * ldx + k : x, ok ? 16 : 0);
      }
#pragma unroll
      for (int i = 0; i < (C::kBN + 31) / 32; ++i) {
        const int j = r0 + 32 * i;                                  // weight row j of the CTA's 80
        if (j < C::kBN) {
          const int col = c0 + (j < C::kBH ? j : j - C::kBH);       // its act column
          const bool ok = k_ok && col < I;
          const int64_t wrow = j < C::kBH ? col : I + col;
          attn::wgp::cp_async_16_s(b_s + swz(C::kBN, j, ch), ok ? w + wrow * K + k : w, ok ? 16 : 0);
        }
      }
    }
    attn::cp_async_commit();
  };

  const int wg = tid >> 7;
  const int nblk = min(2, max(0, (M - wg * 128 + 63) / 64));   // this warpgroup's row blocks with rows < M
  float acc[2][C::kBN / 2];

#pragma unroll
  static_assert(kLag == 0 || kLag == 1, "MMA groups left in flight at a step's end");
  constexpr int kAhead = C::kStages - 1 - kLag;   // k-blocks whose copies are in flight ahead
  for (int s = 0; s < kAhead; ++s) load(s, s);
  for (int kb = 0; kb < nk; ++kb) {
    attn::cp_async_wait<kAhead - 1>();         // this thread's copies of k-block kb have landed
    attn::wgp::fence_proxy_async();            // ... and are visible to the MMAs
    __syncthreads();                           // everyone's; and step kb - 1 - kLag's MMAs are done
    const uint32_t a_s = s0 + (kb % C::kStages) * C::kStageBytes + wg * 128 * 128;
    const uint32_t b_s = s0 + (kb % C::kStages) * C::kStageBytes + C::kABytes;
    // (no register fence on acc inside the loop: with a group in flight across the back edge, ptxas
    // takes one for a definition of the accumulators and serializes every wgmma, C7515)
    // the warpgroup's row blocks that hold rows < M (warpgroup-uniform): a batch of 8, of 4 or none,
    // each whole between its fence and its commit (a branch inside a batch would serialize it)
    if (nblk == 2) {
      attn::wgp::wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = desc128(b_s + kk * 32, 16, 1024);
        const int accum = (kb > 0 || kk > 0) ? 1 : 0;
        Ops::ss_n80(acc[0], desc128(a_s + kk * 32, 16, 1024), db, accum);
        Ops::ss_n80(acc[1], desc128(a_s + 64 * 128 + kk * 32, 16, 1024), db, accum);
      }
      attn::wgp::wg_commit();
    } else if (nblk == 1) {
      attn::wgp::wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int accum = (kb > 0 || kk > 0) ? 1 : 0;
        Ops::ss_n80(acc[0], desc128(a_s + kk * 32, 16, 1024), desc128(b_s + kk * 32, 16, 1024), accum);
      }
      attn::wgp::wg_commit();
    }
    load(kb + kAhead, (kb + kAhead) % C::kStages);   // into the stage step kb - 1 - kLag read
    attn::wgp::wg_wait<kLag>();                // step kb - kLag's MMAs done (kLag 1: kb's may run on)
  }
  attn::wgp::wg_wait_all();
  attn::wgp::fence_regs(acc[0]);
  attn::wgp::fence_regs(acc[1]);

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
