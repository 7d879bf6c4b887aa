// The K loop of the small-M GEMM kernels (gate_up_silu.cuh, linear_ksplit.cuh), sm_90a wgmma: every
// CTA holds all M <= 256 rows of x and kBN weight rows, and accumulates x w_tile^T over its k-blocks.
//
// Layout: two warpgroups (256 threads); warpgroup g holds rows 128 g .. 128 g + 127 as two m64 row
// blocks and issues the MMAs of those that hold rows < M only (nblk of them: a batch of 64 rows costs a
// quarter of 256's tensor time). K runs in steps of 64: one 128-byte-swizzled panel of x (256 rows,
// 32 KB) and of the weight tile (kBN rows) a stage, kStages stages filled by cp.async from every
// thread (thread tid copies 16-byte chunk tid % 8 of rows tid / 8 + 32 i; out-of-range rows and
// columns zero-filled by src-size 0, so x's copies have no branch). Step j waits for its stage,
// fences it to the async proxy and passes one barrier, issues its MMAs as one batch (m64 x kBN x k16,
// 4 k-steps a row block), refills the stage that step j - 1 - kLag read, and waits until at most
// kLag MMA groups are in flight: kLag = 1 keeps the tensor pipe running across steps with
// kStages - 2 stages of copies ahead; kLag = 0 waits for each step's MMAs and keeps one more stage of
// copies ahead (for when the copies' latency, not the MMAs, paces the loop).
// What ptxas needs to keep the MMAs asynchronous (tests/test_small_m_gemm_sass.py): no register fence
// on the accumulators inside the loop while a group is in flight (C7515), the first step's
// accumulators set by the MMA's scale-d predicate rather than zero-initialised, and no branch inside a
// batch (each of the nblk cases is a whole batch between its fence and its commit).
#pragma once
#include "paged_prefill_wgmma.cuh"  // sm_90a helpers: 128-byte swizzle, descriptors, fences; wgmma::Ops

namespace oppo {
namespace mlp {

template <int kBN_, int kStages_>
struct SmallM {
  static constexpr int kBN = kBN_;               // weight rows a CTA: the MMA's N
  static constexpr int kRows = 256;              // x rows a CTA: the whole batch
  static constexpr int kThreads = 256;
  static constexpr int kStages = kStages_;
  static constexpr int kABytes = kRows * 128;    // a stage's x panel: 256 rows x 64 elements
  static constexpr int kBBytes = kBN * 128;      // a stage's weight panel: kBN rows x 64 elements
  static constexpr int kStageBytes = kABytes + kBBytes;
  static_assert(kStageBytes % 1024 == 0, "each panel on a 1024-byte boundary (the swizzle's period)");
};

// This warpgroup's m64 row blocks that hold rows < M: 0, 1 or 2 (warpgroup-uniform).
__device__ __forceinline__ int small_m_row_blocks(int M) {
  const int wg = threadIdx.x >> 7;
  return min(2, max(0, (M - wg * 128 + 63) / 64));
}

template <typename T, int kBN>
__device__ __forceinline__ void small_m_mma(float (&d)[kBN / 2], uint64_t da, uint64_t db, int accumulate) {
  static_assert(kBN == 64 || kBN == 80, "the wgmma wrappers the small-M kernels use");
  if constexpr (kBN == 80) wgmma::Ops<T>::ss_n80(d, da, db, accumulate);
  else wgmma::Ops<T>::ss_n64(d, da, db, accumulate);
}

// acc[mb] (this warpgroup's row block mb < nblk) = x[rows, K slice] w_tile[:, K slice]^T over the
// k-blocks kb0 .. kb0 + nk - 1 (nk >= 0; with nk = 0 acc is left unset). The stages start at the
// 1024-byte-aligned shared address s0. w_row(j): the row of w (int64) that weight tile row j < kBN
// reads, or -1 for none (zero-filled). On return every MMA is done and every copy landed; the caller
// passes a barrier before it reuses the stages.
template <typename T, typename G, int kLag, typename WRow>
__device__ __forceinline__ void small_m_k_loop(float (&acc)[2][G::kBN / 2], uint32_t s0, const T* __restrict__ x,
                                               int64_t ldx, const T* __restrict__ w, int M, int K, int kb0, int nk,
                                               int nblk, WRow w_row) {
  using attn::wgp::swz;
  using attn::wgp::desc128;
  static_assert(kLag == 0 || kLag == 1, "MMA groups left in flight at a step's end");
  const int tid = threadIdx.x;
  const int ch = tid & 7, r0 = tid >> 3;
  // step j's k-block into stage s (nothing past the last one; the group is committed anyway, so that
  // the wait below counts the same number of groups at every step)
  auto load = [&](int j, int s) {
    if (j < nk) {
      const uint32_t a_s = s0 + s * G::kStageBytes, b_s = a_s + G::kABytes;
      const int k = (kb0 + j) * 64 + ch * 8;
      const bool k_ok = k < K;
#pragma unroll
      for (int i = 0; i < G::kRows / 32; ++i) {
        const int r = r0 + 32 * i;
        const bool ok = k_ok && r < M;
        attn::wgp::cp_async_16_s(a_s + swz(G::kRows, r, ch), ok ? x + r * ldx + k : x, ok ? 16 : 0);
      }
#pragma unroll
      for (int i = 0; i < (G::kBN + 31) / 32; ++i) {
        const int jr = r0 + 32 * i;
        if (G::kBN % 32 == 0 || jr < G::kBN) {
          const int64_t row = w_row(jr);
          const bool ok = k_ok && row >= 0;
          attn::wgp::cp_async_16_s(b_s + swz(G::kBN, jr, ch), ok ? w + row * K + k : w, ok ? 16 : 0);
        }
      }
    }
    attn::cp_async_commit();
  };

  const int wg = tid >> 7;
  constexpr int kAhead = G::kStages - 1 - kLag;   // steps whose copies are in flight ahead
#pragma unroll
  for (int s = 0; s < kAhead; ++s) load(s, s);
  for (int j = 0; j < nk; ++j) {
    attn::cp_async_wait<kAhead - 1>();         // this thread's copies of step j have landed
    attn::wgp::fence_proxy_async();            // ... and are visible to the MMAs
    __syncthreads();                           // everyone's; and step j - 1 - kLag's MMAs are done
    const uint32_t a_s = s0 + (j % G::kStages) * G::kStageBytes + wg * 128 * 128;
    const uint32_t b_s = s0 + (j % G::kStages) * G::kStageBytes + G::kABytes;
    if (nblk == 2) {
      attn::wgp::wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = desc128(b_s + kk * 32, 16, 1024);
        const int accum = (j > 0 || kk > 0) ? 1 : 0;
        small_m_mma<T, G::kBN>(acc[0], desc128(a_s + kk * 32, 16, 1024), db, accum);
        small_m_mma<T, G::kBN>(acc[1], desc128(a_s + 64 * 128 + kk * 32, 16, 1024), db, accum);
      }
      attn::wgp::wg_commit();
    } else if (nblk == 1) {
      attn::wgp::wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int accum = (j > 0 || kk > 0) ? 1 : 0;
        small_m_mma<T, G::kBN>(acc[0], desc128(a_s + kk * 32, 16, 1024), desc128(b_s + kk * 32, 16, 1024), accum);
      }
      attn::wgp::wg_commit();
    }
    load(j + kAhead, (j + kAhead) % G::kStages);   // into the stage step j - 1 - kLag read
    attn::wgp::wg_wait<kLag>();                // step j - kLag's MMAs done (kLag 1: j's may run on)
  }
  attn::wgp::wg_wait_all();
  attn::wgp::fence_regs(acc[0]);
  attn::wgp::fence_regs(acc[1]);
}

}  // namespace mlp
}  // namespace oppo
