// out = x w^T for the decode step's projections whose K is long and N short (down_proj: K 4864, N 896
// at 0.5B; o_proj), at most 256 rows, as one sm_90a kernel (wgmma) in clusters of 8 CTAs that split K:
//
//   out[m, n] = sum_k x[m, k] w[n, k]      (float32 sums in a fixed order; out rounded once)
//
// Why (bench/NOTES.md "Session 42"): cuBLAS runs 0.5B's down_proj at M = 256 as 64 x 32 tiles, 112
// CTAs that each read 64 rows of x over all of K (622 KB) and 32 weight rows (311 KB): 933 KB into
// one SM, x re-read by 28 column tiles (70 MB of L2 -> SM traffic), 10.3 us for ~3.7 us of bytes.
// Here a cluster holds all rows of x and 64 output columns, its 8 CTAs each take an eighth of K
// (311 KB of x, 78 KB of weights at 0.5B's down_proj: x is read by 14 column tiles, 35 MB in all), and
// the 8 float32 partials are summed through distributed shared memory: CTA r of the cluster sums
// rows 32 r .. 32 r + 31 of the 8 partials in rank order and stores them.
//
// out  [M, N]  row stride ldo, inner contiguous (16-byte aligned; ldo % 8 == 0)
// x    [M, K]  row stride ldx, inner contiguous (16-byte aligned; ldx % 8 == 0), M <= 256, K % 8 == 0
// w    [N, K]  contiguous, 16-byte aligned, N % 8 == 0
// grid 8 ceil(N / 64) CTAs in clusters of 8 along x (cluster c: columns 64 c ..), block kThreads (two
// warpgroups, rows as in gate_up_silu.cuh: each issues the MMAs of its row blocks holding rows < M),
// dynamic shared memory kSmem. The K loop (small_m_gemm.cuh, kLag 1) over the CTA's k-blocks, kStages
// stages of 40 KB (x 32 KB, the 64 weight rows 8 KB).
#pragma once
#include "small_m_gemm.cuh"

namespace oppo {
namespace mlp {

struct LinearKSplit : SmallM<64, 5> {
  static constexpr int kSplit = 8;                // CTAs a cluster, each an eighth of K
  // the float32 partial [256, kBN] after the loop, over the stages: rows of 68 floats (272 bytes:
  // the accumulators' float2 stores fall in 32 distinct banks a warp; the reduction's float4 reads
  // stay 16-byte aligned)
  static constexpr int kPartStride = kBN + 4;
  static constexpr int kPartBytes = kRows * kPartStride * 4;
  static constexpr int kBody = kStages * kStageBytes > kPartBytes ? kStages * kStageBytes : kPartBytes;
  static constexpr int kSmem = 1024 /*alignment slack*/ + kBody;
  static_assert(kSmem <= 232448, "a CTA may have 227 KB of shared memory");
  static_assert(kRows / kSplit * kBN == 8 * kThreads, "the reduction: 8 columns a thread, 32 rows a CTA");
};

template <typename T> struct Pack8;   // 8 floats -> 16 bytes of T
template <> struct Pack8<__nv_bfloat16> {
  static __device__ __forceinline__ uint4 make(const float (&v)[8]) {
    uint4 r;
    __nv_bfloat162 p[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]),
                           __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
    memcpy(&r, p, 16);
    return r;
  }
};
template <> struct Pack8<__half> {
  static __device__ __forceinline__ uint4 make(const float (&v)[8]) {
    uint4 r;
    __half2 p[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]),
                    __floats2half2_rn(v[6], v[7])};
    memcpy(&r, p, 16);
    return r;
  }
};

// Thread block clusters (sm_90): the CTA's rank, a shared address of another CTA of the cluster, its
// loads, and the cluster barrier (arrive with release, or relaxed when nothing written must be seen;
// wait with acquire). Written out rather than through cooperative_groups, whose cluster.sync() and
// generic-pointer DSMEM reads compile to a GPU-scope MEMBAR and generic loads and stores.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_map(uint32_t saddr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(saddr), "r"(rank));
  return r;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t caddr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(caddr) : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_f2(uint32_t saddr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(saddr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

template <typename T>
__global__ void __launch_bounds__(LinearKSplit::kThreads, 1)
linear_ksplit_kernel(T* __restrict__ out, int64_t ldo, const T* __restrict__ x, int64_t ldx,
                     const T* __restrict__ w, int M, int K, int N) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = LinearKSplit;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t s0 = (attn::smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;
  const int rank = static_cast<int>(cluster_ctarank());
  const int c0 = (blockIdx.x / C::kSplit) * C::kBN;
  const int nk_all = (K + 63) / 64;
  const int kb0 = rank * nk_all / C::kSplit, nk = (rank + 1) * nk_all / C::kSplit - kb0;   // this CTA's k-blocks
  const int wg = tid >> 7;
  const int nblk = small_m_row_blocks(M);
  float acc[2][C::kBN / 2];
  small_m_k_loop<T, C, 1>(acc, s0, x, ldx, w, M, K, kb0, nk, nblk,
                          [&](int j) -> int64_t { return c0 + j < N ? c0 + j : -1; });
  __syncthreads();   // every warpgroup's MMAs are done with the stages the partial overwrites

  // the partial (zeros where this CTA had no k-block: K < 8 * 64), rows of its computed row blocks
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
    if (mb < nblk) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wg * 128 + mb * 64 + warp * 16 + g + 8 * h;
#pragma unroll
        for (int i = 0; i < C::kBN / 8; ++i) {
          const int col = 8 * i + 2 * t;
          const uint32_t at = s0 + (row * C::kPartStride + col) * 4;
          if (nk > 0) st_shared_f2(at, acc[mb][4 * i + 2 * h], acc[mb][4 * i + 2 * h + 1]);
          else st_shared_f2(at, 0.f, 0.f);
        }
      }
    }
  }
  cluster_arrive_release();   // every CTA's partial written (release) and visible to the cluster (acquire)
  cluster_wait_acquire();

  // CTA `rank` sums rows 32 rank + tid / 8, columns 8 (tid % 8) .. + 7 of the 8 partials, in rank order
  {
    const int row = rank * (C::kRows / C::kSplit) + (tid >> 3), col = (tid & 7) * 8;
    if (row < M && c0 + col < N) {
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int src = 0; src < C::kSplit; ++src) {
        const uint32_t p = cluster_map(s0 + (row * C::kPartStride + col) * 4, src);
        const float4 a = ld_cluster_f4(p);
        const float4 b = ld_cluster_f4(p + 16);
        v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
        v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
      }
      *reinterpret_cast<uint4*>(out + row * ldo + c0 + col) = Pack8<T>::make(v);
    }
  }
  // no CTA leaves while another still reads its partial (the reads are done: their values are summed)
  cluster_arrive_relaxed();
  cluster_wait_acquire();
#endif
}

}  // namespace mlp
}  // namespace oppo
