// Incremental (chunked) prefill attention over a paged prefix: a chunk of n new queries per
// sequence attends to the sequence's context_len keys (prefix + the chunk itself, whose K/V are
// already in the pages), bottom-right causal: query i sits at position ctx - n + i.
//
// FlashAttention-2 structure on mma.sync m16n8k16: one CTA = (M tile, kv head, sequence),
// 4 warps x 16 rows. Rows pack (query, head of the GQA group): row r -> query r / G, head
// kvh * G + r % G, so a K/V tile read from the pages serves all G heads that share it. K and V
// tiles are double-buffered with cp.async: K and V of tile t+1 load during the whole of tile t,
// one barrier per tile. Page lookups happen once per tile row, an iteration ahead (smem offsets). Only tiles that cross the diagonal apply the mask.
#pragma once
#include "attention_common.cuh"

namespace oppo {
namespace attn {

constexpr int kPrefillThreads = 128;
constexpr int kPrefillBlockM = 64;

template <typename T, int D, int BN>
struct PrefillSmem {
  static constexpr int kRow = SmemRow<D>::kElems;
  static constexpr int kQElems = kPrefillBlockM * kRow;
  static constexpr int kTileElems = BN * kRow;
  static constexpr int kBytes = (kQElems + 4 * kTileElems) * int(sizeof(T)) + 2 * BN * 8;  // Q, K x2, V x2, row offsets x2
};

// out          [Nq, Hq, D]  (dtype T, or float32 when flags has kPrefillOutF32), strides o_s0, o_s1, inner contiguous
// q            [Nq, Hq, D]  packed by cu_seqlens_q [B+1], strides q_s0, q_s1, inner contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D], page stride page_stride
// context_lens [B] int32 (prefix + chunk);  block_tables [B, max_blocks] int32, row stride bt_stride
// grid (ceil(max_seqlen_q * G / 64), Hkv, B); the last two arguments (the wgmma kernel's item
// space, same signature) are unused
template <typename T, int D, int BN>
__global__ void __launch_bounds__(kPrefillThreads, 2)
paged_prefill_kernel(void* __restrict__ out, int flags, int64_t o_s0, int64_t o_s1,
                     const T* __restrict__ q, int64_t q_s0, int64_t q_s1,
                     const T* __restrict__ k_cache, const T* __restrict__ v_cache, int64_t page_stride,
                     Divisor block_size, Divisor Hkv, const int* __restrict__ cu_seqlens_q,
                     const int* __restrict__ context_lens, const int* __restrict__ block_tables,
                     int64_t bt_stride, Divisor G, float scale_log2, Divisor /*m_tiles*/, int /*num_items*/) {
  using S = PrefillSmem<T, D, BN>;
  constexpr int kRow = S::kRow;
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kChunks = D / kVec;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s0 = q_s + S::kQElems;
  T* v_s0 = k_s0 + 2 * S::kTileElems;
  int64_t* off_s0 = reinterpret_cast<int64_t*>(v_s0 + 2 * S::kTileElems);  // [2][BN], slot t & 1

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qr = lane >> 2, qc = lane & 3, mi = lane >> 3;
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int mt = gridDim.x - 1 - blockIdx.x;  // the longest tiles (most keys) start first
  const int q0 = cu_seqlens_q[b];
  const int n = cu_seqlens_q[b + 1] - q0;
  const int rows_total = n * G;
  const int r0 = mt * kPrefillBlockM;
  if (r0 >= rows_total) return;
  const int ctx = context_lens[b];
  const int prefix = ctx - n;
  const int i_first = r0 / G;
  const int i_last = min(n - 1, (r0 + kPrefillBlockM - 1) / G);
  const int kv_end = prefix + i_last + 1;
  const int ntiles = ceil_div(kv_end, BN);
  const int n_unmasked = (prefix + i_first + 1) / BN;  // tiles entirely at or below every row's diagonal

  const int* bt = block_tables + static_cast<int64_t>(b) * bt_stride;
  const int row_stride = Hkv * D;
  const int head_off = kvh * D;

  // Q tile: row r -> (query (r0 + r) / G, head kvh * G + (r0 + r) % G); zero past the chunk.
  for (int c = tid; c < kPrefillBlockM * kChunks; c += kPrefillThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const int row = r0 + r;
    const T* src = q;
    int bytes = 0;
    if (row < rows_total) {
      const int i = row / G, g = row % G;
      src = q + static_cast<int64_t>(q0 + i) * q_s0 + static_cast<int64_t>(kvh * G + g) * q_s1 + ch * kVec;
      bytes = 16;
    }
    cp_async_16(q_s + r * kRow + ch * kVec, src, bytes);
  }
  // Row offsets of tile u live in slot u & 1; the page of row tid of tile u+2 is fetched into a
  // register one iteration before its offset is stored.
  auto store_off = [&](int u, int page) {
    if (tid < BN)
      tile_row_offset_store(off_s0 + (u & 1) * BN, page, page_stride, block_size, row_stride, head_off, u * BN, tid);
  };
  auto page_of = [&](int u) { return tid < BN ? tile_row_page(bt, block_size, u * BN, kv_end, tid) : -1; };
  store_off(0, page_of(0));
  store_off(1, page_of(1));
  int next_page = page_of(2);
  __syncthreads();
  load_kv_tiles<T, D, BN, kPrefillThreads>(k_s0, v_s0, k_cache, v_cache, off_s0, tid);
  cp_async_commit();

  // The two rows this thread holds, and the last key each may see (padding rows see all).
  const int row_a = r0 + warp * 16 + qr, row_b = row_a + 8;
  const int lim[2] = {row_a < rows_total ? prefix + row_a / G : kv_end - 1,
                      row_b < rows_total ? prefix + row_b / G : kv_end - 1};

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  uint32_t qa[D / 16][4];

  for (int t = 0; t < ntiles; ++t) {
    const T* k_s = k_s0 + (t & 1) * S::kTileElems;
    const T* v_s = v_s0 + (t & 1) * S::kTileElems;
    cp_async_wait<0>();  // Q, K and V of tile t (issued one iteration ago)
    __syncthreads();     // ... visible to all; every warp is done with tile t-1 and its stage
    if (t + 1 < ntiles) {
      const int64_t* off = off_s0 + ((t + 1) & 1) * BN;
      load_kv_tiles<T, D, BN, kPrefillThreads>(k_s0 + ((t + 1) & 1) * S::kTileElems, v_s0 + ((t + 1) & 1) * S::kTileElems,
                                               k_cache, v_cache, off, tid);
    }
    cp_async_commit();
    store_off(t + 2, next_page);  // slot t & 1: tile t's loads were issued before this iteration's barrier
    next_page = page_of(t + 3);
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qa[kk], q_s + (warp * 16 + (lane & 15)) * kRow + kk * 16 + (lane >> 4) * 8);
    }

    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + (nn * 16 + (lane & 7) + (mi >> 1) * 8) * kRow + kk * 16 + (mi & 1) * 8);
        Mma<T>::run(s[2 * nn], qa[kk], kb[0], kb[1]);
        Mma<T>::run(s[2 * nn + 1], qa[kk], kb[2], kb[3]);
      }
    }
    if (t >= n_unmasked) {
      const int tok0 = t * BN + qc * 2;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[j][e] = (tok0 + j * 8 + (e & 1) <= lim[e >> 1]) ? s[j][e] * scale_log2 : -INFINITY;
    } else {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      float m_use;
      const float corr = online_max_step(m[h], mx, m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][2 * h] = exp2f(s[j][2 * h] - m_use);
        s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - m_use);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      l[h] = l[h] * corr + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * h] *= corr;
        o[j][2 * h + 1] *= corr;
      }
    }


#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int jj = 0; jj < D / 16; ++jj) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_s + (kk * 16 + (lane & 7) + (mi & 1) * 8) * kRow + jj * 16 + (mi >> 1) * 8);
        Mma<T>::run(o[2 * jj], pa, vb[0], vb[1]);
        Mma<T>::run(o[2 * jj + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int row = h == 0 ? row_a : row_b;
    if (row >= rows_total) continue;
    const int i = row / G, g = row % G;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    const int64_t base = static_cast<int64_t>(q0 + i) * o_s0 + static_cast<int64_t>(kvh * G + g) * o_s1 + qc * 2;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const float x = o[j][2 * h] * inv, y = o[j][2 * h + 1] * inv;
      if (flags & kPrefillOutF32) {
        *reinterpret_cast<float2*>(static_cast<float*>(out) + base + j * 8) = make_float2(x, y);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(out) + base + j * 8) = Mma<T>::pack(x, y);
      }
    }
  }
}

}  // namespace attn
}  // namespace oppo
