// Chunk prefill attention over the paged prefix on sm_90a warpgroup MMA (wgmma): prefill v4.
// Same semantics as paged_prefill_attention.cuh (bottom-right causal, GQA rows packed as
// (query, head of the group), K/V of the chunk already in the pages).
//
// Warp-specialized (FlashAttention-3's structure; its ping-pong of the two consumer warpgroups
// and its intra-warpgroup overlap as flags): a work item = 128 rows of one (sequence, kv head);
// a CTA (384 threads) takes one item, or several in turn when the grid is persistent (the K/V
// ring below running on across items). With NC = 3 (plans wgmma3, head dim 64): three consumer
// warpgroups, 192-row items, 512 threads (Geo<NC>).
//   warpgroup 0  producer: gathers K and V tiles of kBN = 128 keys through the block table with
//                cp.async (16 B per thread and chunk, zero-fill past the context) into a ring of
//                kStages stages (one table load per thread and tile, a tile ahead, the row
//                offsets shared by warp shuffles; no division in its loop);
//                per stage one "full" mbarrier (128 producer arrivals, each after
//                its own copies landed and a proxy fence) and one "empty" mbarrier (256 consumer
//                arrivals once both warpgroups' MMAs on the stage completed). With kFlagSplitKV
//                (plans _kv) K and V of a stage are two commit groups on two rings: full/empty
//                guard the K tiles (released once S is waited on, an iteration before V), and
//                fullV/emptyV the V tiles (released after their P V); each group is published
//                one group behind, so two are always in flight (~2 tiles ahead on each ring).
//   warpgroups 1, 2  consumers, 64 rows each: S = Q K^T as wgmma m64nkBNk16 with Q and K from
//                shared memory; online softmax on the accumulator registers (exp2, fp32); P
//                rounded to T in registers is the A operand of O += P V (wgmma m64nDk16, A from
//                registers, V from shared memory MN-major). Q K^T of tile t+1 and P V of tile t
//                are issued together (two commit groups); the softmax of tile t+1 starts when
//                its S is done (with kFlagOverlap, while P V still runs: FA3's intra-warpgroup
//                overlap) and O is rescaled once P V is done.
// Shared-memory tiles ([rows x D], T = 2 bytes): D / 64 column blocks of [rows x 128 B], each
// in the canonical 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)).
// K-major operands (Q, K) and the MN-major operand (V) use the same physical layout, so the
// producer writes K and V tiles alike. Descriptors: 128B swizzle, SBO 1024 B (8 rows); LBO
// unused for K-major, the column-block stride for MN-major.
// Only tiles that cross a row's diagonal pay for the mask. No host sync, no allocation:
// capturable in CUDA graphs. Compiled into sm_90a code only (empty elsewhere; the launcher checks
// the device before choosing this plan).
#pragma once
#include "attention_common.cuh"
#include "wgmma_ops.cuh"

#include <type_traits>

namespace oppo {
namespace attn {
namespace wgp {

constexpr int kBM = 128;        // rows per work item: two consumer warpgroups x 64
constexpr int kThreads = 384;   // producer warpgroup + two consumer warpgroups
// NC consumer warpgroups (2: the plans above; 3: the "wgmma3" plans, head dim 64 only, FA3's
// 192-row tile at that head dim: one more warpgroup's softmax to hide under the others' MMAs).
template <int NC>
struct Geo {
  static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
  static constexpr int kBM = 64 * NC;              // rows per work item
  static constexpr int kThreads = 128 * (NC + 1);  // the producer warpgroup and the consumers
  static constexpr int kPingPongBar = 1 + NC;      // named barriers: 1 .. NC stage Q, then NC for ping-pong
};
// flags beyond kPrefillOutF32 (bit 0, attention_common.cuh):
constexpr int kFlagPingPong = 2;  // the consumer warpgroups take turns issuing their MMAs
constexpr int kFlagOverlap = 4;   // a warpgroup's softmax of tile t overlaps its own P V of tile t-1
constexpr int kFlagSplitKV = 8;   // K and V of a stage released and published separately (two rings)
constexpr int kFlagQPrefetch = 16;  // the producer prefetches an item's Q rows into L2 when it opens the item
// With kFlagPingPong on persistent CTAs: the ring of turns runs on across items. The last warpgroup
// hands the turn to the first right after issuing an item's final P V (as after any other batch),
// so the first warpgroup's Q K^T of the next item follows it on the tensor cores while the last one
// still waits for its P V, normalizes, stores and stages its Q. Without the flag the first
// warpgroup waits for all of that (the last warpgroup kicks it at the next item's start): the
// tensor cores idle for one warpgroup's epilogue and Q staging per item.
constexpr int kFlagChain = 32;
// kFlagMerge (plans _mi, "merged items"): a persistent CTA's items as one stream of batches. An
// item's final P V is issued in one batch with the next item's first Q K^T (as any P V with the
// following tile's Q K^T within an item), instead of alone and followed by a Q K^T alone: one
// ring turn fewer per item, and the first tile's softmax no longer runs with nothing under it.
// Each warpgroup stages the next item's Q rows (cp.async into its own rows of the one Q buffer)
// at the end of the item's last tile (its last Q K^T waited on), landed before the merged batch;
// O and that tile's P are normalized first, so the merged batch's P V leaves O finished and the
// item's rows are stored after the next item's first softmax. The turns run on across items as
// with kFlagChain (implied). Measured equal to kFlagChain (session 19, bench/NOTES.md).
constexpr int kFlagMerge = 64;
// kFlagKeySplit (plans wgmma3..._ks, its own instantiation): an item whose valid rows all fall in
// warpgroup 0's 64 (the remainder of a (sequence, kv head) whose rows are not a multiple of 192,
// e.g. G = 7 and a 256-token chunk: 1792 rows = 9 items of 192 + 64) costs a full item: each
// warpgroup's tile chain is latency-bound, so the two idle warpgroups do not make warpgroup 0's
// any faster. With this flag such an item's key tiles are split across the warpgroups instead
// (warpgroup k takes tiles k, k + NC, ...; each reads warpgroup 0's Q rows and keeps its own O, m
// and l for them), and warpgroup 0 merges the three partial results through shared memory: the
// item takes about 1/NC of its time. The turns stay in their ring (a warpgroup without a tile for
// a turn takes it empty), and a warpgroup arrives on the stages of the tiles it does not read.
// Its items come in another order: every (sequence, kv head)'s last row tile (x = 0, the one that
// holds the remainder) first, in group order, then the other row tiles x fastest. With persistent
// CTAs (CTA c takes items c, c + gridDim.x, ...) the x-fastest order handed the short items to
// some CTAs only (issue 8's D=64 shape: item w is short iff w % 10 == 0, and 132 % 10 == 2, so only
// even CTAs got them): the batch's span is the CTAs with the most full items, and it did not
// shrink (session 20: SM idle at the end 0.043 -> 0.079, `_ks` 1.5% slower than without). First,
// they go to CTAs 0..127 as their first item, and each CTA that takes one item more than others
// takes a short one (9 full + 1 short instead of 10 full at that shape).
constexpr int kFlagKeySplit = 128;
// prefill_item_stamps' tag: an item's key tiles, | this bit for an item whose key tiles were split
constexpr int64_t kStampKeySplit = int64_t(1) << 20;

template <int D, int NC = 2>
struct Cfg {
  // keys per K/V tile: 128 (FA3's tile for these head dims): twice the MMA per softmax fixed cost
  // (barrier waits, max shuffles, the O rescale) of a 64-key tile. S is 64 registers; D=128's
  // consumers need ~200 in all, hence setmaxnreg (producer 56, consumers 224) for D=128.
  static constexpr int kBN = 128;
  static constexpr int kChunks = D / 8;             // 16-byte chunks per row of one head
  // a stage (K and V of a tile) is held from its Q K^T to its P V one iteration later, so the
  // consumers hold two and the rest are the prefetch depth: 3 stages for D=128 (225 KB of the
  // 227 KB a CTA may have), 4 for D=64 (145 KB)
  static constexpr int kStages = D == 128 ? 3 : 4;
  // NC = 3 (512 threads, 128 registers each at launch): FA3's split for three MMA warpgroups,
  // producer 32 and consumers 160 (128 x 32 + 384 x 160 = 65536).
  static constexpr bool kSetMaxNReg = D == 128 || NC == 3;
  static constexpr int kProducerRegs = NC == 3 ? 32 : 56;
  static constexpr int kConsumerRegs = NC == 3 ? 160 : 224;   // NC = 2: 128 x 56 + 256 x 224 <= 65536
  static_assert(128 * kProducerRegs + 128 * NC * kConsumerRegs <= 65536, "register split");
  static constexpr int kQBytes = Geo<NC>::kBM * D * 2;
  static constexpr int kTileBytes = kBN * D * 2;    // one K or V tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // barriers: full/empty per stage, and with kFlagSplitKV fullV/emptyV (full/empty are then K's)
  // kFlagKeySplit (NC = 3): warpgroups 1 and 2 hand their partial O (D / 2 floats per thread) and
  // m, l (2 + 2) to warpgroup 0 through shared memory after the barriers
  // (barriers: full, empty, fullV, emptyV per stage)
  static constexpr int kKsOffset = kQBytes + kStages * kStageBytes + 4 * kStages * 8;
  static constexpr int kKsFloats = D / 2 + 4;
  static constexpr int kKsBytes = NC == 3 ? (NC - 1) * 128 * kKsFloats * 4 : 0;
  static constexpr int kSmem = 1024 /*alignment slack*/ + kKsOffset + kKsBytes;
  static_assert(kSmem <= 232448, "a CTA may have 227 KB of shared memory");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows x D] tile (layout above).
__device__ __forceinline__ uint32_t swz(int rows, int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle (layout type 1), base offset 0.
__device__ __forceinline__ uint64_t desc128(uint32_t saddr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((saddr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// desc128(saddr + off, ...) from desc128(saddr, ...), off a multiple of 16: one add to the start
// address field (bits 0-13, the address / 16). No carry leaves the field: shared addresses stay
// below 2^18 (228 KB of shared memory per SM), so (saddr + off) / 16 < 2^14.
// The add on the low word alone (its high word kept): one 32-bit add instead of a 64-bit one.
__device__ __forceinline__ uint64_t desc_step(uint64_t desc, uint32_t off) {
  return (desc & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(desc) + (off >> 4));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
  } while (!done);
}
// Generic-proxy writes (st.shared, cp.async) -> visible to the async proxy (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// cp.async of 16 bytes to a shared-space address (src_bytes 0: zero fill, src not read).
__device__ __forceinline__ void cp_async_16_s(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// ld.global.nc as volatile asm: the compiler keeps it before the barrier waits and the copies that
// follow it in the source (a plain __ldg of the producer's next-tile page id was sunk next to its
// use, after the tile's copies). ptxas still schedules it: the SASS test checks that it comes
// before the tile's commit and is read only after it.
__device__ __forceinline__ int ldg_early(const int* p) {
  int v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
// The compiler sees a new pointer: K's and V's per-thread bases stay two registers each, so each
// copy's address is one 64-bit add (it otherwise reassociates to base + (ch * 8 + o) << 1 twice).
__device__ __forceinline__ const char* opaque_ptr(const void* p) {
  const char* r;
  asm("mov.b64 %0, %1;\n" : "=l"(r) : "l"(p));
  return r;
}
// Register reallocation between warpgroups (each warpgroup executes it as a whole).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void wg_wait_all() { wg_wait<0>(); }
// Pins accumulator registers in place around the asynchronous MMAs (no reordering across).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per-item timestamps (see CtaStamps; row = item, tag = its key tiles), written by consumer
// warpgroup 0's thread 0 at the item's start and after its epilogue; set by the launcher's host
// side (oppo::prefill_item_stamps), off by default.
static __constant__ CtaStamps prefill_stamps;
// Per-turn stamps (bench/prefill_turns.py), only in the kernel instantiated with kTurnStamps (the
// launcher takes it while oppo::prefill_turn_stamps is on; wgmma3 plans without _mi and _ks): each
// consumer warpgroup's thread 0 of CTAs 0 and 1 writes one row per event of its tile chain, into
// its own slice of capacity / (2 NC) rows (CTA c, warpgroup k: slice c NC + k): SM cycles
// (%clock64), the event | tile << 8, the item index. The events:
constexpr int kTsItem = 0;     // an item's start, before its Q rows are staged (tile: its key tiles)
constexpr int kTsQ = 1;        // its Q rows staged (the named barrier of the warpgroup passed)
constexpr int kTsReq = 2;      // a batch: before the wait for this warpgroup's turn
constexpr int kTsGrant = 3;    // ... the turn taken
constexpr int kTsIssued = 4;   // ... its MMAs issued and the turn handed on
constexpr int kTsS = 5;        // ... S waited on (tile's Q K^T done)
constexpr int kTsSoft = 6;     // ... the softmax's scores done
constexpr int kTsPV = 7;       // ... the batch's P V waited on (every MMA of the batch done)
constexpr int kTsFin = 8;      // ... the tile's end (O rescaled, P packed)
constexpr int kTsStored = 9;   // an item's rows stored
static __constant__ CtaStamps prefill_turn_stamps;

// out          [Nq, Hq, D]  (T, or float32 with kPrefillOutF32), strides o_s0, o_s1, inner contiguous
// flags        kPrefillOutF32 | kFlagPingPong | kFlagOverlap | kFlagSplitKV | kFlagQPrefetch | kFlagChain |
//              kFlagMerge | kFlagKeySplit
// q            [Nq, Hq, D]  packed by cu_seqlens_q [B+1], strides q_s0, q_s1, inner contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D] (page stride page_stride, equal for K and V)
// context_lens [B] int32 (prefix + chunk);  block_tables [B, max_blocks] int32, row stride bt_stride
// work items: (row tile of kBM rows, kv head, sequence), m_tiles = ceil(max_seqlen_q * G / kBM) row
// tiles each, num_items = m_tiles * Hkv * B (index order: item_at; kKeySplit's differs); grid 1D:
// CTA c takes items c, c + gridDim.x, ...
// (gridDim.x = num_items: one item each; fewer: persistent CTAs, the K/V ring and the producer's
// prefetch running on across items). Block Geo<NC>::kThreads (384 for NC = 2: rows per item 128;
// 512 for NC = 3: 192 rows), dynamic smem Cfg<D, NC>::kSmem.
// kMerge: the kernel of the _mi plans (kFlagMerge): its own instantiation, because its item
// hand-over costs the three-warpgroup consumers a few registers they do not have (spills), which
// the plans without it must not pay.
template <typename T, int D, int NC = 2, bool kMerge = false, bool kKeySplit = false, bool kTurnStamps = false>
__global__ void __launch_bounds__(Geo<NC>::kThreads, 1)
paged_prefill_wgmma_kernel(void* __restrict__ out, int flags, int64_t o_s0, int64_t o_s1,
                           const T* __restrict__ q, int64_t q_s0, int64_t q_s1,
                           const T* __restrict__ k_cache, const T* __restrict__ v_cache, int64_t page_stride,
                           Divisor block_size, Divisor Hkv, const int* __restrict__ cu_seqlens_q,
                           const int* __restrict__ context_lens, const int* __restrict__ block_tables,
                           int64_t bt_stride, Divisor G, float scale_log2, Divisor m_tiles, int num_items) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<D, NC>;
  constexpr int kBM = Geo<NC>::kBM;
  constexpr int kPP = Geo<NC>::kPingPongBar;
  using Ops = wgmma::Ops<T>;
  constexpr int kS = C::kStages;
  constexpr int kBN = C::kBN;
  constexpr int kNB = kBN / 8;    // n8 blocks of S per row
  constexpr int kKS = kBN / 16;   // k-steps of P V
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* q_s = smem;
  unsigned char* kv_s = smem + C::kQBytes;  // stage s: K tile at s * kStageBytes, V tile after it
  uint64_t* full = reinterpret_cast<uint64_t*>(kv_s + kS * C::kStageBytes);
  uint64_t* empty = full + kS;
  // kFlagSplitKV: full/empty guard the K tiles of the stages, fullV/emptyV their V tiles
  uint64_t* fullV = empty + kS;
  uint64_t* emptyV = fullV + kS;
  const bool splitkv = (flags & kFlagSplitKV) != 0;

  // an item: row tile mt (heaviest, i.e. most keys, first within its (sequence, kv head)), its
  // rows, its context and its key tiles (n_full of them need no mask)
  struct Item {
    int b, kvh, q0, rows, row0, L, prefix, n_tiles, n_full;
  };
  auto item_at = [&](int w, Item& I) -> bool {
    int x = w % m_tiles, rest = w / m_tiles;
    if constexpr (kKeySplit) {  // the groups' last row tiles first, then the others x fastest (kFlagKeySplit)
      const int groups = num_items / m_tiles;
      x = 0;
      rest = w;
      if (w >= groups) {          // (m_tiles > 1 here: with one row tile every w is < groups)
        const int v = w - groups;
        x = 1 + v % (m_tiles - 1);
        rest = v / (m_tiles - 1);
      }
    }
    I.kvh = rest % Hkv;
    I.b = rest / Hkv;
    I.q0 = cu_seqlens_q[I.b];
    const int n = cu_seqlens_q[I.b + 1] - I.q0;
    I.rows = n * G;
    I.row0 = (m_tiles - 1 - x) * kBM;
    I.L = context_lens[I.b];   // loaded with cu_seqlens_q's two (b < B for every item), not after the test
    if (I.row0 >= I.rows) return false;
    I.prefix = I.L - n;
    const int first = I.prefix + I.row0 / G;                        // position of the tile's first query
    const int last = I.prefix + (min(I.row0 + kBM, I.rows) - 1) / G;  // ... and of its last
    I.n_tiles = (last + kBN) / kBN;                                  // keys 0..last
    I.n_full = (first + 1) / kBN;                                    // tiles no row of the item masks
    return true;
  };
  // element offset of row grow of item J in a [Nq, Hq, D] tensor with strides s0, s1 (q or out):
  // rows are (query, head of the group), the query's heads adjacent
  auto row_at = [&](const Item& J, int grow, int64_t s0, int64_t s1) -> int64_t {
    return static_cast<int64_t>(J.q0 + grow / G) * s0 + static_cast<int64_t>(J.kvh * G + grow % G) * s1;
  };
  // the source of 16-byte chunk cc of item J's row r (local to the item) in q, and whether the row
  // is in the chunk (if not: q itself, for a zero-fill copy that reads nothing); the consumers' Q staging's
  auto q_chunk_src = [&](const Item& J, int r, int cc, bool& in) -> const T* {
    const int grow = J.row0 + r;
    in = grow < J.rows;
    return in ? q + row_at(J, grow, q_s0, q_s1) + cc * 8 : q;
  };
  {  // a CTA without work leaves before any barrier (rows past a short chunk, padded max_seqlen_q)
    Item I;
    bool any = false;
    for (int w = blockIdx.x; w < num_items && !any; w += gridDim.x) any = item_at(w, I);
    if (!any) return;
  }

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mbar_init(&full[s], 128);
      mbar_init(&empty[s], 128 * NC);
      mbar_init(&fullV[s], 128);
      mbar_init(&emptyV[s], 128 * NC);
    }
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ------------------------------------------------------------------ producer
    if constexpr (C::kSetMaxNReg) setmaxnreg_dec<C::kProducerRegs>();
    constexpr int kPer = kBN * C::kChunks / 128;   // chunks per thread per tile (16 for D=128)
    constexpr int kTokStep = 128 / C::kChunks;     // tokens per pass of the 128 threads
    static_assert(kPer * kTokStep == kBN && 32 % C::kChunks == 0 && kTokStep % 8 == 0,
                  "a warp copies whole rows, and a thread's rows share one swizzle phase");
    const int t = threadIdx.x;
    const int ch = t % C::kChunks, tok0 = t / C::kChunks;  // copies chunk ch of keys tok0 + kTokStep i
    // Row offsets: one block-table load per thread and tile, a tile ahead. Thread t looks up key
    // own = tok0 + kTokStep ch of every tile: the kChunks lanes with this tok0 (a shuffle segment
    // of the warp) look up keys tok0 + kTokStep i, i = their ch, which are the keys whose chunk ch
    // this thread copies; the copy of chunk i takes its row offset from segment lane i (shfl,
    // width kChunks). So each thread loads one table entry per tile, for tile g+1 while tile g
    // waits for its stage and issues its copies, and turns it into a row offset after tile g's
    // commit; no shared memory, no named barrier (FlashInfer's sm90 producer does the same).
    // The page of key it * kBN + own is a running quotient and remainder by block_size, stepped by
    // kBN per tile: no division in the loop, for any block_size (the two below: once per thread).
    const int own = tok0 + kTokStep * ch;
    const int own_q = own / block_size, own_r = own - own_q * block_size;
    const int step_q = kBN / block_size, step_r = kBN - step_q * block_size;
    // 32-bit in-page offsets: r * Hkv * D + kvh * D < block_size * Hkv * D <= INT_MAX (the launcher
    // checks); the page base (page * page_stride) and the pointers stay 64-bit
    const int row_stride = Hkv * D;
    const char* kb = opaque_ptr(k_cache + ch * 8);
    const char* vb = opaque_ptr(v_cache + ch * 8);
    // this thread's chunk of key tok0 in stage 0; key tok0 + kTokStep i is kTokStep i rows further
    // (kTokStep % 8 == 0: same swizzle phase), its V chunk kTileBytes further
    const uint32_t dst0 = smem_u32(kv_s) + swz(kBN, tok0, ch);

    // a tile: its item (w; none when w >= num_items), the item's block-table row, kv head, context
    // and tile count, the tile's index it, and the page (q, r) of its key own
    struct Tile {
      int w, kvh, L, n, it, q, r;
      const int* bt;
    };
    auto first_tile = [&](int w, Tile& x) {  // the first tile of the first item at or after w
      Item I;
      while (w < num_items && !item_at(w, I)) w += gridDim.x;
      x = Tile{w, 0, 0, 0, 0, own_q, own_r, block_tables};
      if (w < num_items) {
        x.kvh = I.kvh;
        x.L = I.L;
        x.n = I.n_tiles;
        x.bt = block_tables + static_cast<int64_t>(I.b) * bt_stride;
        // kFlagQPrefetch: the item's Q rows into L2, up to kS tiles before the consumers stage them
        // (opened at the previous item's last tile); row r of the item is thread r % 128's
        if (flags & kFlagQPrefetch) {
          for (int r = t; r < kBM; r += 128) {
            const int grow = I.row0 + r;
            if (grow < I.rows)
              prefetch_l2<D * 2>(q + row_at(I, grow, q_s0, q_s1));
          }
        }
      }
    };
    // this thread's key of tile x: in the context (then `page` is its block-table entry) or not
    auto key_in = [&](const Tile& x) { return x.w < num_items && x.it * kBN + own < x.L; };
    auto row_off = [&](const Tile& x, bool in, int page) -> int64_t {  // bytes; 0 past the context
      return in ? (static_cast<int64_t>(page) * page_stride + (x.r * row_stride + x.kvh * D)) * int64_t{sizeof(T)}
                : int64_t{0};
    };

    // 3 stages (D=128): publish the previous tile (of this item or the last one) as soon as it
    // has landed, before waiting for this tile's stage: that stage frees only when the
    // consumers end the iteration before the one that needs the previous tile, so publishing
    // after this tile's loads stalled them by this tile's issue every iteration. The price:
    // one tile's copies in flight at a time (wait_group 0 before the next tile's issue).
    // 4 stages (D=64): this tile's stage frees an iteration earlier, so the tile is issued
    // first and the previous one published after wait_group 1: two tiles' copies in flight.
    constexpr bool kIssueFirst = kS >= 4;
    int g = 0;        // tiles issued by this CTA: the ring position
    int64_t off;      // the current tile's row offset of key own (bytes)
    int lim;          // the current tile's keys tok0 + kTokStep i are in the context iff kTokStep i < lim
    // One tile (ring position g), given its successor nx: the publish of tile g-1 (3 stages), nx's
    // table load (in flight during this tile's stage wait and copies), the stage wait, the copies,
    // the publish of tile g-1 (4 stages), then nx's row offset from the loaded page id.
    auto run = [&](const Tile& nx) {
      const int s = g % kS;
      if (!kIssueFirst && g > 0) {
        cp_async_wait<0>();
        fence_proxy_async();
        mbar_arrive(&full[(g - 1) % kS]);
      }
      const bool nin = key_in(nx);
      const int page = nin ? ldg_early(nx.bt + nx.q) : 0;
      mbar_wait(&empty[s], ((g / kS) & 1) ^ 1);
      const uint32_t dst = dst0 + s * C::kStageBytes;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t o = __shfl_sync(0xffffffffu, static_cast<long long>(off), i, C::kChunks);
        const int bytes = kTokStep * i < lim ? 16 : 0;  // zero fill past the context (o is 0 there)
        cp_async_16_s(dst + i * kTokStep * 128, kb + o, bytes);
        cp_async_16_s(dst + C::kTileBytes + i * kTokStep * 128, vb + o, bytes);
      }
      cp_async_commit();
      if (kIssueFirst && g > 0) {  // every group but this tile's has landed: the previous tile
        cp_async_wait<1>();
        fence_proxy_async();
        mbar_arrive(&full[(g - 1) % kS]);
      }
      ++g;
      off = row_off(nx, nin, page);
      lim = nx.L - nx.it * kBN - tok0;
    };
    // kFlagSplitKV: K and V of a tile are two commit groups, each issued after its own ring's
    // empty wait, and published one group behind: after K(g)'s commit, wait_group 2 (all but V(g-1)
    // and K(g) landed) -> publish K(g-1); after V(g)'s commit, wait_group 2 -> publish V(g-1). So
    // two groups are always in flight and the producer never waits for its newest group to land
    // (waiting for it, wait_group 1, would land one group at a time: no more latency hidden than
    // the flag-off order). No deadlock: K(g-1) is needed at iteration g-1, when the consumers have
    // released K up to g-2 >= g-kS (kS >= 2), so K(g)'s slot wait passes; V(g-1) at iteration g,
    // when V up to g-2 is released, so V(g)'s does. K's slot frees when both warpgroups have
    // waited on the S that read it (an iteration before V's), so with the same stages the
    // producer runs ~2 tiles ahead on both rings.
    // nx's table load sits between the two publishes (in flight during V(g)'s slot wait and
    // copies) and is read before V(g-1)'s publish: each publish's proxy fence (MEMBAR.ALL.CTA) would
    // wait for a load still in flight, and ptxas sinks the load past any fence before its use.
    auto run_kv = [&](const Tile& nx) {
      const int s = g % kS;
      const uint32_t ph = ((g / kS) & 1) ^ 1;
      const uint32_t dst = dst0 + s * C::kStageBytes;
      auto copy_group = [&](uint32_t d, const char* base) {  // one tile of K or V, one commit group
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int64_t o = __shfl_sync(0xffffffffu, static_cast<long long>(off), i, C::kChunks);
          cp_async_16_s(d + i * kTokStep * 128, base + o, kTokStep * i < lim ? 16 : 0);
        }
        cp_async_commit();
      };
      mbar_wait(&empty[s], ph);  // emptyK
      copy_group(dst, kb);
      if (g > 0) {  // all but V(g-1) and K(g) landed: K(g-1)
        cp_async_wait<2>();
        fence_proxy_async();
        mbar_arrive(&full[(g - 1) % kS]);  // fullK
      }
      const bool nin = key_in(nx);
      const int page = nin ? ldg_early(nx.bt + nx.q) : 0;
      mbar_wait(&emptyV[s], ph);
      copy_group(dst + C::kTileBytes, vb);
      off = row_off(nx, nin, page);
      lim = nx.L - nx.it * kBN - tok0;
      if (g > 0) {  // all but K(g) and V(g) landed: V(g-1)
        cp_async_wait<2>();
        fence_proxy_async();
        mbar_arrive(&fullV[(g - 1) % kS]);
      }
      ++g;
    };

    Tile cur;
    first_tile(blockIdx.x, cur);  // there is one: the CTA has an item
    {
      const bool in = key_in(cur);
      off = row_off(cur, in, in ? __ldg(cur.bt + cur.q) : 0);
      lim = cur.L - tok0;
    }
    // the tile loop, once per ring protocol (a uniform flag; each loop keeps its own schedule)
    auto tiles = [&](auto split) {
      while (true) {
        while (cur.it + 1 < cur.n) {  // the successor is in the same item: kBN keys on
          Tile nx = cur;
          ++nx.it;
          nx.q += step_q;
          nx.r += step_r;
          if (nx.r >= block_size) {
            nx.r -= block_size;
            ++nx.q;
          }
          if constexpr (decltype(split)::value) run_kv(nx);
          else run(nx);
          cur = nx;
        }
        Tile nx;  // the item's last tile: the successor opens the next item, if any
        first_tile(cur.w + gridDim.x, nx);
        if constexpr (decltype(split)::value) run_kv(nx);
        else run(nx);
        if (nx.w >= num_items) break;
        cur = nx;
      }
    };
    if (splitkv) tiles(std::true_type{});
    else tiles(std::false_type{});
    cp_async_wait<0>();
    fence_proxy_async();
    mbar_arrive(&full[(g - 1) % kS]);  // g >= 1: the CTA has an item (split rings: K of its last tile)
    if (splitkv) mbar_arrive(&fullV[(g - 1) % kS]);
    return;
  }

  // -------------------------------------------------------------------- consumers
  if constexpr (C::kSetMaxNReg) setmaxnreg_inc<C::kConsumerRegs>();
  const int cw = wg - 1;                    // rows 64 cw .. 64 cw + 63 of the CTA tile
  const int tw = threadIdx.x - 128 * wg;
  const int warp = tw >> 5, lane = tw & 31, g = lane >> 2, tq = lane & 3;

  // this warpgroup's Q rows and its threads' rows (kFlagKeySplit: warpgroup 0's, for a split item)
  uint32_t q_addr = smem_u32(q_s) + 64 * cw * 128;
  const uint32_t kv_addr = smem_u32(kv_s);
  int rA = 64 * cw + 16 * warp + g;   // this thread's two rows: rA and rA + 8 (local to the item)
  const float kNegInf = -INFINITY;
  Item I;                                    // the current item
  int pos[2];                                // query positions of this thread's rows
  float m[2], l[2];
  float o[D / 2];
  float sacc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) sacc[i] = 0.f;
  uint32_t pa[kKS][4];  // P of the last softmaxed tile (T pairs): the register A operand of its P V

  // kTurnStamps: this thread's slice of prefill_turn_stamps (thread 0 of each consumer warpgroup
  // of CTAs 0 and 1; null elsewhere), its rows written so far, and the item they belong to
  int64_t* ts_rows = nullptr;
  int ts_n = 0, ts_cap = 0, ts_w = -1;
  if constexpr (kTurnStamps) {
    static_assert(!kMerge && !kKeySplit, "turn stamps: the plans without _mi and _ks");
    const CtaStamps st = prefill_turn_stamps;
    if (st.rows != nullptr && blockIdx.x < 2 && tw == 0) {
      ts_cap = static_cast<int>(st.capacity / (2 * NC));
      ts_rows = st.rows + 3 * static_cast<int64_t>(blockIdx.x * NC + cw) * ts_cap;
    }
  }
  auto ts = [&](int event, int it) {
    if constexpr (kTurnStamps) {
      if (ts_rows != nullptr && ts_n < ts_cap) {
        ts_rows[3 * ts_n] = sm_clock();
        ts_rows[3 * ts_n + 1] = event | (it << 8);
        ts_rows[3 * ts_n + 2] = ts_w;
        ++ts_n;
      }
    }
  };

  // Tile t's Q K^T is issued together with tile t-1's P V (two commit groups; waited on together,
  // or with kFlagOverlap the S first and the softmax's first part before P V's wait).
  // Ping-pong (flag): the NC warpgroups take turns issuing their batch, in a ring (named barriers
  // kPP + cw, 256 threads: the one whose turn it is syncs, the one before it arrives after issuing
  // its own), so one's softmax runs under the others' MMAs. Warpgroup 0 goes first (the last one
  // arrives on its barrier at the item's start); the last skips its arrive after the item's final
  // P V, so every barrier phase started is completed (per item each warpgroup syncs n_tiles + 1
  // times and is arrived on as often). With kFlagChain the last warpgroup kicks warpgroup 0 only
  // at the CTA's first item and skips only its last item's final arrive: the arrive after an
  // item's final P V is the next item's kick. No branch sits between a wgmma.fence
  // and its MMAs (ptxas would serialize them): first tile, steady state and last P V are peeled.
  const bool pingpong = (flags & kFlagPingPong) != 0;
  const bool overlap = (flags & kFlagOverlap) != 0;
  // Each operand's descriptor is built once per batch and stepped by the k-step's constant offset
  // (desc_step: one add) instead of built whole at every k-step (shift, mask, or: ~4 uniform
  // instructions each): 4% off issue 8's D=64 shape in both orders, D=128 the same (session 22,
  // bench/NOTES.md "`_dh`").
  auto issue_qk = [&](int s) {  // S = Q K^T (64 x kBN per warpgroup, D / 16 k-steps)
    const uint32_t k_addr = kv_addr + s * C::kStageBytes;
    const uint64_t da0 = desc128(q_addr, 16, 1024), db0 = desc128(k_addr, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk & 3) * 32;  // 16 elements along the row, inside the swizzle atom
      const uint32_t offa = (kk >> 2) * (kBM * 128) + koff, offb = (kk >> 2) * (kBN * 128) + koff;
      const uint64_t da = desc_step(da0, offa), db = desc_step(db0, offb);
      if constexpr (kBN == 128) Ops::ss_n128(sacc, da, db, kk > 0 ? 1 : 0);
      else Ops::ss_n64(sacc, da, db, kk > 0 ? 1 : 0);
    }
  };
  auto issue_pv = [&](int s) {  // O += P V (kBN / 16 k-steps of 16 keys; V MN-major: LBO = column-block stride)
    const uint32_t v_addr = kv_addr + s * C::kStageBytes + C::kTileBytes;
    const uint64_t dv0 = desc128(v_addr, kBN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      const uint64_t dv = desc_step(dv0, kk * 16 * 128);
      if constexpr (D == 128) Ops::rs_n128(o, pa[kk], dv, 1);
      else Ops::rs_n64(o, pa[kk], dv, 1);
    }
  };
  // this warpgroup's turn: wait for it, and hand it to the next one (the last warpgroup's very
  // last turn hands on nothing, so every barrier phase started is completed)
  auto take_turn = [&]() {
    if (pingpong) named_sync(kPP + cw, 256);
  };
  auto hand_on = [&](bool last) {
    if (pingpong && !(last && cw == NC - 1)) named_arrive(kPP + (cw + 1) % NC, 256);
  };
  auto begin_batch = [&](int it) {
    ts(kTsReq, it);
    take_turn();
    ts(kTsGrant, it);
    fence_regs(o);
    fence_regs(sacc);
    wg_fence();
  };
  auto end_batch = [&](bool last, int it, int waited) {  // waited: kTsS (a Q K^T alone) or kTsPV
    wg_commit();
    hand_on(last);
    ts(kTsIssued, it);
    wg_wait_all();
    fence_regs(o);
    fence_regs(sacc);
    ts(waited, it);
  };
  // Softmax of tile it in two parts: scores() needs only S (the running max and sum, P in sacc),
  // finish() the finished P V of tile it-1 (O rescaled by alpha, P packed into the A operand).
  auto scores = [&](int it, float (&alpha)[2], int n_full) {
    if (it >= n_full) {  // the diagonal (tiles from the item's n_full on): keys past a row's position are masked
#pragma unroll
      for (int i = 0; i < kNB; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int key = it * kBN + 8 * i + 2 * tq + (j & 1);
          if (key > pos[j >> 1]) sacc[4 * i + j] = kNegInf;
        }
    }
    // each row's kBN scores live in the 4 threads of a quad
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int i = 0; i < kNB; ++i) {
      mx[0] = fmaxf(mx[0], fmaxf(sacc[4 * i], sacc[4 * i + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(sacc[4 * i + 2], sacc[4 * i + 3]));
    }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r] * scale_log2);
      m_use[r] = m_new == kNegInf ? 0.f : m_new;
      alpha[r] = ex2(m[r] - m_use[r]);  // 0 while m is -inf
      m[r] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kNB; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = ex2(fmaf(sacc[4 * i + j], scale_log2, -m_use[j >> 1]));
        sacc[4 * i + j] = p;
        rs[j >> 1] += p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + rs[r];
  };
  auto finish = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {  // O holds tiles < it (their P V was waited on)
      o[4 * i + 0] *= alpha[0];
      o[4 * i + 1] *= alpha[0];
      o[4 * i + 2] *= alpha[1];
      o[4 * i + 3] *= alpha[1];
    }
    // P (T) as the register A operand: k-step kk covers keys 16 kk .. 16 kk + 15 = n8 blocks 2kk, 2kk+1
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      pa[kk][0] = Mma<T>::pack(sacc[8 * kk + 0], sacc[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(sacc[8 * kk + 2], sacc[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(sacc[8 * kk + 4], sacc[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(sacc[8 * kk + 6], sacc[8 * kk + 7]);
    }
  };

  // Q rows of this warpgroup (64 of item J's) -> its rows of the Q buffer (swizzled), zeros for
  // rows past the chunk; by loads and stores, or (kFlagMerge, at the end of an item's last tile) by
  // cp.async, landed by q_landed. The rows are free: this warpgroup's Q K^T of the previous item were waited on
  // (the fence orders those async-proxy reads before these writes).
  constexpr int kQPer = 64 * C::kChunks / 128;
  auto q_src = [&](const Item& J, int i, bool& in) -> const T* {
    const int c = i * 128 + tw;
    return q_chunk_src(J, 64 * cw + c / C::kChunks, c % C::kChunks, in);
  };
  auto q_dst = [&](int i) {
    const int c = i * 128 + tw;
    return q_s + swz(kBM, 64 * cw + c / C::kChunks, c % C::kChunks);
  };
  auto stage_q = [&](const Item& J) {
    fence_proxy_async();
#pragma unroll
    for (int i = 0; i < kQPer; ++i) {
      bool in;
      const T* src = q_src(J, i, in);
      *reinterpret_cast<uint4*>(q_dst(i)) = in ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
    }
    fence_proxy_async();
    named_sync(1 + cw, 128);
  };
  auto stage_q_async = [&](const Item& J) {
    fence_proxy_async();
#pragma unroll
    for (int i = 0; i < kQPer; ++i) {
      bool in;
      const T* src = q_src(J, i, in);
      cp_async_16(q_dst(i), src, in ? 16 : 0);
    }
    cp_async_commit();
  };
  auto q_landed = [&]() {
    cp_async_wait<0>();
    fence_proxy_async();
    named_sync(1 + cw, 128);
  };
  auto stage_next_q = [&](int wn) {  // item wn's rows (its fields read again: see the item loop)
    Item J;
    item_at(wn, J);
    stage_q_async(J);
  };
  auto start_rows = [&]() {  // this thread's rows of item I: positions, empty softmax state (not O)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int grow = I.row0 + rA + 8 * r;
      pos[r] = grow < I.rows ? I.prefix + grow / G : I.L - 1;  // rows past the chunk: any valid position
      m[r] = kNegInf;
      l[r] = 0.f;
    }
  };
  auto zero_o = [&]() {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  };
  // 1 / the full row sums of this thread's rows (l holds its quad's partial sums)
  auto inv_rows = [&](float (&inv)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float x = l[r] + __shfl_xor_sync(0xffffffffu, l[r], 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      inv[r] = 1.f / x;
    }
  };
  // the epilogue of item P: O times inv (1 / the row sums, or 1 where O is normalized already),
  // the valid rows stored
  auto store_rows = [&](const Item& P, const float (&inv_r)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int grow = P.row0 + rA + 8 * r;
      if (grow >= P.rows) continue;
      const float inv = inv_r[r];
      const int64_t base = row_at(P, grow, o_s0, o_s1);
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const int col = 8 * i + 2 * tq;
        const float x = o[4 * i + 2 * r] * inv, y = o[4 * i + 2 * r + 1] * inv;
        if (flags & kPrefillOutF32) {
          *reinterpret_cast<float2*>(static_cast<float*>(out) + base + col) = make_float2(x, y);
        } else {
          *reinterpret_cast<uint32_t*>(static_cast<T*>(out) + base + col) = Mma<T>::pack(x, y);
        }
      }
    }
  };

  // One batch: Q K^T of stage s (S of tile `it`) and P V of stage sp, issued together (two commit
  // groups); then tile it's softmax (row maxima and sums, P in sacc) and the release of sp. The
  // caller waited for both stages.
  auto qk_pv_step = [&](int s, int sp, int it, int n_full, float (&alpha)[2]) {
    begin_batch(it);
    issue_qk(s);  // group 1: S
    wg_commit();
    issue_pv(sp);  // group 2: P V
    wg_commit();
    hand_on(false);
    ts(kTsIssued, it);
    if (overlap) {  // the softmax's first part runs while this warpgroup's P V is on the tensor cores
      wg_wait<1>();
      fence_regs(sacc);
      ts(kTsS, it);
      if (splitkv) mbar_arrive(&empty[s]);  // emptyK: this thread's reads of K(s) are done
      scores(it, alpha, n_full);
      ts(kTsSoft, it);
      // A bare wait_group 0 here is hoisted by ptxas to right after the wait_group 1 (SASS: the
      // two DEPBARs adjacent, every ex2 after them), which undoes the overlap. A warp-uniform,
      // always-true condition on the row sums (NaN included) makes the wait depend on the
      // softmax. The other branch must not fall through: a path that reaches O's reads without
      // the wait makes ptxas serialize every wgmma of the kernel (C7514; seen with a bare `if`).
      // SASS with this form (CUDA 13.0): DEPBAR 1, the tile's 66 ex2 (D=128), DEPBAR 0.
      if (__ballot_sync(0xffffffffu, !(l[0] + l[1] < -1.f))) wg_wait<0>();
      else __trap();
      fence_regs(o);
      ts(kTsPV, it);
    } else {
      wg_wait<0>();
      fence_regs(sacc);
      fence_regs(o);
      ts(kTsPV, it);
      if (splitkv) mbar_arrive(&empty[s]);  // emptyK: this thread's reads of K(s) are done
      scores(it, alpha, n_full);
      ts(kTsSoft, it);
    }
    // this thread's reads of stage sp (kFlagSplitKV: of its V tile) are done
    mbar_arrive(splitkv ? &emptyV[sp] : &empty[sp]);
  };

  constexpr bool merge = kMerge;  // (the launcher picks this instantiation for kFlagMerge)
  // The end of tile `it` of item I (after its softmax): O rescaled, P packed (finish). With
  // kFlagMerge, at the item's last tile when another item follows: the row sums are final, so O
  // and this tile's P are normalized first (its final P V, issued with the next item's first
  // Q K^T, then leaves O finished: no row sum to keep across that batch), and after finish, with
  // its last Q K^T waited on and the registers the MMAs hold free, this warpgroup's Q rows take
  // the next item's (cp.async, landed before the next batch).
  auto end_of_tile = [&](int it, bool more, int wn, float (&alpha)[2]) {
    const bool last = merge && more && it == I.n_tiles - 1;
    if (last) {
      float inv[2];
      inv_rows(inv);
#pragma unroll
      for (int i = 0; i < kNB; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sacc[4 * i + j] *= inv[j >> 1];
      alpha[0] *= inv[0];
      alpha[1] *= inv[1];
    }
    finish(alpha);
    if (last) stage_next_q(wn);
  };
  int gbase = 0;                             // ring position of the item's first tile
  const bool chain = pingpong && (merge || (flags & kFlagChain) != 0);
  bool first_item = true;
  // an item's start: the last warpgroup gives warpgroup 0 its first turn (with chained turns only
  // at the CTA's first item: after that, its hand-on after an item's last batch is the kick)
  auto kick = [&]() {
    if (pingpong && cw == NC - 1 && (!chain || first_item)) named_arrive(kPP, 256);
    first_item = false;
  };
  // the CTA's item after item w (the items the loop takes: those item_at accepts); wn = its index
  auto next_item = [&](int w, int& wn) {
    Item J;
    for (int w2 = w + gridDim.x; w2 < num_items; w2 += gridDim.x) {
      if (item_at(w2, J)) {
        wn = w2;
        return true;
      }
    }
    return false;
  };
  // kFlagKeySplit: a turn without MMAs (the ring's order kept), and an item of warpgroup 0's rows
  // only, its key tiles split across the warpgroups (see kFlagKeySplit)
  auto empty_turn = [&](bool last) {
    take_turn();
    hand_on(last);
  };
  auto key_split_item = [&](int w, bool more) {
    static_assert(!kKeySplit || (NC == 3 && kS > NC), "key split: three warpgroups, more stages than warpgroups");
    constexpr int kKsBar = kPP + NC;   // named barrier of the consumer warpgroups (128 NC threads)
    if (cw == 0 && tw == 0) stamp_start(prefill_stamps, w);
    q_addr = smem_u32(q_s);            // warpgroup 0's Q rows and row positions, for every warpgroup
    rA = 16 * warp + g;
    if (cw == 0) stage_q(I);
    named_sync(kKsBar, 128 * NC);      // (its writes fenced for the async proxy by stage_q)
    start_rows();
    zero_o();
    kick();
    const int n = I.n_tiles;
    const int nk = n > cw ? (n - cw + NC - 1) / NC : 0;  // this warpgroup's tiles: cw, cw + NC, ...
    const int turns = (n + NC - 1) / NC;                  // every warpgroup's (the ring's order)
    // A ring position this warpgroup does not read still needs its arrival on the stage's empty
    // barrier, once per phase: after that position's full barrier (its phase is the current one).
    // Positions are passed in order, each before this warpgroup's next own tile. Each own tile's
    // P V is issued and waited on in its own turn, right after the softmax (not with the next own
    // tile's Q K^T): the 4-stage producer publishes a tile only once it has issued the next one, so
    // the wait for own tile t needs position t - 3, this warpgroup's previous tile, released first
    // (the protocol simulation deadlocks otherwise).
    int passed = 0;
    auto pass_to = [&](int p_end) {
      for (; passed < p_end; ++passed) {
        if (passed % NC == cw) continue;
        const int gp = gbase + passed;
        mbar_wait(&full[gp % kS], (gp / kS) & 1);
        mbar_arrive(&empty[gp % kS]);
      }
    };
    for (int j = 0; j < turns; ++j) {
      const bool last = j == turns - 1 && !more;  // the CTA's last turn: the last warpgroup hands on nothing
      if (j < nk) {
        const int t = cw + NC * j;
        pass_to(t);
        passed = t + 1;
        const int gt = gbase + t;
        mbar_wait(&full[gt % kS], (gt / kS) & 1);
        begin_batch(t);
        issue_qk(gt % kS);
        end_batch(last, t, kTsS);
        float alpha[2];
        scores(t, alpha, I.n_full);
        finish(alpha);
        fence_regs(o);  // P V of this tile, alone (outside the ring: the turn was handed on)
        wg_fence();
        issue_pv(gt % kS);
        wg_commit();
        wg_wait_all();
        fence_regs(o);
        mbar_arrive(&empty[gt % kS]);
      } else {
        empty_turn(last);
      }
    }
    pass_to(n);
    gbase += n;
    // warpgroups 1 and 2 hand over O, m and l (thread tw of each holds the same rows and columns);
    // warpgroup 0 rescales the three to their common maximum, adds them and stores the rows
    float* ks_s = reinterpret_cast<float*>(smem + C::kKsOffset);
    if (cw > 0) {
      float* mine = ks_s + (cw - 1) * C::kKsFloats * 128 + tw;
#pragma unroll
      for (int i = 0; i < D / 2; ++i) mine[i * 128] = o[i];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mine[(D / 2 + r) * 128] = m[r];
        mine[(D / 2 + 2 + r) * 128] = l[r];
      }
    }
    named_sync(kKsBar, 128 * NC);
    if (cw == 0) {
#pragma unroll
      for (int k = 1; k < NC; ++k) {
        const float* theirs = ks_s + (k - 1) * C::kKsFloats * 128 + tw;
        float mine_scale[2], their_scale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float mk = theirs[(D / 2 + r) * 128];
          const float mx = fmaxf(m[r], mk);    // finite: warpgroup 0 read key 0 (never masked)
          mine_scale[r] = ex2(m[r] - mx);
          their_scale[r] = ex2(mk - mx);       // 0 for a warpgroup without a tile (m = -inf)
          l[r] = l[r] * mine_scale[r] + theirs[(D / 2 + 2 + r) * 128] * their_scale[r];
          m[r] = mx;
        }
#pragma unroll
        for (int i = 0; i < D / 2; ++i) {
          const int r = (i >> 1) & 1;          // o[4 c + 0, 1]: row rA; o[4 c + 2, 3]: row rA + 8
          o[i] = o[i] * mine_scale[r] + theirs[i * 128] * their_scale[r];
        }
      }
      float inv[2];
      inv_rows(inv);
      store_rows(I, inv);
    }
    named_sync(kKsBar, 128 * NC);      // the hand-over area is free again
    if (cw == 0 && tw == 0) stamp_end(prefill_stamps, w, n | kStampKeySplit);
    q_addr = smem_u32(q_s) + 64 * cw * 128;
    rA = 64 * cw + 16 * warp + g;
  };
  for (int w = blockIdx.x; w < num_items; w += gridDim.x) {
    if (!item_at(w, I)) continue;
    // kFlagChain: the last warpgroup hands the turn on after an item's final P V when the CTA has
    // another item; kFlagMerge: every warpgroup issues that P V with the next item's first Q K^T.
    // (Only the next item's index stays live through the tiles: its fields are read again where
    // needed, which keeps the consumers under their register budget.)
    int wn = w;
    bool more = ((chain && cw == NC - 1) || merge) && next_item(w, wn);
    if constexpr (kKeySplit) {
      if (I.rows - I.row0 <= 64) {  // only warpgroup 0's rows valid: the key tiles split instead
        key_split_item(w, more);
        continue;
      }
    }
    if (cw == 0 && tw == 0) stamp_start(prefill_stamps, w);  // off unless bench/prefill_stamps.py sets it
    if constexpr (kTurnStamps) ts_w = w;
    ts(kTsItem, I.n_tiles);
    stage_q_async(I);
    q_landed();
    ts(kTsQ, 0);
    start_rows();
    zero_o();
    kick();
    mbar_wait(&full[gbase % kS], (gbase / kS) & 1);  // tile 0: Q K^T alone
    begin_batch(0);
    issue_qk(gbase % kS);
    end_batch(false, 0, kTsS);
    if (splitkv) mbar_arrive(&empty[gbase % kS]);  // emptyK: S of tile 0 was waited on
    {
      float alpha[2];
      scores(0, alpha, I.n_full);
      ts(kTsSoft, 0);
      end_of_tile(0, more, wn, alpha);
      ts(kTsFin, 0);
    }
    // One batch per iteration: Q K^T of ring position gi (tile `it` of item I, or with kFlagMerge
    // at an item's end tile 0 of the next item, "cross") and P V of the tile before it. A merged
    // CTA's items all run through this loop, so its MMAs are issued from one place.
    int it = 1;
    while (true) {
      const bool cross = it == I.n_tiles;  // the next Q K^T is the next item's first
      if (cross && !(merge && more)) break;
      const int gi = gbase + it;
      const int s = gi % kS, sp = (gi - 1) % kS;
      int n_full = I.n_full;
      if (cross) {  // kFlagMerge: the next item's row positions, an empty softmax state, its Q landed
        Item J;     // (item I's O needs no row sum any more: see the end of its last tile below)
        item_at(wn, J);
        n_full = J.n_full;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int grow = J.row0 + rA + 8 * r;
          pos[r] = grow < J.rows ? J.prefix + grow / G : J.L - 1;
          m[r] = kNegInf;
          l[r] = 0.f;
        }
        q_landed();
      }
      mbar_wait(&full[s], (gi / kS) & 1);
      // kFlagSplitKV: V of tile it-1 has its own barrier (waited here, not between the wgmma fence
      // and the MMAs: ptxas would serialize every wgmma)
      if (splitkv) mbar_wait(&fullV[sp], ((gi - 1) / kS) & 1);
      float alpha[2];
      qk_pv_step(s, sp, cross ? 0 : it, n_full, alpha);
      if (cross) {  // item I is done: its rows out; the next item becomes I, O starts at zero
        const float one[2] = {1.f, 1.f};
        store_rows(I, one);
        if (cw == 0 && tw == 0) {
          stamp_end(prefill_stamps, w, I.n_tiles);
          stamp_start(prefill_stamps, wn);
        }
        gbase += I.n_tiles;
        w = wn;
        item_at(w, I);
        more = next_item(w, wn);
        zero_o();
        it = 0;
      }
      end_of_tile(it, more, wn, alpha);
      ts(kTsFin, it);
      ++it;
    }
    {
      const int gl = gbase + I.n_tiles - 1;
      if (splitkv) mbar_wait(&fullV[gl % kS], (gl / kS) & 1);
      begin_batch(I.n_tiles);  // the last tile's P V (its turn stamped as tile n_tiles)
      issue_pv(gl % kS);
      end_batch(!more, I.n_tiles, kTsPV);  // the last warpgroup hands on only when chained to another item
      mbar_arrive(splitkv ? &emptyV[gl % kS] : &empty[gl % kS]);
    }
    gbase += I.n_tiles;
    {
      float inv[2];
      inv_rows(inv);
      store_rows(I, inv);
    }
    ts(kTsStored, I.n_tiles);
    if (cw == 0 && tw == 0) stamp_end(prefill_stamps, w, I.n_tiles);  // warpgroup 0's end of the item
  }
#endif
}

}  // namespace wgp
}  // namespace attn
}  // namespace oppo
