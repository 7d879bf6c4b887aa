// Paged decode attention (one query token per sequence), split-KV (flash-decoding).
//
// One CTA = (split, kv head [x query-head chunk of <= 16], sequence). The up-to-16 query heads
// that share a KV head are the 16 rows of an mma.m16n8k16 A operand (GQA packing), so every
// K/V byte is read once per CTA whatever the group size. The CTA's 4 warps split each 64-token
// tile 4 ways (16 tokens each) and keep their own running max / sum / output; the warps are
// merged in shared memory at the end. K/V tiles stream through a kStages-deep cp.async
// pipeline (DecodeCfg: 4 stages for D=64, 3 for D=128). With one split the CTA writes `out`
// directly; with more, each split writes its normalised output and log-sum-exp (base 2) to the
// workspace and paged_decode_reduce_kernel merges them.
//
// P is fed to the P*V product as hi + lo halves (two mma per fragment): P rounded to bf16 alone
// costs ~1.6e-3 relative error; the second mma is free here, the kernel is memory-bound.
#pragma once
#include "attention_common.cuh"

namespace oppo {
namespace attn {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 64;  // tokens per pipeline stage (16 per warp)

// Pipeline depth and the CTAs per SM the registers must allow (launch bounds), per head dim.
// D=64: 4 stages = 74 KiB of smem -> 3 CTAs per SM on a 228 KiB SM (48 KiB in flight per CTA).
// D=128: 3 stages = 103.5 KiB -> 2 CTAs per SM (64 KiB in flight per CTA).
template <int D> struct DecodeCfg {
  static constexpr int kStages = D == 64 ? 4 : 3;
  static constexpr int kMinBlocks = D == 64 ? 3 : 2;
};

// Q (16 rows) is staged in the K buffer of the last pipeline slot: that slot is first written by
// the load issued in loop iteration 0, after the barrier that follows every warp's ldmatrix of Q.
template <typename T, int D, int kStages>
struct DecodeSmem {
  static constexpr int kRow = SmemRow<D>::kElems;
  static constexpr int kTileElems = kDecodeTile * kRow;
  static constexpr int kQOffset = (kStages - 1) * 2 * kTileElems;  // elements from the stage base
  static constexpr int kOffBytes = kStages * kDecodeTile * 8;      // row offsets, one slot per stage
  static constexpr int kBytes = kStages * 2 * kTileElems * int(sizeof(T)) + kOffBytes;
  static_assert(kStages >= 2 && 16 <= kDecodeTile, "Q must fit a K tile");
  // The warp merge reuses the pipeline buffers: o [4][16][D] + m, l [4][16] floats.
  static_assert(kStages * 2 * kTileElems * int(sizeof(T)) >= (4 * 16 * D + 2 * 4 * 16) * 4, "merge area");
};

// Page of token `pos` of a sequence (its block-table row `bt`), or -1 at or past `limit` (a bound
// in tokens: the table's width for the prologue, whose loads then need no context length, or the
// split's end inside the loop).
__device__ __forceinline__ int decode_row_page(const int* __restrict__ bt, int block_size, int pos, int limit) {
  return pos < limit ? __ldg(bt + pos / block_size) : -1;
}
// Element offset of token `pos` (page `page`) in the cache, or -1 for rows not to be read.
__device__ __forceinline__ int64_t decode_row_offset(int page, int pos, int end, int64_t page_stride,
                                                     int block_size, int row_stride, int head_off) {
  return (page >= 0 && pos < end)
             ? static_cast<int64_t>(page) * page_stride + static_cast<int64_t>(pos % block_size) * row_stride + head_off
             : -1;
}

template <typename T>
__device__ __forceinline__ void store_out4(void* out, bool out_f32, int64_t off, float4 v) {
  if (out_f32) {
    *reinterpret_cast<float4*>(static_cast<float*>(out) + off) = v;
  } else {
    uint2 u;
    u.x = Mma<T>::pack(v.x, v.y);
    u.y = Mma<T>::pack(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<T*>(out) + off) = u;
  }
}

// out          [B, Hq, D]  (dtype T, or float32 when out_f32), strides o_s0, o_s1, inner contiguous
// q            [B, Hq, D]  strides q_s0, q_s1, inner contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D], page stride page_stride
// block_tables [B, max_blocks] int32, row stride bt_stride; table_tokens = max_blocks * block_size
//              (clamped to INT_MAX);  context_lens [B] int32, each <= table_tokens
// ws_o         [B, Hq, num_splits, D] float;  ws_lse [B, Hq, num_splits] float  (num_splits > 1)
// grid (num_splits, Hkv * q_chunks, B), q_chunks = ceil(G / 16); num_splits == 1 needs partition >= ctx
template <typename T, int D, int kStages>
__global__ void __launch_bounds__(kDecodeThreads, DecodeCfg<D>::kMinBlocks)
paged_decode_kernel(void* __restrict__ out, bool out_f32, int64_t o_s0, int64_t o_s1,
                    const T* __restrict__ q, int64_t q_s0, int64_t q_s1,
                    const T* __restrict__ k_cache, const T* __restrict__ v_cache, int64_t page_stride,
                    int block_size, int Hkv, const int* __restrict__ block_tables, int64_t bt_stride,
                    int table_tokens, const int* __restrict__ context_lens, float* __restrict__ ws_o,
                    float* __restrict__ ws_lse, int G, int num_splits, int partition, float scale_log2) {
  using S = DecodeSmem<T, D, kStages>;
  constexpr int kRow = S::kRow;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  T* q_s = stage_base + S::kQOffset;
  int64_t* off_s = reinterpret_cast<int64_t*>(stage_base + kStages * 2 * S::kTileElems);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qr = lane >> 2, qc = lane & 3;
  const int split = blockIdx.x;
  const int q_chunks = (G + 15) / 16;
  const int kvh = blockIdx.y / q_chunks, qchunk = blockIdx.y % q_chunks;
  const int b = blockIdx.z;
  const int Hq = Hkv * G;
  const int start = split * partition;
  const int rows = min(16, G - qchunk * 16);
  const int hq0 = kvh * G + qchunk * 16;

  const int* bt = block_tables + static_cast<int64_t>(b) * bt_stride;
  const int row_stride = Hkv * D;
  const int head_off = kvh * D;

  // Start-up, issued before the context length is known (nothing below waits for it until the
  // row offsets): the context length, Q's copy, and the pages of the first kStages tiles (bounded
  // by the table's width, not by the context).
  const int ctx = context_lens[b];
  {
    // Q rows (zero past `rows`), its own commit group.
    constexpr int kChunks = D * int(sizeof(T)) / 16, kVec = 16 / int(sizeof(T));
    for (int c = tid; c < 16 * kChunks; c += kDecodeThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const T* src = q;
      int bytes = 0;
      if (r < rows) {
        src = q + static_cast<int64_t>(b) * q_s0 + static_cast<int64_t>(hq0 + r) * q_s1 + ch * kVec;
        bytes = 16;
      }
      cp_async_16(q_s + r * kRow + ch * kVec, src, bytes);
    }
    cp_async_commit();
  }
  // Rows of tiles 0..kStages-1 are the positions start + i, i < kStages * kDecodeTile (tile i / 64,
  // row i % 64, slot = tile), and row tid (< 64) of tile kStages.
  constexpr int kProRows = kStages * kDecodeTile;
  constexpr int kProPerThread = (kProRows + kDecodeThreads - 1) / kDecodeThreads;
  int pro_page[kProPerThread];
#pragma unroll
  for (int j = 0; j < kProPerThread; ++j) {
    const int i = tid + j * kDecodeThreads;
    pro_page[j] = i < kProRows ? decode_row_page(bt, block_size, start + i, table_tokens) : -1;
  }
  // The page of row tid of tile u is fetched one iteration before its offset is stored, so the
  // block-table latency hides behind a tile.
  int next_page = tid < kDecodeTile ? decode_row_page(bt, block_size, start + kProRows + tid, table_tokens) : -1;

  if (num_splits > 1 && start >= ctx) {  // empty split: the reduction never reads it
    cp_async_wait<0>();                  // (no copy outstanding when the CTA leaves)
    return;
  }
  const int end = min(ctx, start + partition);
  const int ntiles = end > start ? ceil_div(end - start, kDecodeTile) : 0;

  // Row offsets of tile t go to slot t % kStages; they are written kStages - 1 iterations before
  // the tile's load and made visible by the barrier at the top of the loop.
#pragma unroll
  for (int j = 0; j < kProPerThread; ++j) {
    const int i = tid + j * kDecodeThreads;
    if (i < kProRows)
      off_s[i] = decode_row_offset(pro_page[j], start + i, end, page_stride, block_size, row_stride, head_off);
  }
  auto load_tile = [&](int t) {
    T* k_s = stage_base + (t % kStages) * 2 * S::kTileElems;
    T* v_s = k_s + S::kTileElems;
    const int64_t* off = off_s + (t % kStages) * kDecodeTile;
    load_kv_tile<T, D, kDecodeTile, kDecodeThreads>(k_s, k_cache, off, tid);
    load_kv_tile<T, D, kDecodeTile, kDecodeThreads>(v_s, v_cache, off, tid);
  };
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  cp_async_wait<kStages - 1>();
  __syncthreads();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qa[kk], q_s + (lane & 15) * kRow + kk * 16 + (lane >> 4) * 8);

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1);
    cp_async_commit();
    if (t + kStages < ntiles && tid < kDecodeTile) {  // slot t % kStages: tile t is loaded already
      const int pos = start + (t + kStages) * kDecodeTile + tid;
      off_s[(t % kStages) * kDecodeTile + tid] =
          decode_row_offset(next_page, pos, end, page_stride, block_size, row_stride, head_off);
    }
    next_page = tid < kDecodeTile ? decode_row_page(bt, block_size, start + (t + kStages + 1) * kDecodeTile + tid, end)
                                  : -1;

    const T* k_s = stage_base + (t % kStages) * 2 * S::kTileElems + warp * 16 * kRow;
    const T* v_s = k_s + S::kTileElems;
    const int mi = lane >> 3;

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kb[4];
      ldmatrix_x4(kb, k_s + ((lane & 7) + (mi >> 1) * 8) * kRow + kk * 16 + (mi & 1) * 8);
      Mma<T>::run(s[0], qa[kk], kb[0], kb[1]);
      Mma<T>::run(s[1], qa[kk], kb[2], kb[3]);
    }
    const int tok0 = start + t * kDecodeTile + warp * 16 + qc * 2;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = (tok0 + nt * 8 + (e & 1) < end) ? s[nt][e] * scale_log2 : -INFINITY;

    float p_sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h: row qr (h=0) or qr+8 (h=1)
      float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m[h] - m_use);
      m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][2 * h] = exp2f(s[nt][2 * h] - m_use);
        s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - m_use);
        sum += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      p_sum[h] = sum;
      l[h] = l[h] * corr;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * h] *= corr;
        o[j][2 * h + 1] *= corr;
      }
    }
    l[0] += p_sum[0];
    l[1] += p_sum[1];

    uint32_t ph[4], pl[4];
    // A-fragment order: (row qr, tokens 0-7), (row qr+8, tokens 0-7), (qr, 8-15), (qr+8, 8-15).
    const float px[4] = {s[0][0], s[0][2], s[1][0], s[1][2]};
    const float py[4] = {s[0][1], s[0][3], s[1][1], s[1][3]};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float x = px[r], y = py[r];
      ph[r] = Mma<T>::pack(x, y);
      const float2 back = Mma<T>::unpack(ph[r]);
      pl[r] = Mma<T>::pack(x - back.x, y - back.y);
    }
#pragma unroll
    for (int jj = 0; jj < D / 16; ++jj) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_s + ((lane & 7) + (mi & 1) * 8) * kRow + jj * 16 + (mi >> 1) * 8);
      Mma<T>::run(o[2 * jj], ph, vb[0], vb[1]);
      Mma<T>::run(o[2 * jj], pl, vb[0], vb[1]);
      Mma<T>::run(o[2 * jj + 1], ph, vb[2], vb[3]);
      Mma<T>::run(o[2 * jj + 1], pl, vb[2], vb[3]);
    }
  }

  // Merge the 4 warps (pipeline buffers reused).
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  float* o_m = reinterpret_cast<float*>(stage_base);        // [4][16][D]
  float* m_m = o_m + 4 * 16 * D;                            // [4][16]
  float* l_m = m_m + 4 * 16;                                // [4][16]
  if (qc == 0) {
    m_m[warp * 16 + qr] = m[0];
    m_m[warp * 16 + qr + 8] = m[1];
    l_m[warp * 16 + qr] = l[0];
    l_m[warp * 16 + qr + 8] = l[1];
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    *reinterpret_cast<float2*>(o_m + (warp * 16 + qr) * D + j * 8 + qc * 2) = make_float2(o[j][0], o[j][1]);
    *reinterpret_cast<float2*>(o_m + (warp * 16 + qr + 8) * D + j * 8 + qc * 2) = make_float2(o[j][2], o[j][3]);
  }
  __syncthreads();
  for (int idx = tid; idx < 16 * (D / 4); idx += kDecodeThreads) {
    const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
    if (r >= rows) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) M = fmaxf(M, m_m[w * 16 + r]);
    float L = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float f = exp2f(m_m[w * 16 + r] - M);
        const float4 v = *reinterpret_cast<const float4*>(o_m + (w * 16 + r) * D + d);
        L += l_m[w * 16 + r] * f;
        acc.x += v.x * f; acc.y += v.y * f; acc.z += v.z * f; acc.w += v.w * f;
      }
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    acc.x *= inv; acc.y *= inv; acc.z *= inv; acc.w *= inv;
    const int hq = hq0 + r;
    if (num_splits == 1) {
      store_out4<T>(out, out_f32, static_cast<int64_t>(b) * o_s0 + static_cast<int64_t>(hq) * o_s1 + d, acc);
    } else {
      const int64_t slot = (static_cast<int64_t>(b) * Hq + hq) * num_splits + split;
      *reinterpret_cast<float4*>(ws_o + slot * D + d) = acc;
      if (d == 0) ws_lse[slot] = M + log2f(L);
    }
  }
}

// Merges the splits of decode: out[b, h] = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse).
// grid (Hq, B), block kDecodeReduceThreads: thread (lane l = tid / (D/4), dims 4 * (tid % (D/4)))
// accumulates the splits s = l, l + kLanes, ... in batches of 8 loads issued together, so 8 * kLanes
// (32 for D=128, 64 for D=64) splits cost one L2 round trip, not one per split. Splits past the
// context were never written (nvalid bounds them).
constexpr int kDecodeReduceThreads = 128;
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeReduceThreads)
paged_decode_reduce_kernel(void* __restrict__ out, bool out_f32, int64_t o_s0, int64_t o_s1,
                           const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                           const int* __restrict__ context_lens, int Hq, int num_splits, int partition) {
  constexpr int kDimThreads = D / 4;
  constexpr int kLanes = kDecodeReduceThreads / kDimThreads;
  constexpr int kWarps = kDecodeReduceThreads / 32;
  __shared__ float red_s[kWarps];
  __shared__ float w_s[kLanes];
  __shared__ __align__(16) float4 acc_s[kLanes][kDimThreads];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int ctx = context_lens[b];
  const int nvalid = ctx > 0 ? min(num_splits, ceil_div(ctx, partition)) : 0;
  const int64_t slot0 = (static_cast<int64_t>(b) * Hq + h) * num_splits;

  float M = -INFINITY;
  for (int s = tid; s < nvalid; s += kDecodeReduceThreads) M = fmaxf(M, ws_lse[slot0 + s]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if ((tid & 31) == 0) red_s[tid >> 5] = M;
  __syncthreads();
  M = red_s[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) M = fmaxf(M, red_s[w]);
  const float m_use = M == -INFINITY ? 0.f : M;

  const int ln = tid / kDimThreads, d = (tid % kDimThreads) * 4;
  float W = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  constexpr int kBatch = 8;  // loads issued before the first is used
  for (int s0 = ln; s0 < nvalid; s0 += kBatch * kLanes) {
    float lse[kBatch];
    float4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int s = s0 + u * kLanes;
      lse[u] = -INFINITY;
      v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (s < nvalid) {
        lse[u] = ws_lse[slot0 + s];
        v[u] = *reinterpret_cast<const float4*>(ws_o + (slot0 + s) * D + d);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const float w = exp2f(lse[u] - m_use);  // 0 for the padding (-inf)
      W += w;
      acc.x += v[u].x * w; acc.y += v[u].y * w; acc.z += v[u].z * w; acc.w += v[u].w * w;
    }
  }
  acc_s[ln][tid % kDimThreads] = acc;
  if (tid % kDimThreads == 0) w_s[ln] = W;
  __syncthreads();
  if (tid < kDimThreads) {
    float4 a = acc_s[0][tid];
    float Wt = w_s[0];
#pragma unroll
    for (int l = 1; l < kLanes; ++l) {
      const float4 v = acc_s[l][tid];
      a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
      Wt += w_s[l];
    }
    const float inv = Wt > 0.f ? 1.f / Wt : 0.f;
    a.x *= inv; a.y *= inv; a.z *= inv; a.w *= inv;
    store_out4<T>(out, out_f32, static_cast<int64_t>(b) * o_s0 + static_cast<int64_t>(h) * o_s1 + d, a);
  }
}

}  // namespace attn
}  // namespace oppo
