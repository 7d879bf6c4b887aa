// Launcher of paged decode attention: argument checks, the split-KV plan, dtype/head-dim
// dispatch, launches on the current stream.
//
// Workspace (num_splits > 1): float32 partials o [B, Hq, S, D] then lse [B, Hq, S] (v4/v5: + one
// ticket counter per group, and v5's claim and exit counters even without split, when they are
// not from the pool below). From the caller when it passes
// `workspace` (at least paged_decode_workspace_size(q, k_cache, block_tables) floats, checked:
// a short one is an error, never an overrun), else from PyTorch's caching allocator (at::empty).
// Both are graph-safe: under CUDA-graph capture an allocation comes from the graph's private
// pool at a fixed address, and nothing here syncs with the host. The split plan depends only on shapes
// (B, Hkv, G, block_tables' width x block_size, the SM count and the kernel's occupancy), never
// on context_lens' values.
//
// OPPO_DECODE_PLAN (read at every call; the bench switches it between captures):
//   v7 (default since session 19): v3's kernel and split plan, the splits merged by the last CTA
//       of each group (ticket counters, as v4's) instead of the reduction kernel: one launch, no
//       launch gap and no second kernel's start-up at the end of a split call, and a split whose
//       range is empty costs one early exit. Equal to v3 or up to 1.3% faster on issue 7's five
//       shapes; the engine's decode step at B=256 (Qwen2.5-0.5B shape, the engine's cap of 512
//       tokens per split: 2 splits) 2.24 -> 2.13 ms (H100, bench/RESULTS.md session 19);
//   v3: about one wave of resident CTAs, splits merged by a second kernel;
//   v2: the previous plan (about 8 CTAs per SM) on the same kernels, for A/B timing;
//   v4: paged_decode_v4_kernel, one launch: the same split count as v3 (with the v4 kernel's
//       occupancy), the splits merged by the last CTA of each group (ticket counters), and
//       without split a persistent grid of min(groups, resident slots) CTAs streaming their
//       items' tiles through one pipeline.
//   v5: the v4 kernel with ~4 work items per resident slot (plan_decode_v5) claimed from a
//       counter (dynamic balance: a CTA that streams faster takes more items), a persistent grid
//       of min(items, slots) CTAs; splits merged as in v4. Two more counters per launch (claim,
//       exit), from the same registry as v4's tickets.
//   v6: v3 on the lean kernel (DecodeLeanCfg): D=128 with 2 stages and 3 CTAs per SM.
// OPPO_DECODE_PDL=1 (plans v2, v3, v6, v7): programmatic dependent launch of both kernels (decode_pdl).
// OPPO_DECODE_PREFETCH=0|1|2 (plans v2, v3, v6, v7; default 1): L2 prefetch 0, 1 or 2 tiles further ahead
// (decode_l2_ahead). OPPO_DECODE_REFILL=1: the stages refilled early, an A/B switch;
// OPPO_DECODE_DIAG_LOADS_ONLY=1: a diagnostic; OPPO_DECODE_FAST_MERGE=1 (default): v7's merge by an acq_rel
// ticket and 32-split batches, an A/B switch (decode_pipe_flags).
//
// v4/v7 ticket counters (one unsigned int per group = (sequence, kv head, head chunk), split plans
// only). The kernel needs them at 0 when it starts and leaves them at 0 (the CTA that draws a
// group's last ticket resets it), so a counter stays usable as long as two launches that may
// overlap in time never share it. This launcher owns them:
//   - eager launches: one set per (device, stream) (launches on one stream are ordered);
//   - launches captured into a CUDA graph: a set of their own, kept for the life of the process
//     (replays of one graph exec are ordered by CUDA; different graphs get different sets);
//   both carved out of chunks that this launcher cudaMalloc's and zeroes once (cudaMemsetAsync,
//   then a sync of the launching stream), only outside capture (the first split call on a
//   device, normally an eager warm-up, allocates the first 1 MiB chunk).
//   - A captured launch that finds no chunk room (no eager split call yet, or the chunk full), or
//     OPPO_DECODE_TICKETS=memset: counters at the end of the per-call workspace, zeroed by a
//     cudaMemsetAsync on the stream (a memset node under capture: still graph-safe).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <algorithm>
#include <atomic>
#include <array>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dispatch.h"
#include "../kernels/paged_decode_attention.cuh"
#include "stamps.h"

namespace {

constexpr int kMinPartition = 256;  // tokens: at least 4 tiles per split

// Multiprocessor count, read once per device (no ATen/cuda/CUDAContext.h: it needs cuSPARSE's
// headers, which a bare toolkit may lack).
int sm_count(int dev) {
  static int cached[64] = {};
  int& n = cached[dev & 63];
  if (n == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

enum class PlanKind { v2, v3, v4, v5, v6, v7 };

PlanKind decode_plan_kind() {
  const char* e = std::getenv("OPPO_DECODE_PLAN");
  if (e == nullptr || *e == 0 || std::strcmp(e, "v7") == 0) return PlanKind::v7;
  if (std::strcmp(e, "v3") == 0) return PlanKind::v3;
  if (std::strcmp(e, "v2") == 0) return PlanKind::v2;
  if (std::strcmp(e, "v4") == 0) return PlanKind::v4;
  if (std::strcmp(e, "v5") == 0) return PlanKind::v5;
  if (std::strcmp(e, "v6") == 0) return PlanKind::v6;
  if (std::strcmp(e, "v7") == 0) return PlanKind::v7;
  OPPO_CHECK(false, "OPPO_DECODE_PLAN must be v2, v3, v4, v5, v6 or v7, got '", e, "'");
  return PlanKind::v3;
}

// A 0/1 switch read at every call: `dflt` when unset or empty, off when 0, on when 1, anything else
// an error.
bool env_switch(const char* name, bool dflt = false) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return dflt;
  if (std::strcmp(e, "0") == 0) return false;
  OPPO_CHECK(std::strcmp(e, "1") == 0, name, " must be 0 or 1, got '", e, "'");
  return true;
}

// An integer switch read at every call: `dflt` when unset, else checked to lie in lo..hi.
int env_int(const char* name, int dflt, int lo, int hi) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return dflt;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  OPPO_CHECK(end != e && *end == 0 && v >= lo && v <= hi, name, " must be an integer in ", lo, "..", hi, ", got '", e,
             "'");
  return static_cast<int>(v);
}

// OPPO_DECODE_PDL=1: the split kernel and its reduction are launched with programmatic dependent
// launch (cudaLaunchKernelEx, programmatic stream serialization): each may be scheduled before the
// kernel ahead of it in the stream has finished, and waits in the kernel (griddepcontrol.wait)
// before its first read, so only the launch latency between kernels is hidden. Default off (0):
// session 17 (H100) measured v3+pdl 1.2 us faster than v3 on (1, 32768) (56.7 vs 57.9 us) and equal on
// the shapes that do not split, but not yet with the prefetch default nor in the engine's graphs.
bool decode_pdl() { return env_switch("OPPO_DECODE_PDL"); }

// OPPO_DECODE_PREFETCH=0|1|2: the split kernel also prefetches into L2 the rows of the 1 or 2 tiles
// after the ones in flight (kernel argument l2_ahead): more of the context requested from DRAM per
// CTA without shared memory for it. Default 1 (unset or empty): session 17, H100, plan v3, issue 7's
// five shapes, one run: 0.765-0.965 of copy without it, 0.779-1.019 with 1 (faster on every shape,
// by 1-5%), 0.726-0.955 with 2 (slower than 0 on four of five: bench/RESULTS.md).
int decode_l2_ahead() {
  const char* e = std::getenv("OPPO_DECODE_PREFETCH");
  if (e == nullptr || *e == 0) return 1;
  if (std::strcmp(e, "0") == 0) return 0;
  OPPO_CHECK(std::strcmp(e, "1") == 0 || std::strcmp(e, "2") == 0, "OPPO_DECODE_PREFETCH must be 0, 1 or 2, got '",
             e, "'");
  return *e - '0';
}

// OPPO_DECODE_DIAG_LOADS_ONLY=1, read at each launch (so at a graph's capture): a bench diagnostic
// that skips every tile's arithmetic of the split kernel (its loads, waits and barriers stay), so
// the output is WRONG (ops.attention warns once). Off by default. Session 23 (H100) measured the
// loads alone at 0.84-0.88 of copy on issue 7's two small shapes (bench/NOTES.md).
// OPPO_DECODE_REFILL=1 (plans v2, v3, v6, v7): an A/B switch, off by default: each stage refilled as
// soon as its tile is done (kDecodeEarlyRefill). Session 23 (H100): -2.4% at (1, 32768) alone, 3-7%
// slower beside the default L2 prefetch; kept to time with the loads alone (bench +rf+lo).
// OPPO_DECODE_FAST_MERGE=0|1 (plan v7), default 1: the ticket by one atom.acq_rel.gpu and the
// merge's loads in batches of 32 at D=128 (kDecodeFastMerge); 0: two __threadfence around the
// atomicAdd and batches of 16. Session 25 (H100, both plan orders): 56.2 / 55.8 us against 56.7 / 56.9
// at (1, 32768), equal on the D=64 shape that does not split (bench/NOTES.md).
bool decode_fast_merge() { return env_switch("OPPO_DECODE_FAST_MERGE", true); }

// OPPO_DECODE_REG_STAGE=1 (plans v2, v3, v7 at head dim 128): an A/B switch, off by default: the
// split kernel's register-staged loader (paged_decode_kernel's kRS: ld.global into registers,
// st.shared an iteration later, in place of cp.async from tile 2 on). Built in session 25 after its
// loads probe (ldgst) read the same bytes 2-3% faster than cp.async.
bool decode_reg_stage() { return env_switch("OPPO_DECODE_REG_STAGE"); }
// The split kernel's tiles with the heads as the mma's N (plans v2, v3, v7; groups of <= 8 query heads
// per kv head): half the mma and exponentials of the 16-row form. OPPO_DECODE_HEADS_AS_N unset (the
// default): on for groups of 1..8 heads with the plans that have it. Session 27 (two H200s, both plan
// orders): 1.3-4% faster on every shape timed with G = 2..8, split or not, both head dims; the engine's
// step 1-2%. G = 1 from session 28 (H100, both orders): 1.5-4% faster at head dim 64 on four shapes,
// 0.2-2% at head dim 128 on four, where one of session 27's H200s had measured it 2.5-3% slower at
// (128, 2048, 32, 32, 128) and the other faster (bench/NOTES.md "Session 28"). 1: on (an error for
// groups of more than 8 heads, or with plan v6 or OPPO_DECODE_REG_STAGE); 0: off.
bool decode_heads_as_n(int G, PlanKind kind, bool reg_stage) {
  return env_switch("OPPO_DECODE_HEADS_AS_N", G >= 1 && G <= 8 && kind != PlanKind::v6 && !reg_stage);
}

// Whether decode_tile_stamps is on (the launcher then takes the heads-as-N kernel that writes them).
std::atomic<bool> g_tile_stamps_on{false};

int decode_pipe_flags() {
  return decode_l2_ahead() | (env_switch("OPPO_DECODE_REFILL") ? oppo::attn::kDecodeEarlyRefill : 0) |
         (env_switch("OPPO_DECODE_DIAG_LOADS_ONLY") ? oppo::attn::kDecodeLoadsOnly : 0) |
         (decode_fast_merge() ? oppo::attn::kDecodeFastMerge : 0);
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when `pdl`.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, int block, int smem, cudaStream_t stream, bool pdl,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

bool tickets_forced_memset() {
  const char* e = std::getenv("OPPO_DECODE_TICKETS");
  if (e == nullptr || *e == 0 || std::strcmp(e, "pool") == 0) return false;
  OPPO_CHECK(std::strcmp(e, "memset") == 0, "OPPO_DECODE_TICKETS must be pool or memset, got '", e, "'");
  return true;
}

struct DecodePlan {
  int num_splits;
  int partition;  // tokens per split (a multiple of the tile); 1 << 30 with one split
};

// `splits` partitions of max_ctx tokens, each rounded up to the tile (so maybe fewer splits).
DecodePlan split_into(int64_t splits, int64_t max_ctx) {
  using oppo::attn::kDecodeTile;
  if (splits > 1) {
    int64_t part = (max_ctx + splits - 1) / splits;
    part = (part + kDecodeTile - 1) / kDecodeTile * kDecodeTile;
    splits = (max_ctx + part - 1) / part;
    if (splits > 1) return {static_cast<int>(splits), static_cast<int>(part)};
  }
  return {1, 1 << 30};
}

// base = CTAs per split (B * Hkv * q_chunks); resident = CTAs of the kernel per SM.
//   v2: about 8 CTAs per SM in all.
//   v3: at most one wave of resident CTAs: splits = floor(SMs * resident / base), so no split at
//       all once B * Hkv * q_chunks fills half the machine (each CTA then writes `out` itself).
//   v4: v3's rule with the v4 kernel's occupancy (the caller passes v2 = false); v6: v3's rule
//       with the lean kernel's occupancy (3 CTAs per SM at D=128).
// All: partitions of at least kMinPartition tokens, rounded up to the 64-token tile.
// max_partition > 0 (the caller's hint, v2/v3 only): then also at most that many tokens per split
// (rounded up to the tile). The rules above see shapes only, so they plan a batch of one long
// context among many short ones as if every context filled the table: 2 splits at workload G's
// decode batch (B 128, Hkv 2, table 3360), and the CTA of the longest context's first half (1680
// tokens, one CTA at ~10 GB/s) set the time, 45 us against a floor of 10 (session 13). With a cap,
// the long contexts get more CTAs; a split past a context's end exits at once and the reduction
// never reads it.
DecodePlan plan_decode(int64_t base, int64_t max_ctx, int sms, int resident, bool v2, int64_t max_partition) {
  using oppo::attn::kDecodeTile;
  int64_t splits = 1;
  if (v2) {
    const int64_t target = 8LL * sms;
    if (base < target) splits = (target + base - 1) / base;
  } else {
    // OPPO_DECODE_SPLIT_SLOTS=N (an A/B switch, session 26): split as if N CTAs per SM were resident
    // (fewer, longer splits than one wave when N < resident); 0, the default: the kernel's own.
    const int per_sm = env_int("OPPO_DECODE_SPLIT_SLOTS", 0, 0, 16);
    const int64_t slots = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : std::max(1, resident));
    if (base < slots) splits = slots / base;
  }
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (max_ctx + kMinPartition - 1) / kMinPartition));
  if (max_partition > 0) {
    const int64_t cap = (max_partition + kDecodeTile - 1) / kDecodeTile * kDecodeTile;
    splits = std::max<int64_t>(splits, (max_ctx + cap - 1) / cap);
  }
  return split_into(splits, max_ctx);
}


// v5 (dynamic items on the v4 kernel): at least `items_per_slot` (OPPO_DECODE_V5_ITEMS, default 4)
// work items per resident CTA slot, so that CTAs that stream faster take more of them: splits =
// ceil(items_per_slot * slots / groups), partitions of at least kMinPartition tokens (rounded up
// to the tile). ncu (session 14): with one wave of equal CTAs the SMs were active only 83-84% of
// the kernel's cycles (its ramp and ragged end); claims from a counter balance the end.
// Items also hold at most OPPO_DECODE_V5_MAX_PART tokens (default 512): when the counter runs out
// each CTA finishes the item it holds, so the ragged end is about half an item's time.
// Measured (session 15, H200): slower than v3 on every shape of issue 7, by 2-4 us per item and
// CTA (the persistent stream's item transitions; bench/NOTES.md "Session 15").
DecodePlan plan_decode_v5(int64_t groups, int64_t max_ctx, int sms, int resident) {
  const int64_t slots = static_cast<int64_t>(sms) * std::max(1, resident);
  const int64_t want = env_int("OPPO_DECODE_V5_ITEMS", 4, 1, 64) * slots;
  const int64_t max_part = env_int("OPPO_DECODE_V5_MAX_PART", 512, kMinPartition, 1 << 30);
  int64_t splits = std::max((want + groups - 1) / groups, (max_ctx + max_part - 1) / max_part);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (max_ctx + kMinPartition - 1) / kMinPartition));
  return split_into(splits, max_ctx);
}

// ---- v4 ticket counters (see the top of this file) ----
struct TicketChunk {
  unsigned* base;
  int64_t cap, used;  // in counters
};
struct TicketRegistry {
  std::mutex mu;
  std::vector<TicketChunk> chunks[64];                                        // per device
  std::map<std::pair<int, cudaStream_t>, std::pair<unsigned*, int64_t>> eager;  // set, capacity
};
TicketRegistry& ticket_registry() {
  static TicketRegistry* r = new TicketRegistry;  // never destroyed: captured graphs keep pointers
  return *r;
}
constexpr int64_t kTicketChunk = 1 << 18;  // counters per chunk (1 MiB)
constexpr int64_t kTicketEagerSet = 4096;  // counters per stream set (more than any split plan needs)

void add_ticket_chunk(std::vector<TicketChunk>& chunks, int64_t cap, cudaStream_t stream) {
  void* p = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&p, cap * sizeof(unsigned)));
  C10_CUDA_CHECK(cudaMemsetAsync(p, 0, cap * sizeof(unsigned), stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // zero before any stream uses a piece of it
  chunks.push_back({static_cast<unsigned*>(p), cap, 0});
}

// n zeroed counters out of the device's chunks; a new chunk only when allocating is allowed.
unsigned* carve_tickets(std::vector<TicketChunk>& chunks, int64_t n, bool may_allocate, cudaStream_t stream) {
  n = (n + 63) / 64 * 64;  // 256-byte pieces
  if (chunks.empty() || chunks.back().used + n > chunks.back().cap) {
    if (!may_allocate) return nullptr;
    add_ticket_chunk(chunks, std::max(kTicketChunk, n), stream);
  }
  TicketChunk& c = chunks.back();
  unsigned* out = c.base + c.used;
  c.used += n;
  return out;
}

// Zeroed counters for `n` groups of a v4 launch on `stream`, or nullptr: the caller then puts
// them in its workspace and zeroes them with cudaMemsetAsync.
unsigned* ticket_counters(int dev, cudaStream_t stream, int64_t n) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TicketRegistry& reg = ticket_registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  std::vector<TicketChunk>& chunks = reg.chunks[dev & 63];
  if (status != cudaStreamCaptureStatusNone) return carve_tickets(chunks, n, false, stream);  // its own set
  // Eager: keep at least half a chunk free for the captures that follow (an engine warms up
  // eagerly before it captures; each captured split launch takes its own set for good).
  if (chunks.empty() || chunks.back().cap - chunks.back().used < kTicketChunk / 2)
    add_ticket_chunk(chunks, kTicketChunk, stream);
  auto& set = reg.eager[{dev, stream}];
  if (set.second < n) {
    const int64_t cap = std::max(n, kTicketEagerSet);
    set = {carve_tickets(chunks, cap, true, stream), cap};
  }
  return set.first;
}

// Occupancy set-up once per device and instantiation: smem attribute, max-shared carveout (the
// kernels read K/V through cp.async.cg, L1 is not needed), resident CTAs per SM.
template <typename Kernel>
int setup_resident(Kernel kernel, int smem, int dev, int* cache) {
  if (cache[dev & 63] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        static_cast<int>(cudaSharedmemCarveoutMaxShared)));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, oppo::attn::kDecodeThreads, smem));
    cache[dev & 63] = std::max(1, n);
  }
  return cache[dev & 63];
}

// The shape both launchers (v2/v3 and v4) read from the tensors.
struct DecodeShape {
  int B, Hq, block_size, Hkv, G, q_chunks, dev, sms;
  int64_t max_ctx;        // tokens the block table can address (the partition plan's upper bound)
  int64_t max_partition;  // the caller's cap on tokens per split (0: none; v2/v3 only)
  DecodeShape(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_tables, int64_t max_partition)
      : B(static_cast<int>(q.size(0))), Hq(static_cast<int>(q.size(1))),
        block_size(static_cast<int>(k_cache.size(1))), Hkv(static_cast<int>(k_cache.size(2))), G(Hq / Hkv),
        q_chunks((G + 15) / 16), dev(q.get_device()), sms(sm_count(dev)),
        max_ctx(std::min<int64_t>(block_tables.size(1) * static_cast<int64_t>(block_size), INT_MAX)),
        max_partition(max_partition) {}
};

// Workspace floats of a split plan: o [B, Hq, S, D] + lse [B, Hq, S] (+ `ticket_groups` counters).
int64_t workspace_floats(const DecodeShape& sh, int D, int num_splits, int64_t ticket_groups) {
  if (num_splits <= 1) return 0;
  return static_cast<int64_t>(sh.B) * sh.Hq * num_splits * (D + 1) + ticket_groups;
}

// The caller's workspace (checked to hold `need` floats) or a fresh one in `holder`; nullptr
// when the plan needs none.
float* take_workspace(const std::optional<at::Tensor>& given, int64_t need, const at::Tensor& q, at::Tensor& holder) {
  constexpr const char* op = "paged_decode_attention";
  if (need == 0) return nullptr;
  if (given.has_value() && given->defined()) {
    const at::Tensor& w = *given;
    OPPO_CHECK(w.is_cuda() && w.get_device() == q.get_device(), op, ": workspace must be on q's device (",
               q.device(), "), got ", w.device());
    OPPO_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), op,
               ": workspace must be a contiguous float32 tensor, got ", w.scalar_type());
    OPPO_CHECK(w.numel() >= need, op, ": workspace holds ", w.numel(), " floats, this call's split plan needs ",
               need, " (size it with paged_decode_workspace_size for this q, k_cache and block_tables)");
    OPPO_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, op, ": workspace must be 16-byte aligned");
    return w.data_ptr<float>();
  }
  holder = at::empty({need}, q.options().dtype(at::kFloat));
  return holder.data_ptr<float>();
}

// The plan of OPPO_DECODE_PLAN's kernel for this shape, and its kernel's CTAs per SM.
template <typename T, int D>
DecodePlan plan_for(const DecodeShape& sh, PlanKind kind, int* resident_out) {
  using namespace oppo::attn;
  const int64_t groups = static_cast<int64_t>(sh.B) * sh.Hkv * sh.q_chunks;
  int resident;
  if (kind == PlanKind::v4 || kind == PlanKind::v5) {
    constexpr int kStages = DecodeCfg<D, true>::kStages;
    static int cache[64] = {};
    resident = setup_resident(paged_decode_v4_kernel<T, D, kStages>, DecodeV4Smem<T, D, kStages>::kBytes, sh.dev, cache);
  } else if (kind == PlanKind::v6) {
    constexpr int kStages = DecodeLeanCfg<D>::kStages;
    static int cache[64] = {};
    resident = setup_resident(paged_decode_kernel<T, D, kStages>, DecodeSmem<T, D, kStages>::kBytes, sh.dev, cache);
  } else {
    constexpr int kStages = DecodeCfg<D>::kStages;
    static int cache[64] = {};  // CTAs per SM (0: not yet set up on that device)
    resident = setup_resident(paged_decode_kernel<T, D, kStages>, DecodeSmem<T, D, kStages>::kBytes, sh.dev, cache);
  }
  if (resident_out != nullptr) *resident_out = resident;
  if (kind == PlanKind::v5) return plan_decode_v5(groups, sh.max_ctx, sh.sms, resident);
  // v4 ignores max_partition: its split launches were not built for more than one wave of items
  return plan_decode(groups, sh.max_ctx, sh.sms, resident, kind == PlanKind::v2,
                     kind == PlanKind::v4 ? 0 : sh.max_partition);
}

// Counters a v4/v5/v7 launch needs: one ticket per group when split, + (v5) the claim and exit
// counters after them; none for v2, v3, v6 (their splits are merged by the reduction kernel).
int64_t v4_counters(PlanKind kind, int64_t groups, int num_splits) {
  if (kind != PlanKind::v4 && kind != PlanKind::v5 && kind != PlanKind::v7) return 0;
  return (num_splits > 1 ? groups : 0) + (kind == PlanKind::v5 ? 2 : 0);
}

// A launch's scratch: the split partials o [B, Hq, S, D] and lse [B, Hq, S] (when split) and
// `counters` zeroed ticket counters (v4/v5/v7): from the registry, or (captured without room
// there, or OPPO_DECODE_TICKETS=memset) after the partials in the workspace, zeroed by a
// cudaMemsetAsync on the stream (a memset node under capture: still graph-safe).
struct SplitScratch {
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  unsigned* tickets = nullptr;
};
SplitScratch split_scratch(const std::optional<at::Tensor>& workspace, const DecodeShape& sh, int D, int num_splits,
                           int64_t counters, const at::Tensor& q, at::Tensor& holder, cudaStream_t stream) {
  SplitScratch r;
  if (counters > 0 && !tickets_forced_memset()) r.tickets = ticket_counters(sh.dev, stream, counters);
  const int64_t in_ws = counters > 0 && r.tickets == nullptr ? counters : 0;
  // A caller's workspace must hold what paged_decode_workspace_size reports, the counters' room
  // included wherever this launch takes its tickets from (the size is the contract; the Python
  // side checks the same); one allocated here holds what this launch uses.
  const int64_t partials = workspace_floats(sh, D, num_splits, 0);
  const bool given = workspace.has_value() && workspace->defined();
  r.ws_o = take_workspace(workspace, partials + (given ? counters : in_ws), q, holder);
  const int64_t n = num_splits > 1 ? static_cast<int64_t>(sh.B) * sh.Hq * num_splits : 0;
  if (r.ws_o != nullptr) r.ws_lse = r.ws_o + n * D;
  if (in_ws > 0) {
    r.tickets = reinterpret_cast<unsigned*>(r.ws_o + n * (D + 1));
    C10_CUDA_CHECK(cudaMemsetAsync(r.tickets, 0, in_ws * sizeof(unsigned), stream));
  }
  return r;
}

template <typename T, int D>
void launch_decode_v4(PlanKind kind, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens,
                      double scale, const std::optional<at::Tensor>& workspace) {
  using namespace oppo::attn;
  constexpr int kStages = DecodeCfg<D, true>::kStages;
  const DecodeShape sh(q, k_cache, block_tables, 0);
  const int B = sh.B, Hq = sh.Hq, block_size = sh.block_size, Hkv = sh.Hkv, G = sh.G, q_chunks = sh.q_chunks;
  const int64_t max_ctx = sh.max_ctx;
  const int sms = sh.sms;

  auto kernel = paged_decode_v4_kernel<T, D, kStages>;
  constexpr int smem = DecodeV4Smem<T, D, kStages>::kBytes;
  int resident = 1;
  // v4: v3's split count (items <= slots when split); v5: ~4 items per slot, claimed dynamically
  const DecodePlan plan = plan_for<T, D>(sh, kind, &resident);
  const int64_t groups = static_cast<int64_t>(B) * Hkv * q_chunks;
  const int64_t slots = static_cast<int64_t>(sms) * resident;
  const int num_splits = plan.num_splits;
  const int64_t items = groups * num_splits;
  const int64_t grid = (kind == PlanKind::v4 && num_splits > 1) ? items : std::min(items, slots);
  OPPO_CHECK(items <= INT_MAX, "paged_decode_attention: too many work items");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor ws;
  const SplitScratch sc = split_scratch(workspace, sh, D, num_splits, v4_counters(kind, groups, num_splits), q, ws, stream);
  float* ws_o_ptr = sc.ws_o;
  float* ws_lse_ptr = sc.ws_lse;
  unsigned* tickets = sc.tickets;

  DecodeV4Params p;
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.ws_o = ws_o_ptr;
  p.ws_lse = ws_lse_ptr;
  p.tickets = tickets;
  p.claims = kind == PlanKind::v5 ? tickets + (num_splits > 1 ? groups : 0) : nullptr;
  p.o_s0 = out.stride(0);
  p.o_s1 = out.stride(1);
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.page_stride = k_cache.stride(0);
  p.row_stride = static_cast<int>(k_cache.stride(1));
  p.head_stride = static_cast<int>(k_cache.stride(2));
  p.bt_stride = block_tables.stride(0);
  p.block_size = block_size;
  p.Hkv = Hkv;
  p.G = G;
  p.q_chunks = q_chunks;
  p.table_tokens = static_cast<int>(max_ctx);
  p.num_splits = num_splits;
  p.partition = plan.partition;
  p.num_items = static_cast<int>(items);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.out_f32 = out.scalar_type() == at::kFloat;
  kernel<<<static_cast<unsigned>(grid), kDecodeThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// v2, v3, v7 (kStages = DecodeCfg's) and v6 (DecodeLeanCfg's): the split kernel, then (v2, v3, v6) the
// reduction. kRS: the register-staged loader (OPPO_DECODE_REG_STAGE=1), kHN: the heads as the mma's
// N (OPPO_DECODE_HEADS_AS_N=1), each planned as the default kernel: the launch checks that it fits as
// many CTAs per SM.
template <typename T, int D, int kStages, bool kRS = false, bool kHN = false, bool kTS = false, bool kRope = false>
void launch_decode_split(PlanKind kind, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens,
                         double scale, const std::optional<at::Tensor>& workspace, int64_t max_partition,
                         const oppo::attn::DecodeRope& rope = {}) {
  using namespace oppo::attn;
  const DecodeShape sh(q, k_cache, block_tables, max_partition);
  const int B = sh.B, Hq = sh.Hq, block_size = sh.block_size, Hkv = sh.Hkv, G = sh.G, q_chunks = sh.q_chunks;
  const int64_t max_ctx = sh.max_ctx;

  auto kernel = paged_decode_kernel<T, D, kStages, kRS, kHN, kTS, kRope>;
  constexpr int smem = DecodeSmem<T, D, kStages, kRS>::kBytes;
  int resident = 0;
  const DecodePlan plan = plan_for<T, D>(sh, kind, &resident);
  if constexpr (kRS || kHN) {
    static int cache[64] = {};
    const int own_resident = setup_resident(kernel, smem, sh.dev, cache);
    OPPO_CHECK(own_resident == resident, kRS ? "OPPO_DECODE_REG_STAGE=1" : "OPPO_DECODE_HEADS_AS_N=1",
               ": the decode kernel fits ", own_resident, " CTAs per SM, the plan assumes ", resident);
  }
  if constexpr (kHN)
    OPPO_CHECK(G <= 8, "OPPO_DECODE_HEADS_AS_N=1 serves groups of at most 8 query heads per kv head, got ", G);
  const int num_splits = plan.num_splits;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor ws;  // one piece: o [B, Hq, S, D] then lse [B, Hq, S] (v7: then its tickets, if not from the registry)
  const int64_t groups = static_cast<int64_t>(B) * Hkv * q_chunks;
  const SplitScratch sc = split_scratch(workspace, sh, D, num_splits, v4_counters(kind, groups, num_splits), q, ws, stream);
  float* ws_o_ptr = sc.ws_o;
  float* ws_lse_ptr = sc.ws_lse;
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const float scale_log2 = static_cast<float>(scale) * kLog2e;

  const bool pdl = decode_pdl();
  const dim3 grid(Hkv * q_chunks, B, num_splits);  // split slowest: see paged_decode_kernel
  launch_kernel(kernel, grid, kDecodeThreads, smem, stream, pdl,
      out.data_ptr(), out_f32, out.stride(0), out.stride(1), reinterpret_cast<const T*>(q.data_ptr()), q.stride(0),
      q.stride(1), reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
      k_cache.stride(0), static_cast<int>(k_cache.stride(1)), static_cast<int>(k_cache.stride(2)),
      oppo::Divisor(block_size), Hkv,
      block_tables.data_ptr<int>(), block_tables.stride(0),
      static_cast<int>(max_ctx), context_lens.data_ptr<int>(), ws_o_ptr, ws_lse_ptr, G, num_splits, plan.partition,
      scale_log2, decode_pipe_flags(), sc.tickets, rope);
  if (num_splits > 1 && sc.tickets == nullptr) {  // v2, v3, v6: the reduction kernel (v7's CTAs merge)
    launch_kernel(paged_decode_reduce_kernel<T, D>, dim3(Hq, B), kDecodeReduceThreads, 0, stream, pdl,
        out.data_ptr(), out_f32, out.stride(0), out.stride(1), static_cast<const float*>(ws_o_ptr),
        static_cast<const float*>(ws_lse_ptr), context_lens.data_ptr<int>(), Hq, num_splits, plan.partition);
  }
}

template <typename T, int D>
void launch_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                   const std::optional<at::Tensor>& workspace, int64_t max_partition,
                   const oppo::attn::DecodeRope& rope) {
  using namespace oppo::attn;
  const PlanKind kind = decode_plan_kind();
  if (rope.cos_sin != nullptr) {  // the rotary prologue: the heads-as-N kernel's kRope form only
    const bool rs = decode_reg_stage();
    OPPO_CHECK(kind != PlanKind::v4 && kind != PlanKind::v5 && kind != PlanKind::v6 && !rs &&
                   !env_switch("OPPO_DECODE_REFILL") && !g_tile_stamps_on.load() &&
                   decode_heads_as_n(static_cast<int>(q.size(1) / k_cache.size(2)), kind, rs),
               "paged_decode_attention with a rotary prologue runs the heads-as-N kernel (groups of <= 8 query heads, "
               "plans v2/v3/v7, without OPPO_DECODE_REG_STAGE, OPPO_DECODE_REFILL or the tile stamps)");
    launch_decode_split<T, D, DecodeCfg<D>::kStages, false, true, false, true>(
        kind, out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition, rope);
    return;
  }
  if (kind == PlanKind::v4 || kind == PlanKind::v5)
    launch_decode_v4<T, D>(kind, out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace);
  else if (kind == PlanKind::v6 && DecodeLeanCfg<D>::kStages != DecodeCfg<D>::kStages)
    launch_decode_split<T, D, DecodeLeanCfg<D>::kStages>(kind, out, q, k_cache, v_cache, block_tables, context_lens,
                                                         scale, workspace, max_partition);
  else if (const bool rs = decode_reg_stage();
           decode_heads_as_n(static_cast<int>(q.size(1) / k_cache.size(2)), kind, rs)) {
    OPPO_CHECK(kind != PlanKind::v6 && !rs,
               "OPPO_DECODE_HEADS_AS_N=1 runs with plans v2, v3 and v7 and without OPPO_DECODE_REG_STAGE");
    if (g_tile_stamps_on.load()) {  // bench/decode_tiles.py: its own instantiation, bf16 only
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        launch_decode_split<T, D, DecodeCfg<D>::kStages, false, true, true>(
            kind, out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition);
      else
        OPPO_CHECK(false, "decode_tile_stamps: built for bf16 only");
    } else {
      launch_decode_split<T, D, DecodeCfg<D>::kStages, false, true>(kind, out, q, k_cache, v_cache, block_tables,
                                                                    context_lens, scale, workspace, max_partition);
    }
  } else if (rs) {
    OPPO_CHECK(kind != PlanKind::v6 && !env_switch("OPPO_DECODE_REFILL"),
               "OPPO_DECODE_REG_STAGE=1 runs with plans v2, v3 and v7 and without OPPO_DECODE_REFILL");
    if constexpr (D == 128)
      launch_decode_split<T, D, DecodeCfg<D>::kStages, true>(kind, out, q, k_cache, v_cache, block_tables,
                                                             context_lens, scale, workspace, max_partition);
    else
      OPPO_CHECK(false, "OPPO_DECODE_REG_STAGE=1 is built for head dim 128 only (at 64 its registers and shared "
                 "memory do not fit the 4 CTAs per SM the plans take), got head dim ", D);
  } else {
    launch_decode_split<T, D, DecodeCfg<D>::kStages>(kind, out, q, k_cache, v_cache, block_tables, context_lens,
                                                     scale, workspace, max_partition);
  }
}

}  // namespace

// out          [B, Hq, D]  q's dtype or float32 (the tests use float32 to see the kernel's own error)
// q            [B, Hq, D]  bf16/fp16, inner dim contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D]  each page contiguous, equal strides
// block_tables [B, max_blocks] int32;  context_lens [B] int32
namespace {
void paged_decode_impl(const char* op, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens,
                       double scale, const std::optional<at::Tensor>& workspace, int64_t max_partition,
                       const std::optional<at::Tensor>& rope_cos_sin, const std::optional<at::Tensor>& rope_positions,
                       const std::optional<at::Tensor>& rope_slots) {
  OPPO_CHECK(max_partition >= 0, op, ": max_partition must be >= 0 (0: no cap), got ", max_partition);
  OPPO_CHECK_CUDA(out, "paged_decode_attention"); OPPO_CHECK_CUDA(q, "paged_decode_attention");
  OPPO_CHECK_CUDA(k_cache, "paged_decode_attention"); OPPO_CHECK_CUDA(v_cache, "paged_decode_attention");
  OPPO_CHECK_CUDA(block_tables, "paged_decode_attention"); OPPO_CHECK_CUDA(context_lens, "paged_decode_attention");
  check_attention_tensors(op, "[B, Hq, D]", out, q, k_cache, v_cache);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  OPPO_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, op, ": block_tables/context_lens must be int32");
  OPPO_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.stride(1) == 1, op, ": block_tables must be [B, max_blocks], rows contiguous");
  OPPO_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && context_lens.is_contiguous(), op, ": context_lens must be [B] contiguous");
  // Pages token-major [block_size, Hkv, D] (the pool's layout) or head-major [Hkv, block_size, D]
  // viewed as [block_size, Hkv, D]: any strides of a token row and a kv head with rows contiguous.
  OPPO_CHECK(k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(), op,
             ": cache rows must be contiguous (stride 1 in D) and K/V caches share strides");
  OPPO_CHECK(k_cache.stride(1) % 8 == 0 && k_cache.stride(2) % 8 == 0 && k_cache.stride(1) <= INT_MAX &&
             k_cache.stride(2) <= INT_MAX, op, ": cache token/head strides must be multiples of 8 elements");
  OPPO_CHECK(q.stride(2) == 1 && out.stride(2) == 1, op, ": q/out inner dim must be contiguous");
  OPPO_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && out.stride(0) % 4 == 0 && out.stride(1) % 4 == 0 &&
             k_cache.stride(0) % 8 == 0, op, ": strides must keep rows 16-byte aligned");
  for (const at::Tensor& t : std::array<at::Tensor, 4>{q, k_cache, v_cache, out})
    OPPO_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": tensors must be 16-byte aligned");
  OPPO_CHECK(B <= 65535, op, ": batch above 65535");
  // The rotary prologue (all three or none): q is the query part of the QKV output [B, (Hq + 2 Hkv) D]
  // (k and v follow in each row), rotated at rope_positions [B] int64 by rope_cos_sin [P, D] float32;
  // the new rows' k (rotated) and v go to the caches at rope_slots [B] int64 (-1: none).
  oppo::attn::DecodeRope rope = {};
  OPPO_CHECK(rope_cos_sin.has_value() == rope_positions.has_value() && rope_cos_sin.has_value() == rope_slots.has_value(),
             op, ": give rope_cos_sin, rope_positions and rope_slots together, or none");
  if (rope_cos_sin.has_value()) {
    const at::Tensor &cs = *rope_cos_sin, &pos = *rope_positions, &slots = *rope_slots;
    OPPO_CHECK(cs.is_cuda() && pos.is_cuda() && slots.is_cuda(), op, ": cos_sin, positions and slots must be CUDA tensors");
    OPPO_CHECK(cs.scalar_type() == at::kFloat && cs.dim() == 2 && cs.size(1) == D && cs.stride(1) == 1 &&
                   cs.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(cs.data_ptr()) % 16 == 0,
               op, ": rope_cos_sin must be float32 [P, head_dim], rows contiguous and 16-byte aligned");
    OPPO_CHECK(pos.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && pos.dim() == 1 &&
                   slots.dim() == 1 && pos.size(0) == B && slots.size(0) == B && pos.is_contiguous() && slots.is_contiguous(),
               op, ": rope_positions and rope_slots must be int64 [B], contiguous");
    OPPO_CHECK(q.stride(1) == D && q.stride(0) >= (Hq + 2 * Hkv) * D, op,
               ": with a rotary prologue q must be the query part of the QKV output [B, (Hq + 2 Hkv) * D]");
    OPPO_CHECK(k_cache.dtype() == q.dtype(), op, ": the rotary prologue writes the caches in q's dtype");
    rope = {cs.data_ptr<float>(), cs.stride(0), cs.size(0), pos.data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
            k_cache.data_ptr(), v_cache.data_ptr()};
  }
  if (B == 0 || Hq == 0) return;
  const at::cuda::OptionalCUDAGuard guard(q.device());
  if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) launch_decode<__nv_bfloat16, 64>(out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition, rope);
    else launch_decode<__nv_bfloat16, 128>(out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition, rope);
  } else {
    if (D == 64) launch_decode<__half, 64>(out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition, rope);
    else launch_decode<__half, 128>(out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace, max_partition, rope);
  }
}
}  // namespace

void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale,
                                 const std::optional<at::Tensor>& workspace, int64_t max_partition) {
  paged_decode_impl("paged_decode_attention", out, q, k_cache, v_cache, block_tables, context_lens, scale, workspace,
                    max_partition, std::nullopt, std::nullopt, std::nullopt);
}

// The same with the decode layer's rotary and K/V append as the kernel's prologue (see DecodeRope):
// q [B, Hq, D] the query part of the QKV output [B, (Hq + 2 Hkv) D]; the caches are written.
void paged_decode_attention_rope_cuda(at::Tensor& out, const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const at::Tensor& cos_sin, const at::Tensor& positions, const at::Tensor& slots,
                                      const std::optional<at::Tensor>& workspace, int64_t max_partition) {
  paged_decode_impl("paged_decode_attention_rope", out, q, k_cache, v_cache, block_tables, context_lens, scale,
                    workspace, max_partition, cos_sin, positions, slots);
}

// Per-CTA timestamps of paged_decode_kernel (plans v2, v3, v6, v7; bench/decode_stamps.py): CTA c
// writes row c (start ns, end ns, SM id); see set_stamps.
void decode_cta_stamps_cuda(at::Tensor& stamps) {
  set_stamps("decode_cta_stamps", oppo::attn::decode_stamps, stamps);
}

// Per-tile stamps of paged_decode_kernel (plans v2, v3, v7 with the heads as N, bf16;
// bench/decode_tiles.py): while on, those launches take the kernel instantiated with them, whose
// thread 0 of CTA c writes rows c * kTileStampRows ..: one per event (kernels/paged_decode_attention.cuh
// kTsd*). Off again with an empty tensor.
void decode_tile_stamps_cuda(at::Tensor& stamps) {
  set_stamps("decode_tile_stamps", oppo::attn::decode_tile_stamps, stamps, &g_tile_stamps_on);
}

// Floats of `workspace` that paged_decode_attention needs for this q, k_cache and block_tables
// under the current OPPO_DECODE_PLAN (0: the plan does not split). The plan depends on shapes only
// (never on context_lens' values), so one workspace serves every call of a captured graph. v4/v5/v7:
// room for the ticket counters too (a captured launch may need them there).
int64_t paged_decode_workspace_size_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                         const at::Tensor& block_tables, int64_t max_partition) {
  constexpr const char* op = "paged_decode_workspace_size";
  OPPO_CHECK_CUDA(q, "paged_decode_workspace_size"); OPPO_CHECK_CUDA(k_cache, "paged_decode_workspace_size");
  OPPO_CHECK(q.dim() == 3 && k_cache.dim() == 4 && block_tables.dim() == 2, op,
             ": q [B, Hq, D], k_cache [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks]");
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  OPPO_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && (D == 64 || D == 128), op,
             ": head_dim 64 or 128 shared by q and the cache, and Hq % Hkv == 0");
  OPPO_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op, ": q must be bf16 or fp16");
  if (q.size(0) == 0 || Hq == 0) return 0;
  OPPO_CHECK(max_partition >= 0, op, ": max_partition must be >= 0 (0: no cap), got ", max_partition);
  const at::cuda::OptionalCUDAGuard guard(q.device());
  const DecodeShape sh(q, k_cache, block_tables, max_partition);
  const PlanKind kind = decode_plan_kind();
  const int64_t groups = static_cast<int64_t>(sh.B) * sh.Hkv * sh.q_chunks;
  auto size = [&](auto tag, auto dtag) -> int64_t {
    using T = decltype(tag);
    constexpr int kD = decltype(dtag)::value;
    const DecodePlan plan = plan_for<T, kD>(sh, kind, nullptr);
    return workspace_floats(sh, kD, plan.num_splits, 0) + v4_counters(kind, groups, plan.num_splits);
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (q.scalar_type() == at::kBFloat16)
    return D == 64 ? size(__nv_bfloat16{}, D64{}) : size(__nv_bfloat16{}, D128{});
  return D == 64 ? size(__half{}, D64{}) : size(__half{}, D128{});
}
