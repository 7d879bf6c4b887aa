// Paged decode attention (one query token per sequence), split-KV (flash-decoding).
//
// One CTA = (split, kv head [x query-head chunk of <= 16], sequence). The up-to-16 query heads
// that share a KV head are the 16 rows of an mma.m16n8k16 A operand (GQA packing), so every
// K/V byte is read once per CTA whatever the group size. The CTA's 4 warps split each 64-token
// tile 4 ways (16 tokens each) and keep their own running max / sum / output; the warps are
// merged in shared memory at the end. K/V tiles stream through a kStages-deep cp.async
// pipeline (DecodeCfg: 3 stages, 4 CTAs per SM for D=64; 2 per SM for D=128). With one
// split the CTA writes `out` directly; with more, each split writes its normalised output and log-sum-exp (base 2) to the
// workspace and paged_decode_reduce_kernel merges them (plans v2, v3). paged_decode_v4_kernel
// (plan v4, at the end of this file) does the same arithmetic in one launch: a persistent tile
// stream over work items, and the splits merged by the last CTA of each group.
//
// P is fed to the P*V product as hi + lo halves (two mma per fragment): P rounded to bf16 alone
// costs ~1.6e-3 relative error; the second mma is free here, the kernel is memory-bound.
#pragma once
#include "attention_common.cuh"

namespace oppo {
namespace attn {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 64;  // tokens per pipeline stage (16 per warp)
// paged_decode_kernel's pipe_flags beside the prefetch level (bits 0-1): see there
constexpr int kDecodeLoadsOnly = 4;
constexpr int kDecodeEarlyRefill = 8;
constexpr int kDecodeFastMerge = 16;

// The decode layer's rotary and K/V append done by the attention itself (OPPO_DECODE_ROPE_IN, the
// kRope instantiation; heads as N only): q is then the query part of the QKV projection's output
// row (q [B, Hq, D] viewed in qkv [B, (Hq + 2 Hkv) D]: the sequence's k and v follow its q heads in
// the same row), rotated here at positions[b] (half-split / NeoX, each product rounded to the dtype
// as torch and the Triton rotary do); the CTA whose split holds the new row (ctx - 1) also rotates
// that kv head's k and writes it and v to the caches at slots[b] (-1: nothing written), and puts
// both into its own tile in shared memory in place of what the pages held before the write.
struct DecodeRope {
  const float* cos_sin;      // [max_pos, D] float32: cos | sin (rotary_cos_sin_cache); nullptr: no rope
  int64_t cs_stride;
  int64_t max_pos;
  const int64_t* positions;  // [B]
  const int64_t* slots;      // [B]
  void* k_out;               // the K and V caches (the kernel's k_cache / v_cache), written at slots[b]
  void* v_out;
};

// Elements 8j..8j+7 of a head row x [D] and their partners 8j + D/2..: rotated by the cos | sin row
// `cs` (nullptr: a position past the cache, NaN as the Triton rotary gives), into lo / hi.
template <typename T, int D>
__device__ __forceinline__ void rope_rotate8(const T* __restrict__ x, const float* __restrict__ cs, int j, uint4& lo,
                                             uint4& hi) {
  constexpr int H = D / 2;
  const uint4 a = *reinterpret_cast<const uint4*>(x + 8 * j);
  const uint4 b = *reinterpret_cast<const uint4*>(x + H + 8 * j);
  float c[8], s[8];
  if (cs != nullptr) {
    const float4 c0 = *reinterpret_cast<const float4*>(cs + 8 * j), c1 = *reinterpret_cast<const float4*>(cs + 8 * j + 4);
    const float4 s0 = *reinterpret_cast<const float4*>(cs + H + 8 * j);
    const float4 s1 = *reinterpret_cast<const float4*>(cs + H + 8 * j + 4);
    c[0] = c0.x; c[1] = c0.y; c[2] = c0.z; c[3] = c0.w; c[4] = c1.x; c[5] = c1.y; c[6] = c1.z; c[7] = c1.w;
    s[0] = s0.x; s[1] = s0.y; s[2] = s0.z; s[3] = s0.w; s[4] = s1.x; s[5] = s1.y; s[6] = s1.z; s[7] = s1.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = s[i] = __int_as_float(0x7fc00000);
  }
  const T* pa = reinterpret_cast<const T*>(&a);
  const T* pb = reinterpret_cast<const T*>(&b);
  T* po = reinterpret_cast<T*>(&lo);
  T* ph = reinterpret_cast<T*>(&hi);
  // As the Triton rotary (ops/fused_triton.py _rope_pair), which the engine's other decode path
  // runs: cos / sin rounded to the dtype, x1 c - x2 s and x2 c + x1 s in float32 (each product of
  // two dtype values exact there, so fused or not the same), rounded once to the dtype. (Rounding
  // each product first, as torch's apply_rotary does, is not what a compiler keeps: session 40 found
  // Triton's form narrowed to bf16 fmas, 1 ulp off in ~2% of the elements on the H100.)
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float x1 = to_float(pa[i]), x2 = to_float(pb[i]);
    const float ci = to_float(from_float<T>(c[i])), si = to_float(from_float<T>(s[i]));   // cos.to(x.dtype)
    po[i] = from_float<T>(__fmaf_rn(x1, ci, -(x2 * si)));
    ph[i] = from_float<T>(__fmaf_rn(x2, ci, x1 * si));
  }
}

// Pipeline depth and the CTAs per SM the registers must allow (launch bounds), per head dim.
// D=64 (v3): 3 stages = 55.5 KiB of smem -> 4 CTAs per SM on a 228 KiB SM (32 KiB in flight per
//   CTA, 128 KiB per SM), registers capped at 128. With 4 stages (74 KiB, 3 per SM) the 512 CTAs
//   of B=256 x 2 kv heads took 1.29 waves of 396 slots (0.60 of copy bandwidth on an H200); 528
//   slots hold them in one wave.
// D=64 (v4): 4 stages, 3 CTAs per SM (its 128-132 registers do not allow 4).
// D=128: 3 stages = 103.5 KiB -> 2 CTAs per SM (64 KiB in flight per CTA).
template <int D, bool kV4 = false> struct DecodeCfg {
  static constexpr int kStages = D == 64 ? (kV4 ? 4 : 3) : 3;
  static constexpr int kMinBlocks = D == 64 ? (kV4 ? 3 : 4) : 2;
};
// Plan v6 (lean): D=128 with 2 stages = 69.6 KiB of smem, 3 CTAs per SM (one tile in flight per
// CTA while it computes, three CTAs per SM sharing the reads); D=64 as v3. The launch bounds of
// paged_decode_kernel follow its stage count.
template <int D> struct DecodeLeanCfg {
  static constexpr int kStages = D == 128 ? 2 : DecodeCfg<D>::kStages;
};
template <int D, int kStages> struct DecodeBounds {
  static constexpr int kMinBlocks = (D == 128 && kStages == 2) ? 3 : DecodeCfg<D>::kMinBlocks;
};

// Per-CTA timestamps of paged_decode_kernel (see CtaStamps), set by the launcher's host side
// (oppo::decode_cta_stamps); off by default. Constant memory: the check costs no register.
static __constant__ CtaStamps decode_stamps;
// Per-tile stamps (bench/decode_tiles.py), only in the kernel instantiated with kTS (the launcher
// takes it while oppo::decode_tile_stamps is on: plans v2, v3 and v7 with the heads as N, bf16):
// thread 0 of CTA c (linear id) writes rows c * kTileStampRows .. (c + 1) * kTileStampRows - 1, one
// per event in order: %globaltimer ns, event | tile << 8, the SM id. A CTA with more tiles than its
// slice holds drops the landings past its slice's last three rows, which stay for its end's three
// events; rows past the buffer are not written. The events of a CTA's life:
constexpr int kTsdStart = 0;    // its start, before its first load
constexpr int kTsdIssued = 1;   // its start-up's loads issued (Q, the first tiles' offsets and copies)
constexpr int kTsdLanded = 2;   // tile t landed (the wait and barrier at the top of iteration t passed)
constexpr int kTsdLoopEnd = 3;  // every tile computed and every copy waited on (the warps' merge next)
constexpr int kTsdStored = 4;   // its partial (or, unsplit, its output) written by thread 0
constexpr int kTsdEnd = 5;      // its end: tile 1 if it merged its group's splits after the ticket, else 0
constexpr int kTileStampRows = 128;  // ops/attention.py TILE_STAMP_ROWS
static __constant__ CtaStamps decode_tile_stamps;

// Q (16 rows) is staged in the K buffer of the last pipeline slot: that slot is first written by
// the load issued in loop iteration 0, after the barrier that follows every warp's ldmatrix of Q.
// kRS (the register-staged loader, see paged_decode_kernel): one more slot of row offsets (a tile's
// offsets are read an iteration earlier), and Q in its own area after them: the warps read their Q
// fragments from it at every tile instead of holding them in 32 registers.
template <typename T, int D, int kStages, bool kRS = false>
struct DecodeSmem {
  static constexpr int kRow = SmemRow<D>::kElems;
  static constexpr int kTileElems = kDecodeTile * kRow;
  static constexpr int kOffSlots = kStages + (kRS ? 1 : 0);
  static constexpr int kOffBytes = kOffSlots * kDecodeTile * 8;     // row offsets, one slot per stage (+1)
  static constexpr int kStageBytes = kStages * 2 * kTileElems * int(sizeof(T));
  // Q, in elements from the stage base
  static constexpr int kQOffset = kRS ? (kStageBytes + kOffBytes) / int(sizeof(T)) : (kStages - 1) * 2 * kTileElems;
  static constexpr int kBytes = kStageBytes + kOffBytes + (kRS ? 16 * kRow * int(sizeof(T)) : 0);
  static_assert(kStages >= 2 && 16 <= kDecodeTile, "Q must fit a K tile");
  // The warp merge reuses the pipeline buffers: o [4][16][D] + m, l [4][16] floats.
  static_assert(kStages * 2 * kTileElems * int(sizeof(T)) >= (4 * 16 * D + 2 * 4 * 16) * 4, "merge area");
};

// One row of D elements of the cache into L2 (prefetch_l2).
template <typename T, int D>
__device__ __forceinline__ void prefetch_row_l2(const T* p) {
  prefetch_l2<D * int(sizeof(T))>(p);
}

// Page of token `pos` of a sequence (its block-table row `bt`), or -1 at or past `limit` (a bound
// in tokens: the table's width for the prologue, whose loads then need no context length, or the
// split's end inside the loop).
__device__ __forceinline__ int decode_row_page(const int* __restrict__ bt, const Divisor& block_size, int pos, int limit) {
  return pos < limit ? __ldg(bt + pos / block_size) : -1;
}
// Element offset of token `pos` (page `page`) in the cache, or -1 for rows not to be read.
__device__ __forceinline__ int64_t decode_row_offset(int page, int pos, int end, int64_t page_stride,
                                                     const Divisor& block_size, int row_stride, int head_off) {
  return (page >= 0 && pos < end)
             ? static_cast<int64_t>(page) * page_stride + static_cast<int64_t>(pos % block_size) * row_stride + head_off
             : -1;
}

// Q's A fragments of a decode tile: held in registers (QFragRegs), or read from shared memory at
// every tile (QFragSmem: the register-staged loader's 32 registers back). frag(kk, a): columns
// 16 kk .. 16 kk + 15 of Q's 16 rows.
template <int D> struct QFragRegs {
  const uint32_t (&qa)[D / 16][4];
  __device__ __forceinline__ void operator()(int kk, uint32_t (&a)[4]) const {
    a[0] = qa[kk][0]; a[1] = qa[kk][1]; a[2] = qa[kk][2]; a[3] = qa[kk][3];
  }
};
template <typename T, int kRow> struct QFragSmem {
  const T* q_s;  // this lane's ldmatrix row base: q_s + (lane & 15) * kRow + (lane >> 4) * 8
  __device__ __forceinline__ void operator()(int kk, uint32_t (&a)[4]) const { ldmatrix_x4(a, q_s + kk * 16); }
};

// One K/V tile of a warp's 16 tokens (k_s, v_s: the warp's rows in smem): S = Q K^T masked past
// `end` (tok0: this thread's first token), the online-softmax update of (m, l, o), and O += P V
// with P split hi + lo so that P's rounding to T cancels. Shared by the v3 and v4 kernels.
template <typename T, int D, int kRow, typename QFrag>
__device__ __forceinline__ void decode_tile_update(const T* k_s, const T* v_s, const QFrag& q_frag,
                                                   int lane, int tok0, int end, float scale_log2, float (&m)[2],
                                                   float (&l)[2], float (&o)[D / 8][4]) {
  const int mi = lane >> 3;
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t kb[4], qa[4];
    q_frag(kk, qa);
    ldmatrix_x4(kb, k_s + ((lane & 7) + (mi >> 1) * 8) * kRow + kk * 16 + (mi & 1) * 8);
    Mma<T>::run(s[0], qa, kb[0], kb[1]);
    Mma<T>::run(s[1], qa, kb[2], kb[3]);
  }
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
    float m_use;
    const float corr = online_max_step(m[h], mx, m_use);
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

// movmatrix: the 8x8 b16 matrix whose row lane / 4 holds cols 2 (lane % 4) .. + 1 in `a`, transposed
// (the same fragment layout, of the transpose).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

// decode_tile_update with the heads as the mma's N (OPPO_DECODE_HEADS_AS_N, groups of <= 8 query
// heads): S^T = K Q^T, the warp's 16 tokens the M of the A operand (K by ldmatrix) and the heads
// the 8 columns of B (Q^T, in registers); O^T += V^T P^T, V^T the A operand (ldmatrix.trans) and
// P^T the B operand (P's C fragments packed, then transposed by movmatrix). Half the mma, half the
// exponentials and half the accumulators of the 16-row form, whose rows carry the heads padded to
// 16. Fragments (m16n8k16; g = lane / 4, c = lane % 4):
//   qb[kk]:  Q(head g, dims 16 kk + 2c, +1) and Q(head g, dims 16 kk + 8 + 2c, +1), packed pairs
//   s[0..1]: S^T(token g, heads 2c, 2c + 1);  s[2..3]: (token g + 8, heads 2c, 2c + 1)
//   o[j][0..1]: O^T(dim 16 j + g, heads 2c, 2c + 1);  o[j][2..3]: (dim 16 j + g + 8, same heads)
//   m[e], l[e]: head 2c + e; m is the warp's (reduced over g), l this lane's two tokens only (summed
//   over g by warp_partials_to_smem_hn).  tok0: the warp's first token.
template <typename T, int D, int kRow>
__device__ __forceinline__ void decode_tile_update_hn(const T* k_s, const T* v_s, const uint32_t (&qb)[D / 16][2],
                                                      int lane, int tok0, int end, float scale_log2, float (&m)[2],
                                                      float (&l)[2], float (&o)[D / 16][4]) {
  const int g = lane >> 2;
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // A = K (tokens x dims): matrices (tokens 0-7, dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
    uint32_t ka[4];
    ldmatrix_x4(ka, k_s + (lane & 15) * kRow + kk * 16 + (lane >> 4) * 8);
    Mma<T>::run(s, ka, qb[kk][0], qb[kk][1]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] = (tok0 + g + (e >> 1) * 8 < end) ? s[e] * scale_log2 : -INFINITY;

#pragma unroll
  for (int h = 0; h < 2; ++h) {  // head 2c + h: tokens g (s[h]) and g + 8 (s[2 + h])
    float mx = fmaxf(s[h], s[2 + h]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    float m_use;
    const float corr = online_max_step(m[h], mx, m_use);
    s[h] = exp2f(s[h] - m_use);
    s[2 + h] = exp2f(s[2 + h] - m_use);
    l[h] = l[h] * corr + (s[h] + s[2 + h]);
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      o[j][h] *= corr;
      o[j][2 + h] *= corr;
    }
  }

  // P (tokens x heads) packed hi + lo per 8x8 block (tokens 0-7, then 8-15), transposed into B's
  // fragments: P^T(tokens 2c, 2c + 1 [+ 8], head g)
  uint32_t ph[2], pl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float x = s[2 * r], y = s[2 * r + 1];
    const uint32_t hi = Mma<T>::pack(x, y);
    const float2 back = Mma<T>::unpack(hi);
    ph[r] = movmatrix_trans(hi);
    pl[r] = movmatrix_trans(Mma<T>::pack(x - back.x, y - back.y));
  }
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    // A = V^T (dims x tokens), by ldmatrix.trans of V's rows: matrices (dims 0-7, tokens 0-7),
    // (dims 8-15, tokens 0-7), (dims 0-7, tokens 8-15), (dims 8-15, tokens 8-15) of block j
    uint32_t va[4];
    ldmatrix_x4_trans(va, v_s + ((lane & 7) + (lane >> 4) * 8) * kRow + j * 16 + ((lane >> 3) & 1) * 8);
    Mma<T>::run(o[j], va, ph[0], ph[1]);
    Mma<T>::run(o[j], va, pl[0], pl[1]);
  }
}

// The heads-as-N partials of a warp into warp_partials_to_smem's layout (rows = heads; rows 8-15
// are not written: a group of <= 8 heads never reads them).
template <int D>
__device__ __forceinline__ void warp_partials_to_smem_hn(float* o_m, const float (&m)[2], float (&l)[2],
                                                         const float (&o)[D / 16][4], int warp, int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 4);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 8);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 16);
  }
  float* m_m = o_m + 4 * 16 * D;
  float* l_m = m_m + 4 * 16;
  if (g == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_m[warp * 16 + 2 * c + h] = m[h];
      l_m[warp * 16 + 2 * c + h] = l[h];
    }
  }
#pragma unroll
  for (int j = 0; j < D / 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_m[(warp * 16 + 2 * c + (e & 1)) * D + 16 * j + g + 8 * (e >> 1)] = o[j][e];
}

// The 4 warps' partials of a CTA's 16 rows in smem at o_m: o [4][16][D], then m [4][16], then
// l [4][16] floats (l summed over the 4 lanes of a row first). A barrier must follow.
template <int D>
__device__ __forceinline__ void warp_partials_to_smem(float* o_m, const float (&m)[2], float (&l)[2],
                                                      const float (&o)[D / 8][4], int warp, int qr, int qc) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  float* m_m = o_m + 4 * 16 * D;
  float* l_m = m_m + 4 * 16;
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
}

// Row r, columns d..d+3 of those partials merged: the normalised output, and the row's
// log2-domain max M and sum L (for a split's lse).
template <int D>
__device__ __forceinline__ float4 merge_warp_row(const float* o_m, int r, int d, float& M, float& L) {
  const float* m_m = o_m + 4 * 16 * D;
  const float* l_m = m_m + 4 * 16;
  M = -INFINITY;
#pragma unroll
  for (int w = 0; w < 4; ++w) M = fmaxf(M, m_m[w * 16 + r]);
  L = 0.f;
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
  return acc;
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

// Split-KV merge by the last CTA of a group (plans v4, v5 and v7): each CTA that wrote a partial
// draws a ticket from the group's counter; the one that draws ticket nvalid - 1 resets the counter
// to 0 (ready for the next launch) and merges. The partials of all threads are ordered before
// thread 0's fence by the barrier, and the fence (cumulative) makes them visible device-wide
// before the ticket: one fence per CTA, as cooperative groups' grid sync does. Returns, to every
// thread, whether this CTA merges. acq_rel: one atom.acq_rel.gpu instead of fence + atomicAdd +
// fence (the release is cumulative over the writes the barrier ordered before it, the acquire
// orders the merge's reads after it; the barrier below passes that to the CTA's other threads, as
// CUTLASS's semaphore does).
__device__ __forceinline__ bool draw_last_ticket(unsigned* counter, int nvalid, int* flag_s, bool acq_rel = false) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned prev;
    if (acq_rel) {
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(prev) : "l"(counter) : "memory");
    } else {
      __threadfence();
      prev = atomicAdd(counter, 1u);
    }
    const int last = prev == static_cast<unsigned>(nvalid - 1);
    if (last) atomicExch(counter, 0u);  // ready for the next launch
    if (!acq_rel) __threadfence();      // the other CTAs' partials are read after the ticket
    *flag_s = last;
  }
  __syncthreads();
  return *flag_s != 0;
}

// The merging CTA: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max) over the group's nvalid
// partials (rows query heads hq0.. of sequence b), online over batches of kMergeBatch loads issued
// together (L2 reads, bypassing L1: other CTAs wrote them): 16 at D=128 and 8 at D=64, or with
// kWide 32 (the fast merge at D=128: one L2 round trip for up to 32 splits).
template <typename T, int D, bool kWide = false>
__device__ __forceinline__ void merge_split_partials(void* out, bool out_f32, int64_t o_s0, int64_t o_s1,
                                                     const float* ws_o, const float* ws_lse, int b, int Hq, int hq0,
                                                     int rows, int nsplit, int nvalid, int tid) {
  constexpr int kMergeBatch = kWide ? 32 : (D == 128 ? 16 : 8);
  for (int idx = tid; idx < rows * (D / 4); idx += kDecodeThreads) {
    const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
    const int64_t slot0 = (static_cast<int64_t>(b) * Hq + hq0 + r) * nsplit;
    float M = -INFINITY, W = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < nvalid; s0 += kMergeBatch) {
      float lse[kMergeBatch];
      float4 v[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const int sp = s0 + u;
        lse[u] = -INFINITY;
        v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (sp < nvalid) {
          lse[u] = __ldcg(ws_lse + slot0 + sp);
          v[u] = __ldcg(reinterpret_cast<const float4*>(ws_o + (slot0 + sp) * D + d));
        }
      }
      float bm = M;
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) bm = fmaxf(bm, lse[u]);
      if (bm == -INFINITY) continue;
      const float c = exp2f(M - bm);  // 0 while M is -inf
      W *= c;
      acc.x *= c; acc.y *= c; acc.z *= c; acc.w *= c;
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const float w = exp2f(lse[u] - bm);  // 0 for the padding (-inf)
        W += w;
        acc.x += v[u].x * w; acc.y += v[u].y * w; acc.z += v[u].z * w; acc.w += v[u].w * w;
      }
      M = bm;
    }
    const float inv = W > 0.f ? 1.f / W : 0.f;
    acc.x *= inv; acc.y *= inv; acc.z *= inv; acc.w *= inv;
    store_out4<T>(out, out_f32, static_cast<int64_t>(b) * o_s0 + static_cast<int64_t>(hq0 + r) * o_s1 + d, acc);
  }
}

// out          [B, Hq, D]  (dtype T, or float32 when out_f32), strides o_s0, o_s1, inner contiguous
// q            [B, Hq, D]  strides q_s0, q_s1, inner contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D], strides (page_stride, row_stride, head_stride, 1):
//              token-major pages (row_stride = Hkv * D, head_stride = D) or head-major ones viewed
//              so (row_stride = D, head_stride = block_size * D)
// block_tables [B, max_blocks] int32, row stride bt_stride; table_tokens = max_blocks * block_size
//              (clamped to INT_MAX);  context_lens [B] int32, each <= table_tokens
// ws_o         [B, Hq, num_splits, D] float;  ws_lse [B, Hq, num_splits] float  (num_splits > 1)
// pipe_flags   bits 0-1 (l2_ahead): 0; 1: also prefetch into L2 the rows of the tile after those in
//              flight, as soon as their offsets are known (one tile time before its cp.async); 2: the
//              two tiles after them (the block table read one tile further ahead).
//              OPPO_DECODE_PREFETCH=0|1|2 (default 1).
//              kDecodeLoadsOnly (OPPO_DECODE_DIAG_LOADS_ONLY=1, a bench diagnostic: the output is
//              wrong): every load, wait and barrier, no tile arithmetic.
//              kDecodeEarlyRefill (OPPO_DECODE_REFILL=1, an A/B switch, off by default): each stage
//              refilled as soon as every warp has finished its tile (a second barrier per tile), not
//              after the next tile has landed: kStages tiles in flight while the CTA waits for one,
//              not kStages - 1. The refill then leads by a compute time only, so a prefetch level of
//              1 or 2 takes the level-2 path (the tile after the next refill). Session 23: -2.4% at
//              (1, 32768) alone, 3-7% slower beside the prefetch; kept to time it with the loads
//              alone (NOTES "Session 23").
//              kDecodeFastMerge (OPPO_DECODE_FAST_MERGE, default 1; v7 only): the group's ticket
//              drawn by one atom.acq_rel.gpu (no __threadfence), and at D=128 the merge's loads in
//              batches of 32, not 16. Session 25 (H100): 0.5-1.1 us off (1, 32768)'s ~56.5 in both
//              plan orders; the loads probe's bisection puts the rest of the split epilogue in the
//              merge's reads by one CTA (2.3 us) and the partials' writes (1.2 us), bench/NOTES.md.
// tickets      nullptr: with num_splits > 1 the partials go to the workspace for
//              paged_decode_reduce_kernel (v2, v3, v6); else (v7) one counter per group
//              (B * Hkv * q_chunks, zero before the launch, left at zero): the group's last CTA
//              merges its splits into `out` (draw_last_ticket), a context within split 0 is written
//              by that CTA, a context of 0 by split 0 (zeros)
// grid (Hkv * q_chunks, B, num_splits), q_chunks = ceil(G / 16); num_splits == 1 needs partition >= ctx.
// The split is the slowest grid dimension: the block scheduler hands out every group's split 0
// before any split 1, so the first wave holds the longest pieces and a split past a context's end
// (common in a decode graph captured for the longest context) takes a slot only after them. With
// the split fastest, empty CTAs were dealt alternately with real ones: in the engine's step (B=256,
// 2 splits of 384 tokens, contexts of 384; H100) the call's last CTA started 13 us into its 27.9 us
// and 17% of SM time idled at the end; split-major: 25.9 us, 6% (bench/NOTES.md, session 20).
// kRS (OPPO_DECODE_REG_STAGE=1, an A/B switch, D=128 with 3 stages only): the register-staged
//              loader. From tile kStages - 1 on, each tile is loaded by 16-byte ld.global.cg into one
//              tile of registers per thread (K and V rows: 16 x 16 bytes at D=128) an iteration
//              before it is stored to its stage with st.shared (after the barrier that frees the
//              stage); ldmatrix reads it as before. Iteration t: the barrier, tile t + kStages - 1's
//              registers to stage (t - 1) % kStages, tile t + kStages's loads issued, tile
//              t + kStages + 1's row offsets written (kStages + 1 offset slots) and prefetched into L2
//              (prefetch level 1 or 2 alike), tile t computed with Q read from its own smem area.
//              Session 25's loads probe (bench/decode_loads_probe.py, ldgst) read the same bytes 2-3%
//              faster than the cp.async loader (0.95 against 0.93 of copy at (1, 32768)). In the
//              kernel (H100, bench +rs; bench/NOTES.md "Session 25"): 2-3.5% faster than cp.async on
//              issue 7's long-CTA shapes in one call (0.996 of copy), 3-5% slower in another with
//              this loop's SASS unchanged; 4% slower at (1, 32768) in both. Stored after the
//              tile's arithmetic instead: slower everywhere; with tile 2 by cp.async: no better.
template <typename T, int D, int kStages, bool kRS = false, bool kHN = false, bool kTS = false, bool kRope = false>
__global__ void __launch_bounds__(kDecodeThreads, DecodeBounds<D, kStages>::kMinBlocks)
paged_decode_kernel(void* __restrict__ out, bool out_f32, int64_t o_s0, int64_t o_s1,
                    const T* __restrict__ q, int64_t q_s0, int64_t q_s1,
                    const T* __restrict__ k_cache, const T* __restrict__ v_cache, int64_t page_stride,
                    int row_stride, int head_stride, Divisor block_size, int Hkv,
                    const int* __restrict__ block_tables, int64_t bt_stride,
                    int table_tokens, const int* __restrict__ context_lens, float* __restrict__ ws_o,
                    float* __restrict__ ws_lse, int G, int num_splits, int partition, float scale_log2,
                    int pipe_flags, unsigned* __restrict__ tickets, DecodeRope rope) {
  using S = DecodeSmem<T, D, kStages, kRS>;
  static_assert(!kRS || (D == 128 && kStages == 3), "the register-staged loader is built for D=128, 3 stages");
  static_assert(!(kRS && kHN), "heads as N is built with the cp.async loader");
  static_assert(!kTS || kHN, "the tile stamps are built into the heads-as-N loop");
  static_assert(!kRope || (kHN && !kTS), "the rotary prologue is built into the heads-as-N loop (<= 8 query rows)");
  constexpr int kRow = S::kRow;
  constexpr int kOffSlots = S::kOffSlots;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  T* q_s = stage_base + S::kQOffset;
  int64_t* off_s = reinterpret_cast<int64_t*>(stage_base + kStages * 2 * S::kTileElems);
  cta_stamp_start(decode_stamps);
  // kTS: thread 0's next row of decode_tile_stamps (see kTsdStart)
  int ts_row = 0;
  auto tstamp = [&](int event, int tile) {
    if constexpr (kTS) {
      const CtaStamps st = decode_tile_stamps;
      const int64_t row = cta_linear_id() * kTileStampRows + ts_row;
      const bool room = ts_row < kTileStampRows - (event == kTsdLanded ? 3 : 0);
      if (threadIdx.x == 0 && st.rows != nullptr && room && row < st.capacity) {
        st.rows[3 * row] = global_ns();
        st.rows[3 * row + 1] = event | (static_cast<int64_t>(tile) << 8);
        st.rows[3 * row + 2] = sm_id();
      }
      ts_row += room ? 1 : 0;
    }
  };
  tstamp(kTsdStart, 0);
  pdl_wait();  // launched with PDL (OPPO_DECODE_PDL): the previous kernel's outputs (q, the cache) from here
  const bool loads_only = (pipe_flags & kDecodeLoadsOnly) != 0;
  const bool early = (pipe_flags & kDecodeEarlyRefill) != 0;
  const int l2_ahead = early ? ((pipe_flags & 3) > 0 ? 2 : 0) : (pipe_flags & 3);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qr = lane >> 2, qc = lane & 3;
  const int split = blockIdx.z;
  const int q_chunks = (G + 15) / 16;
  const int kvh = blockIdx.x / q_chunks, qchunk = blockIdx.x % q_chunks;
  const int b = blockIdx.y;
  const int Hq = Hkv * G;
  const int start = split * partition;
  const int rows = min(16, G - qchunk * 16);
  const int hq0 = kvh * G + qchunk * 16;

  const int* bt = block_tables + static_cast<int64_t>(b) * bt_stride;
  const int head_off = kvh * head_stride;

  // Start-up, issued before the context length is known (nothing below waits for it until the
  // row offsets): the context length, Q's copy, and the pages of the first kStages tiles (bounded
  // by the table's width, not by the context).
  const int ctx = context_lens[b];
  if constexpr (kRope) {
    cp_async_commit();  // Q is computed below (rotated), after the first tiles' loads: an empty group here keeps the count
  } else {
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
  // l2_ahead 2: the page of row tid of the tile after that one (prefetched an iteration early; kRS
  // prefetches one tile ahead at either level and never reads it)
  int far_page = !kRS && l2_ahead > 1 && tid < kDecodeTile
                     ? decode_row_page(bt, block_size, start + kProRows + kDecodeTile + tid, table_tokens)
                     : -1;

  if (num_splits > 1 && start >= ctx) {  // empty split: the reduction never reads it
    cp_async_wait<0>();                  // (no copy outstanding when the CTA leaves)
    if (tickets != nullptr && split == 0) {  // v7, a context of 0: no CTA merges, split 0 writes the zeros
      for (int idx = tid; idx < rows * (D / 4); idx += kDecodeThreads)
        store_out4<T>(out, out_f32, static_cast<int64_t>(b) * o_s0 + static_cast<int64_t>(hq0 + idx / (D / 4)) * o_s1 +
                      (idx % (D / 4)) * 4, make_float4(0.f, 0.f, 0.f, 0.f));
    }
    cta_stamp_end(decode_stamps);
    return;
  }
  const int end = min(ctx, start + partition);
  const int ntiles = end > start ? ceil_div(end - start, kDecodeTile) : 0;

  // Row offsets of tile t go to slot t % kStages; they are written kStages - 1 iterations before
  // the tile's load and made visible by the barrier at the top of the loop.
#pragma unroll
  for (int j = 0; j < kProPerThread; ++j) {
    const int i = tid + j * kDecodeThreads;
    if (i < kProRows) {
      const int64_t off = decode_row_offset(pro_page[j], start + i, end, page_stride, block_size, row_stride, head_off);
      off_s[i] = off;
      if (!kRS && l2_ahead > 0 && i >= (kStages - 1) * kDecodeTile && off >= 0) {  // tile kStages - 1: loaded in iteration 0
        prefetch_row_l2<T, D>(k_cache + off);
        prefetch_row_l2<T, D>(v_cache + off);
      }
    }
  }
  if constexpr (kRS) {  // tile kStages's offsets (slot kStages) and its L2 prefetch: its loads go in iteration 0
    if (kStages < ntiles && tid < kDecodeTile) {
      const int64_t off = decode_row_offset(next_page, start + kProRows + tid, end, page_stride, block_size,
                                            row_stride, head_off);
      off_s[kStages * kDecodeTile + tid] = off;
      if (l2_ahead > 0 && off >= 0) {
        prefetch_row_l2<T, D>(k_cache + off);
        prefetch_row_l2<T, D>(v_cache + off);
      }
    }
    next_page = tid < kDecodeTile ? decode_row_page(bt, block_size, start + kProRows + kDecodeTile + tid, end) : -1;
  }
  auto load_tile = [&](int t) {
    T* k_s = stage_base + (t % kStages) * 2 * S::kTileElems;
    T* v_s = k_s + S::kTileElems;
    const int64_t* off = off_s + (t % kStages) * kDecodeTile;
    load_kv_tiles<T, D, kDecodeTile, kDecodeThreads>(k_s, v_s, k_cache, v_cache, off, tid);
  };
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }
  tstamp(kTsdIssued, 0);
  // kRope, issued after the first tiles' copies (their latency covers these loads): Q's rows
  // rotated into q_s (rows past `rows` zero, up to the 8 the heads-as-N B operand reads), and, in the
  // CTA whose split holds the new row ctx - 1 (chunk 0: heads as N has one chunk), that row's k
  // (rotated) and v written to the caches at the slot and kept, one 16-byte chunk a thread (tid <
  // D / 4: k chunks then v chunks), for its tile in the loop (patch_t), whose copy read the row
  // before this write.
  int patch_t = -1, patch_row = 0;
  uint4 patch = make_uint4(0u, 0u, 0u, 0u);
  if constexpr (kRope) {
    const int64_t pos = rope.positions[b];
    const float* cs = pos >= 0 && pos < rope.max_pos ? rope.cos_sin + pos * rope.cs_stride : nullptr;
    const T* qrow = q + static_cast<int64_t>(b) * q_s0;   // the sequence's qkv row (q_s1 == D: heads back to back)
    constexpr int kJ = D / 16;                             // 8-element pairs of a head (first half, second half)
    for (int c = tid; c < 8 * kJ; c += kDecodeThreads) {
      const int r = c / kJ, j = c % kJ;
      uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
      if (r < rows) rope_rotate8<T, D>(qrow + static_cast<int64_t>(hq0 + r) * D, cs, j, lo, hi);
      *reinterpret_cast<uint4*>(q_s + r * kRow + 8 * j) = lo;
      *reinterpret_cast<uint4*>(q_s + r * kRow + D / 2 + 8 * j) = hi;
    }
    const int64_t slot = rope.slots[b];
    if (slot >= 0 && ctx >= 1 && ctx - 1 >= start && ctx - 1 < end) {
      patch_t = (ctx - 1 - start) / kDecodeTile;
      patch_row = (ctx - 1 - start) % kDecodeTile;
      const int sl = static_cast<int>(slot);
      const int64_t off = static_cast<int64_t>(sl / block_size) * page_stride +
                          static_cast<int64_t>(sl % block_size) * row_stride + head_off;
      if (tid < D / 8) {           // k chunk tid (elements 8 tid..): rotated
        uint4 lo, hi;
        rope_rotate8<T, D>(qrow + static_cast<int64_t>(Hq + kvh) * D, cs, tid % kJ, lo, hi);
        patch = tid < kJ ? lo : hi;
        *reinterpret_cast<uint4*>(static_cast<T*>(rope.k_out) + off + 8 * tid) = patch;
      } else if (tid < D / 4) {    // v chunk tid - D / 8: as the projection gave it
        const int jj = tid - D / 8;
        patch = *reinterpret_cast<const uint4*>(qrow + static_cast<int64_t>(Hq + Hkv + kvh) * D + 8 * jj);
        *reinterpret_cast<uint4*>(static_cast<T*>(rope.v_out) + off + 8 * jj) = patch;
      }
    }
  }
  if (!kRS && l2_ahead > 1 && kStages < ntiles && tid < kDecodeTile) {  // tile kStages (l2_ahead 1: in iteration 0)
    const int64_t off = decode_row_offset(next_page, start + kProRows + tid, end, page_stride, block_size, row_stride,
                                          head_off);
    if (off >= 0) {
      prefetch_row_l2<T, D>(k_cache + off);
      prefetch_row_l2<T, D>(v_cache + off);
    }
  }

  // kHN (heads as the mma's N, groups of <= 8 heads): o is O^T's fragments, see decode_tile_update_hn
  constexpr int kOJ = kHN ? D / 16 : D / 8;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kOJ][4];
#pragma unroll
  for (int j = 0; j < kOJ; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  if constexpr (kRS) {
    // one tile of K and V rows in registers: pass i of thread tid holds row tid / kChunks + i * kRowsPerPass,
    // bytes 16 (tid % kChunks) .. of it (load_kv_tiles' pattern)
    constexpr int kChunks = D * int(sizeof(T)) / 16, kVec = 16 / int(sizeof(T));
    constexpr int kRowsPerPass = kDecodeThreads / kChunks, kPasses = kDecodeTile / kRowsPerPass;
    uint4 rk[kPasses], rv[kPasses];
    auto ld_regs = [&](int t) {
      const int64_t* off = off_s + (t % kOffSlots) * kDecodeTile;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int64_t o_r = off[tid / kChunks + i * kRowsPerPass];
        rk[i] = rv[i] = make_uint4(0u, 0u, 0u, 0u);
        if (o_r >= 0) {  // rows past the split's end (-1): zeros, as cp.async's zero fill
          rk[i] = __ldcg(reinterpret_cast<const uint4*>(k_cache + o_r + (tid % kChunks) * kVec));
          rv[i] = __ldcg(reinterpret_cast<const uint4*>(v_cache + o_r + (tid % kChunks) * kVec));
        }
      }
    };
    auto st_regs = [&](int t) {
      T* k_st = stage_base + (t % kStages) * 2 * S::kTileElems;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int e = (tid / kChunks + i * kRowsPerPass) * kRow + (tid % kChunks) * kVec;
        *reinterpret_cast<uint4*>(k_st + e) = rk[i];
        *reinterpret_cast<uint4*>(k_st + S::kTileElems + e) = rv[i];
      }
    };
    if (kStages - 1 < ntiles) ld_regs(kStages - 1);
    cp_async_wait<kStages - 1>();  // Q
    __syncthreads();
    const QFragSmem<T, kRow> q_frag{q_s + (lane & 15) * kRow + (lane >> 4) * 8};
    for (int t = 0; t < ntiles; ++t) {
      // tiles 0 .. kStages - 2 came by cp.async (one group each, after Q's)
      if (t == 0)
        cp_async_wait<kStages - 2>();
      else if (t < kStages - 1)
        cp_async_wait<0>();
      __syncthreads();  // tile t visible; every warp is past tile t - 1, whose stage takes tile t + kStages - 1
      if (t + kStages - 1 < ntiles) st_regs(t + kStages - 1);
      if (t + kStages < ntiles) ld_regs(t + kStages);
      if (t + kStages + 1 < ntiles && tid < kDecodeTile) {  // its slot held tile t's offsets, read long ago
        const int pos = start + (t + kStages + 1) * kDecodeTile + tid;
        const int64_t off = decode_row_offset(next_page, pos, end, page_stride, block_size, row_stride, head_off);
        off_s[((t + kStages + 1) % kOffSlots) * kDecodeTile + tid] = off;
        if (l2_ahead > 0 && off >= 0) {  // its loads are issued next iteration
          prefetch_row_l2<T, D>(k_cache + off);
          prefetch_row_l2<T, D>(v_cache + off);
        }
      }
      next_page = tid < kDecodeTile
                      ? decode_row_page(bt, block_size, start + (t + kStages + 2) * kDecodeTile + tid, end)
                      : -1;
      const T* k_s = stage_base + (t % kStages) * 2 * S::kTileElems + warp * 16 * kRow;
      if (!loads_only)
        decode_tile_update<T, D, kRow>(k_s, k_s + S::kTileElems, q_frag, lane,
                                       start + t * kDecodeTile + warp * 16 + qc * 2, end, scale_log2, m, l, o);
    }
  } else {
    cp_async_wait<kStages - 1>();
    __syncthreads();
    uint32_t qa[kHN ? 1 : D / 16][4];  // the A fragments of Q's 16 rows, or (kHN) Q^T's B fragments
    uint32_t qb[kHN ? D / 16 : 1][2];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if constexpr (kHN) {
        qb[kk][0] = *reinterpret_cast<const uint32_t*>(q_s + qr * kRow + kk * 16 + 2 * qc);
        qb[kk][1] = *reinterpret_cast<const uint32_t*>(q_s + qr * kRow + kk * 16 + 8 + 2 * qc);
      } else {
        ldmatrix_x4(qa[kk], q_s + (lane & 15) * kRow + kk * 16 + (lane >> 4) * 8);
      }
    }
    if (early) {  // the last slot (Q's) is free once every warp holds Q: its tile goes now, not in iteration 0
      __syncthreads();
      if (kStages - 1 < ntiles) load_tile(kStages - 1);
      cp_async_commit();
    }

    for (int t = 0; t < ntiles; ++t) {
      // pending copy groups behind tile t: tiles t+1 .. t+kStages-1 (early), t+1 .. t+kStages-2 (not)
      if (early) {
        cp_async_wait<kStages - 1>();
        __syncthreads();
      } else {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1);
        cp_async_commit();
      }
      if constexpr (kRope) {
        if (t == patch_t) {  // (uniform) the new row's tile: its K / V as written above, over the copy of the old
          if (tid < D / 4)
            *reinterpret_cast<uint4*>(stage_base + (t % kStages) * 2 * S::kTileElems + (tid < D / 8 ? 0 : S::kTileElems) +
                                      patch_row * kRow + 8 * (tid % (D / 8))) = patch;
          __syncthreads();
        }
      }
      tstamp(kTsdLanded, t);
      if (t + kStages < ntiles && tid < kDecodeTile) {  // slot t % kStages: tile t is loaded already
        const int pos = start + (t + kStages) * kDecodeTile + tid;
        const int64_t off = decode_row_offset(next_page, pos, end, page_stride, block_size, row_stride, head_off);
        off_s[(t % kStages) * kDecodeTile + tid] = off;
        if (l2_ahead == 1 && off >= 0) {  // tile t + kStages: its cp.async is issued next iteration
          prefetch_row_l2<T, D>(k_cache + off);
          prefetch_row_l2<T, D>(v_cache + off);
        }
      }
      if (l2_ahead > 1) {  // tile t + kStages + 1 (its page was read an iteration ago), then one page further
        if (t + kStages + 1 < ntiles && tid < kDecodeTile) {
          const int pos = start + (t + kStages + 1) * kDecodeTile + tid;
          const int64_t off = decode_row_offset(far_page, pos, end, page_stride, block_size, row_stride, head_off);
          if (off >= 0) {
            prefetch_row_l2<T, D>(k_cache + off);
            prefetch_row_l2<T, D>(v_cache + off);
          }
        }
        next_page = far_page;
        far_page = tid < kDecodeTile
                       ? decode_row_page(bt, block_size, start + (t + kStages + 2) * kDecodeTile + tid, end)
                       : -1;
      } else {
        next_page = tid < kDecodeTile
                        ? decode_row_page(bt, block_size, start + (t + kStages + 1) * kDecodeTile + tid, end)
                        : -1;
      }

      const T* k_s = stage_base + (t % kStages) * 2 * S::kTileElems + warp * 16 * kRow;
      if (!loads_only) {
        if constexpr (kHN)
          decode_tile_update_hn<T, D, kRow>(k_s, k_s + S::kTileElems, qb, lane, start + t * kDecodeTile + warp * 16,
                                            end, scale_log2, m, l, o);
        else
          decode_tile_update<T, D, kRow>(k_s, k_s + S::kTileElems, QFragRegs<D>{qa}, lane,
                                         start + t * kDecodeTile + warp * 16 + qc * 2, end, scale_log2, m, l, o);
      }
      if (early) {  // slot t % kStages is free once every warp is past tile t; tile t + kStages's offsets
        __syncthreads();  // (written above, in this slot's offsets) are visible after this barrier too
        if (t + kStages < ntiles) load_tile(t + kStages);
        cp_async_commit();
      }
    }
  }

  // Merge the 4 warps (pipeline buffers reused).
  cp_async_wait<0>();
  pdl_launch_dependents();  // every read is done: the reduction (or the next op) may be scheduled
  __syncthreads();
  tstamp(kTsdLoopEnd, 0);
  float* o_m = reinterpret_cast<float*>(stage_base);        // warp partials, see warp_partials_to_smem
  if constexpr (kHN)
    warp_partials_to_smem_hn<D>(o_m, m, l, o, warp, lane);
  else
    warp_partials_to_smem<D>(o_m, m, l, o, warp, qr, qc);
  __syncthreads();
  // v7 (tickets): the group's splits that hold part of the context (ctx > 0 here when split); a
  // context within split 0 is written by that CTA directly
  const int nvalid =
      tickets != nullptr && num_splits > 1 ? min(num_splits, (ctx - 1) / partition + 1) : num_splits;
  const bool direct = num_splits == 1 || nvalid == 1;
  for (int idx = tid; idx < 16 * (D / 4); idx += kDecodeThreads) {
    const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
    if (r >= rows) continue;
    float M, L;
    const float4 acc = merge_warp_row<D>(o_m, r, d, M, L);
    const int hq = hq0 + r;
    if (direct) {
      store_out4<T>(out, out_f32, static_cast<int64_t>(b) * o_s0 + static_cast<int64_t>(hq) * o_s1 + d, acc);
    } else {
      const int64_t slot = (static_cast<int64_t>(b) * Hq + hq) * num_splits + split;
      *reinterpret_cast<float4*>(ws_o + slot * D + d) = acc;
      if (d == 0) ws_lse[slot] = M + log2f(L);
    }
  }
  tstamp(kTsdStored, 0);
  bool merged = false;
  if (tickets != nullptr && !direct) {  // v7: the group's last CTA merges its splits (no reduction kernel)
    __shared__ int flag_s;
    const bool fast = (pipe_flags & kDecodeFastMerge) != 0;
    if (draw_last_ticket(tickets + static_cast<int64_t>(b) * gridDim.x + blockIdx.x, nvalid, &flag_s, fast)) {
      merged = true;
      // 32-split batches only where the registers allow them: D=128 at 2 CTAs per SM (v7's 3
      // stages; the lean 2-stage instantiation, 3 CTAs per SM, would spill, and never merges here)
      if (fast)
        merge_split_partials<T, D, D == 128 && kStages >= 3>(out, out_f32, o_s0, o_s1, ws_o, ws_lse, b, Hq, hq0,
                                                             rows, num_splits, nvalid, tid);
      else
        merge_split_partials<T, D>(out, out_f32, o_s0, o_s1, ws_o, ws_lse, b, Hq, hq0, rows, num_splits, nvalid, tid);
    }
  }
  tstamp(kTsdEnd, merged ? 1 : 0);
  cta_stamp_end(decode_stamps);  // thread 0's last store: within the merge's few loads of the CTA's end
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
  pdl_wait();  // launched with PDL: the split kernel's partials are complete and visible from here
  pdl_launch_dependents();
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

// ---------------------------------------------------------------------------------------------
// v4 (OPPO_DECODE_PLAN=v4): one kernel, no reduction kernel.
//
// Work item = (split, group), group = (sequence b, kv head, query-head chunk); item = group *
// num_splits + split. The grid is at most one wave of resident CTAs and CTA c takes the items
// c, c + gridDim.x, ... (the no-split plan launches min(groups, resident slots) CTAs; the split
// plan launches one CTA per item).
//
// Tile stream: a CTA's items are one stream of 64-token tiles through the same kStages-deep
// pipeline, so the loads of the next item's first tiles are in flight while the current item
// finishes (no per-item start-up, no drain between items). A producer cursor (uniform over the
// CTA) walks the items kStages + 1 tiles ahead of the consumer: for stream tile u it fetches the
// pages (threads 0..63, one row each) at iteration u - kStages - 1, stores the row offsets at
// u - kStages, the tile's load is issued at u - kStages + 1 and it is consumed at u (as in v3).
// The cursor also writes a record per tile (item, first token, end, first/last flags, number of
// non-empty splits of its group) into a ring of 8 in smem, which the consumer reads: the consumer
// never reads context_lens. An item has ceil((end - start) / 64) tiles; split 0 of a context of
// 0 has one tile with every row masked (its output is zeros); a split past the context (start >=
// ctx, split > 0) has none and is skipped. Past the CTA's last item the records say "end" and the
// loads are zero fills (no global read).
//
// Q: loaded straight into the mma A fragments (registers) from global memory when an item starts
// (issued right after the previous item's last tile, so the loads overlap its merge).
//
// End of an item: the 4 warps are merged in the smem slot of the tile just consumed (the next
// load into that slot is issued one iteration later, after a barrier). Then:
//   - nvalid <= 1 (no split, or a context within split 0, or a context of 0): `out` directly;
//   - else the split's normalised output and log-sum-exp go to the workspace; the CTA
//     synchronises, thread 0 fences (__threadfence), draws a ticket (atomicAdd on the group's
//     counter) and fences again; the CTA that draws ticket nvalid - 1 resets the counter
//     to 0 and merges the group's nvalid partials (read with __ldcg, L2) into `out`.
// The counters must be 0 before the launch; the last CTA of each group leaves its counter at 0
// (who provides zeroed counters: see the launcher, csrc/paged_decode_attention.cu).
struct DecodeV4Params {
  void* out;                 // [B, Hq, D], T or float32 (out_f32)
  const void* q;             // [B, Hq, D]
  const void* k_cache;       // [num_blocks, block_size, Hkv, D], page stride page_stride
  const void* v_cache;
  const int* block_tables;   // [B, max_blocks], row stride bt_stride
  const int* context_lens;   // [B], each <= table_tokens
  float* ws_o;               // [B, Hq, num_splits, D]   (num_splits > 1)
  float* ws_lse;             // [B, Hq, num_splits]
  unsigned* tickets;         // [B * Hkv * q_chunks], zero before the launch (num_splits > 1)
  unsigned* claims;          // v5: [2] (claim, exit), zero before the launch; nullptr: v4's static items
  int64_t o_s0, o_s1, q_s0, q_s1, page_stride, bt_stride;
  int row_stride, head_stride;  // cache strides of a token row and of a kv head (elements)
  int block_size, Hkv, G, q_chunks, table_tokens, num_splits, partition, num_items;
  float scale_log2;
  bool out_f32;
};

template <typename T, int D, int kStages>
struct DecodeV4Smem {
  static constexpr int kRow = SmemRow<D>::kElems;
  static constexpr int kTileElems = kDecodeTile * kRow;
  static constexpr int kSlotBytes = 2 * kTileElems * int(sizeof(T));  // K + V of one stage
  static constexpr int kStageBytes = kStages * kSlotBytes;
  static constexpr int kOffBytes = kStages * kDecodeTile * 8;          // row offsets, one slot per stage
  static constexpr int kRecs = 8;                                       // tile records (ring)
  static constexpr int kBytes = kStageBytes + kOffBytes + kRecs * 16 + 16 + 16;  // + flag, + claim slot
  static_assert(kStages + 1 <= kRecs, "a record is written kStages + 1 iterations before its use");
  // The warp merge of an item uses one stage slot: o [4][16][D] + m, l [4][16] floats.
  static_assert(kSlotBytes >= (4 * 16 * D + 2 * 4 * 16) * 4, "merge area");
};

constexpr int kRecLast = 1, kRecFirst = 2;  // record flags (bits 0-1; nvalid in bits 2-31)

template <typename T, int D, int kStages>
__global__ void __launch_bounds__(kDecodeThreads, DecodeCfg<D, true>::kMinBlocks)
paged_decode_v4_kernel(const DecodeV4Params p) {
  using S = DecodeV4Smem<T, D, kStages>;
  constexpr int kRow = S::kRow;
  constexpr int kTileElems = S::kTileElems;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage_base = reinterpret_cast<T*>(smem_raw);
  int64_t* off_s = reinterpret_cast<int64_t*>(smem_raw + S::kStageBytes);
  int4* rec_s = reinterpret_cast<int4*>(smem_raw + S::kStageBytes + S::kOffBytes);
  int* flag_s = reinterpret_cast<int*>(rec_s + S::kRecs);
  int2* claim_s = reinterpret_cast<int2*>(flag_s + 4);

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k_cache = static_cast<const T*>(p.k_cache);
  const T* __restrict__ v_cache = static_cast<const T*>(p.v_cache);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qr = lane >> 2, qc = lane & 3;
  const int nsplit = p.num_splits, q_chunks = p.q_chunks, per_b = p.Hkv * q_chunks;
  const int row_stride = p.row_stride;
  const int step = gridDim.x;

  // ---- producer cursor (the same values in every thread) ----
  int p_item = static_cast<int>(blockIdx.x) - step;  // the item being walked (>= num_items: none left)
  int p_local = 0, p_nt = 0, p_start = 0, p_end = 0, p_nvalid = 0, p_b = 0, p_head = 0;
  auto ctx_of = [&](int item) -> int {
    return item < p.num_items ? __ldg(p.context_lens + (item / nsplit) / per_b) : 0;
  };
  int p_ctx_next = ctx_of(blockIdx.x);  // context length of item p_item + step, loaded one item ahead
  // Enters `item` (context length c): false for an empty split (skipped), true otherwise and at the end.
  auto enter = [&](int item, int c) -> bool {
    p_item = item;
    p_local = 0;
    if (item >= p.num_items) return true;
    const int split = item % nsplit, group = item / nsplit;
    p_b = group / per_b;
    p_head = ((group / q_chunks) % p.Hkv) * p.head_stride;
    p_start = split * p.partition;
    if (split > 0 && p_start >= c) return false;
    p_end = min(c, p_start + p.partition);
    p_nt = p_end > p_start ? ceil_div(p_end - p_start, kDecodeTile) : 1;  // 1: split 0 of a context of 0
    p_nvalid = c > 0 ? min(nsplit, (c - 1) / p.partition + 1) : 0;
    return true;
  };
  auto advance = [&]() {
    if (p.claims == nullptr) {  // v4: items blockIdx.x, blockIdx.x + step, ...
      int it = p_item;
      while (true) {
        it += step;
        const int c = p_ctx_next;
        p_ctx_next = ctx_of(it + step);
        if (enter(it, c)) break;
      }
      return;
    }
    // v5: the first item is blockIdx.x (its pages were fetched speculatively), then items claimed
    // from the counter (step + ticket: the first `step` items are the CTAs' first ones). Thread 0
    // claims until it draws a non-empty item or one past the end and publishes it with its
    // context length; every thread enters it after the barrier. Called by all threads alike
    // (produce is), so the barriers are uniform; the second one keeps the slot from being
    // overwritten by the next claim before everyone has read it.
    if (p_item < 0 && enter(blockIdx.x, p_ctx_next)) return;
    if (tid == 0) {
      int it, c;
      do {
        it = step + static_cast<int>(atomicAdd(p.claims, 1u));
        c = ctx_of(it);
      } while (it < p.num_items && (it % nsplit) > 0 && (it % nsplit) * p.partition >= c);
      *claim_s = make_int2(it, c);
    }
    __syncthreads();
    const int2 cl = *claim_s;
    __syncthreads();
    enter(cl.x, cl.y);  // true: thread 0 skipped the empty splits
  };
  // Producer step for stream tile u: its record, and (threads < 64) the page and in-page offset of
  // row tid, or page -1 (rows past the item's end or the stream's). `spec` is the page fetched
  // for the first item before its context length was known (kNoSpec: none).
  constexpr int kNoSpec = -2;
  const int item0 = blockIdx.x;
  auto produce = [&](int u, int spec, int& page, int64_t& rowoff) {
    page = -1;
    rowoff = 0;
    if (p_item < p.num_items) {
      const int tok = p_start + p_local * kDecodeTile;
      if (tid == 0) {
        const int flags = (p_local == 0 ? kRecFirst : 0) | (p_local + 1 == p_nt ? kRecLast : 0);
        rec_s[u & (S::kRecs - 1)] = make_int4(p_item, tok, p_end, flags | (p_nvalid << 2));
      }
      if (tid < kDecodeTile) {
        const int pos = tok + tid;
        if (pos < p_end)
          page = (spec != kNoSpec && p_item == item0)
                     ? spec
                     : __ldg(p.block_tables + static_cast<int64_t>(p_b) * p.bt_stride + pos / p.block_size);
        rowoff = static_cast<int64_t>(pos % p.block_size) * row_stride + p_head;
      }
      if (++p_local == p_nt) advance();
    } else if (tid == 0) {
      rec_s[u & (S::kRecs - 1)] = make_int4(-1, 0, 0, 0);
    }
  };

  // ---- Q of an item -> the A fragments (rows past the item's heads are zero) ----
  uint32_t qa[D / 16][4];
  auto load_q = [&](int item) {
    const int group = item / nsplit, rem = group % per_b;
    const int b = group / per_b, kvh = rem / q_chunks, qch = rem % q_chunks;
    const int rows = min(16, p.G - qch * 16);
    const T* base = q + static_cast<int64_t>(b) * p.q_s0 + static_cast<int64_t>(kvh * p.G + qch * 16) * p.q_s1 + qc * 2;
    const T* r0 = base + static_cast<int64_t>(qr) * p.q_s1;
    const T* r1 = base + static_cast<int64_t>(qr + 8) * p.q_s1;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = qr < rows ? __ldg(reinterpret_cast<const unsigned*>(r0 + kk * 16)) : 0u;
      qa[kk][1] = qr + 8 < rows ? __ldg(reinterpret_cast<const unsigned*>(r1 + kk * 16)) : 0u;
      qa[kk][2] = qr < rows ? __ldg(reinterpret_cast<const unsigned*>(r0 + kk * 16 + 8)) : 0u;
      qa[kk][3] = qr + 8 < rows ? __ldg(reinterpret_cast<const unsigned*>(r1 + kk * 16 + 8)) : 0u;
    }
  };

  // ---- start-up: pages of the first kStages + 1 tiles of item0 and its Q, issued before its
  // context length is known (bounded by the split's end and the table's width) ----
  int spec[kStages + 1];
  {
    int b0 = 0, start0 = 0, limit0 = 0;
    if (item0 < p.num_items) {
      b0 = (item0 / nsplit) / per_b;
      start0 = (item0 % nsplit) * p.partition;
      limit0 = min(p.table_tokens, start0 + p.partition);
    }
#pragma unroll
    for (int j = 0; j <= kStages; ++j) {
      const int pos = start0 + j * kDecodeTile + tid;
      spec[j] = (tid < kDecodeTile && pos < limit0)
                    ? __ldg(p.block_tables + static_cast<int64_t>(b0) * p.bt_stride + pos / p.block_size)
                    : -1;
    }
  }
  int q_item = -1;  // the item whose Q is in qa
  if (item0 < p.num_items) {
    load_q(item0);
    q_item = item0;
  }
  advance();  // the first item (waits for its context length)

  int next_page;        // page of row tid of the tile whose offsets are stored next
  int64_t next_rowoff;
#pragma unroll
  for (int j = 0; j <= kStages; ++j) {
    int page;
    int64_t rowoff;
    produce(j, spec[j], page, rowoff);
    if (j < kStages) {
      if (tid < kDecodeTile) off_s[j * kDecodeTile + tid] = page >= 0 ? static_cast<int64_t>(page) * p.page_stride + rowoff : -1;
    } else {
      next_page = page;
      next_rowoff = rowoff;
    }
  }
  auto load_tile = [&](int slot) {
    T* k_s = stage_base + slot * 2 * kTileElems;
    T* v_s = k_s + kTileElems;
    const int64_t* off = off_s + slot * kDecodeTile;
    load_kv_tiles<T, D, kDecodeTile, kDecodeThreads>(k_s, v_s, k_cache, v_cache, off, tid);
  };
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_tile(s);
    cp_async_commit();
  }

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  for (int t = 0;; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int4 rec = rec_s[t & (S::kRecs - 1)];
    if (rec.x < 0) break;  // uniform: every thread read the same record
    load_tile((t + kStages - 1) % kStages);  // slot of tile t - 1 (zero fills past the stream's end)
    cp_async_commit();
    if (tid < kDecodeTile)  // tile t + kStages: slot t % kStages (tile t is in smem already)
      off_s[(t % kStages) * kDecodeTile + tid] =
          next_page >= 0 ? static_cast<int64_t>(next_page) * p.page_stride + next_rowoff : -1;
    produce(t + kStages + 1, kNoSpec, next_page, next_rowoff);
    if (rec.x != q_item) {  // first tile of an item whose Q was not prefetched
      load_q(rec.x);
      q_item = rec.x;
    }

    const int slot = t % kStages;
    const T* k_s = stage_base + slot * 2 * kTileElems + warp * 16 * kRow;
    decode_tile_update<T, D, kRow>(k_s, k_s + kTileElems, QFragRegs<D>{qa}, lane, rec.y + warp * 16 + qc * 2, rec.z, p.scale_log2,
                                   m, l, o);

    if (!(rec.w & kRecLast)) continue;

    // ---- end of an item ----
    const int item = rec.x, nvalid = rec.w >> 2;
    const int split = item % nsplit, group = item / nsplit;
    const int b = group / per_b, rem = group % per_b;
    const int kvh = rem / q_chunks, qch = rem % q_chunks;
    const int rows = min(16, p.G - qch * 16), hq0 = kvh * p.G + qch * 16;
    const int Hq = p.Hkv * p.G;
    const bool direct = nvalid <= 1;
    {
      const int nx = rec_s[(t + 1) & (S::kRecs - 1)].x;  // the next item's Q, loaded during the merge
      if (nx >= 0 && nx != q_item) {
        load_q(nx);
        q_item = nx;
      }
    }
    __syncthreads();  // every warp is done reading slot t % kStages: it becomes the merge area
    float* o_m = reinterpret_cast<float*>(stage_base + slot * 2 * kTileElems);  // see warp_partials_to_smem
    warp_partials_to_smem<D>(o_m, m, l, o, warp, qr, qc);
    __syncthreads();
    for (int idx = tid; idx < rows * (D / 4); idx += kDecodeThreads) {
      const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
      float M, L;
      const float4 acc = merge_warp_row<D>(o_m, r, d, M, L);
      const int hq = hq0 + r;
      if (direct) {
        store_out4<T>(p.out, p.out_f32, static_cast<int64_t>(b) * p.o_s0 + static_cast<int64_t>(hq) * p.o_s1 + d, acc);
      } else {
        const int64_t ws_slot = (static_cast<int64_t>(b) * Hq + hq) * nsplit + split;
        *reinterpret_cast<float4*>(p.ws_o + ws_slot * D + d) = acc;
        if (d == 0) p.ws_lse[ws_slot] = M + log2f(L);
      }
    }
    if (!direct && draw_last_ticket(p.tickets + group, nvalid, flag_s))
      merge_split_partials<T, D>(p.out, p.out_f32, p.o_s0, p.o_s1, p.ws_o, p.ws_lse, b, Hq, hq0, rows, nsplit, nvalid,
                                 tid);
    // Next item: fresh accumulators (the loop's next barrier orders the merge reads of this slot
    // before the load that refills it).
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  }
  cp_async_wait<0>();  // no copy outstanding when the CTA leaves (the last loads are zero fills)
  if (p.claims != nullptr && tid == 0) {
    // v5: every claim of this CTA is done (it drew one past the end); the last CTA to leave
    // resets both counters for the next launch on them.
    __threadfence();
    if (atomicAdd(p.claims + 1, 1u) == gridDim.x - 1) {
      atomicExch(p.claims, 0u);
      atomicExch(p.claims + 1, 0u);
    }
  }
}

}  // namespace attn
}  // namespace oppo

