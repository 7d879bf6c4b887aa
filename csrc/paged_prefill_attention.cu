// Launcher of incremental (chunked) prefill attention over a paged prefix: argument checks,
// dtype/head-dim dispatch, launch on the current stream. No host sync, no allocation: capturable
// in CUDA graphs (max_seqlen_q comes from the caller, who knows the chunk sizes).
//
// OPPO_PREFILL_PLAN (read at every call, so a benchmark can A/B within one process):
//   auto  (default, or unset): on an sm_90a device wgmma_pp_ov_qp_xc_ps for head dim 128 and
//         wgmma3_pp_ov_qp_xc_ps for head dim 64 in bf16, else mma (prefill_plan() below says why);
//   mma   v2: mma.sync m16n8k16, 64-row CTAs (kernels/paged_prefill_attention.cuh);
//   wgmma           v4: sm_90a warpgroup MMA, warp-specialized (kernels/paged_prefill_wgmma.cuh);
//   wgmma_pp        v4 with its two consumer warpgroups in ping-pong (same kernel, a flag);
//   wgmma_ov        v4 with each warpgroup's softmax overlapping its own P V (a flag);
//   wgmma_pp_ov     both; then "_kv" after any of them: K and V on separate barrier rings over the
//                   same stages (released and published separately: K prefetched ~2 tiles ahead, V
//                   ~2.5; a flag), and last "_ps": persistent CTAs (one per SM, looping over the
//                   work items, the K/V prefetch running on across items), e.g. wgmma_pp_ov_kv_ps;
//                   "_qp" before "_ps": the producer prefetches each item's Q rows into L2 when it
//                   opens the item (up to a few tiles before the consumers stage them; a flag);
//                   "_xc" before "_ps" (with _pp): the warpgroups' ring of turns runs on across a
//                   persistent CTA's items, the next item's first Q K^T issued while the last
//                   warpgroup finishes the item (a flag, kFlagChain), e.g. wgmma3_pp_ov_qp_xc_ps;
//                   "_mi" before "_ps": a persistent CTA's items as one stream of batches, each
//                   item's last P V issued with the next item's first Q K^T, the next item's Q
//                   staged at the end of the item's last tile (kFlagMerge, its own kernel
//                   instantiation; chains the turns as _xc; bf16, wgmma3 at head dim 64 and wgmma
//                   at 128), e.g. wgmma3_pp_ov_qp_mi_ps; measured equal to _xc (session 19);
//                   "_ks" before "_ps" (wgmma3 only, not with _mi or _kv): an item whose rows all
//                   fall in the first warpgroup's 64 has its key tiles split across the three
//                   warpgroups and merged at the end (kFlagKeySplit, its own instantiation), e.g.
//                   wgmma3_pp_ov_qp_xc_ks_ps;
//                   the wgmma plans are an error on other devices or without sm_90a code;
//   wgmma3...       any of the above with three consumer warpgroups (192-row items, 512 threads,
//                   setmaxnreg 32/160), e.g. wgmma3_pp_ov_ps: head dim 64 and bf16 only (the
//                   lever for issue 8's D=64 shape, bench/NOTES.md "Session 15").
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dispatch.h"
#include "../kernels/paged_prefill_attention.cuh"
#include "../kernels/paged_prefill_wgmma.cuh"
#include "stamps.h"

namespace {

constexpr int kBlockN = 64;

// Both plans' kernels share one signature; they differ in rows per CTA, threads and smem.
template <typename T>
using PrefillKernel = void (*)(void*, int, int64_t, int64_t, const T*, int64_t, int64_t, const T*, const T*,
                               int64_t, oppo::Divisor, oppo::Divisor, const int*, const int*, const int*, int64_t,
                               oppo::Divisor, float, oppo::Divisor, int);

// How the grid covers the (row tile, kv head, sequence) items: 3D, one CTA each (mma); 1D, one
// CTA each (wgmma); 1D persistent, one CTA per SM looping over items (wgmma "_ps").
enum class Grid { three_d, items, persistent };

int sm_count(int dev) {
  static int sms[64] = {};
  if (sms[dev & 63] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms[dev & 63], cudaDevAttrMultiProcessorCount, dev));
  return sms[dev & 63];
}

template <typename T, int D, bool kWgmma, int NC = 2, bool kMerge = false, bool kKeySplit = false,
          bool kTurnStamps = false>   // one instantiation per kernel: attr_set below is its own
void launch_kernel(PrefillKernel<T> kernel, int rows_per_cta, int threads, int smem, int flags, Grid grid_kind,
                   at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, const at::Tensor& block_tables,
                   double scale, int64_t max_seqlen_q) {
  const int B = static_cast<int>(context_lens.size(0)), Hq = static_cast<int>(q.size(1));
  const int block_size = static_cast<int>(k_cache.size(1)), Hkv = static_cast<int>(k_cache.size(2));
  const int G = Hq / Hkv;
  const int64_t m_tiles = (max_seqlen_q * G + rows_per_cta - 1) / rows_per_cta;
  OPPO_CHECK(m_tiles < (1LL << 31), "paged_prefill_attention: max_seqlen_q too large");
  if (m_tiles == 0 || B == 0) return;
  static bool attr_set[64] = {};  // per kernel and device
  const int dev = q.get_device();
  if (!attr_set[dev & 63]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if constexpr (kWgmma) {
      // setmaxnreg moves registers between warpgroups within what the CTA was given at launch: if
      // ptxas gave the kernel fewer (another toolkit, a code change), the consumers' increase would
      // wait forever. Refuse to launch instead of hanging.
      using Cfg = oppo::attn::wgp::Cfg<D, NC>;
      if constexpr (Cfg::kSetMaxNReg) {
        cudaFuncAttributes fa{};
        C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
        const int need = 128 * Cfg::kProducerRegs + (threads - 128) * Cfg::kConsumerRegs;
        OPPO_CHECK(fa.numRegs * threads >= need, "paged_prefill_attention (wgmma, head_dim ", D, "): the kernel ",
                   "was compiled with ", fa.numRegs, " registers per thread; its setmaxnreg split needs ", need,
                   " per CTA (", (need + threads - 1) / threads, " per thread). Use OPPO_PREFILL_PLAN=mma.");
      }
    }
    attr_set[dev & 63] = true;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t items = m_tiles * Hkv * B;
  OPPO_CHECK(grid_kind == Grid::three_d || items < (1LL << 31),
             "paged_prefill_attention: too many (row tile, kv head, sequence) items for a 1D grid");
  dim3 grid(static_cast<unsigned>(m_tiles), Hkv, B);
  if (grid_kind == Grid::items) grid = dim3(static_cast<unsigned>(items));
  if (grid_kind == Grid::persistent) grid = dim3(static_cast<unsigned>(std::min<int64_t>(items, sm_count(dev))));
  kernel<<<grid, threads, smem, stream>>>(
      out.data_ptr(), flags | (out.scalar_type() == at::kFloat ? oppo::attn::kPrefillOutF32 : 0), out.stride(0), out.stride(1),
      reinterpret_cast<const T*>(q.data_ptr()), q.stride(0), q.stride(1),
      reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
      k_cache.stride(0), oppo::Divisor(block_size), oppo::Divisor(Hkv), cu_seqlens_q.data_ptr<int>(),
      context_lens.data_ptr<int>(), block_tables.data_ptr<int>(), block_tables.stride(0), oppo::Divisor(G),
      static_cast<float>(scale) * oppo::attn::kLog2e, oppo::Divisor(static_cast<int>(m_tiles)), static_cast<int>(items));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int kPersistent = 1 << 16;  // host-side plan bits (not kernel flags): persistent CTAs,
constexpr int kThreeWG = 1 << 17;     // three consumer warpgroups (plans wgmma3...)
// The launcher strips these two before the kernel sees its flags: a kernel flag on one of their
// bits would be dropped without a word (session 21's first _ip and _pe, on bits 8 and 9: their A/B
// timed the default plan four times over).
static_assert(((oppo::attn::kPrefillOutF32 | oppo::attn::wgp::kFlagPingPong | oppo::attn::wgp::kFlagOverlap |
                oppo::attn::wgp::kFlagSplitKV | oppo::attn::wgp::kFlagQPrefetch | oppo::attn::wgp::kFlagChain |
                oppo::attn::wgp::kFlagMerge | oppo::attn::wgp::kFlagKeySplit) &
               (kPersistent | kThreeWG)) == 0,
              "a kernel flag shares a bit with the launcher's plan bits");

// Whether prefill_turn_stamps is on (the launcher then takes the wgmma3 kernel that writes them).
std::atomic<bool> g_turn_stamps_on{false};

}  // namespace

// Whether this device runs the extension's sm_90a code (wgmma): an sm_90 card, and 9.0a built.
// Asked once per device (every prefill call with the default plan asks; gate_up_silu too).
bool sm90a_here(const at::Tensor& q) {
  static signed char cached[64] = {};  // 0: not asked yet, 1: yes, -1: no
  signed char& c = cached[q.get_device() & 63];
  if (c == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
    bool yes = major == 9 && minor == 0;
#ifdef OPPO_CUDA_ARCHS
    yes = yes && std::strstr(OPPO_CUDA_ARCHS, "sm_90a") != nullptr;
#endif
    c = yes ? 1 : -1;
  }
  return c > 0;
}

namespace {

// Whether OPPO_PREFILL_WGMMA_OFF (a comma list of plans, or "all": what bench/wgmma_smoke.py found
// failing) switches `plan` off.
bool wgmma_plan_off(const char* plan) {
  const char* e = std::getenv("OPPO_PREFILL_WGMMA_OFF");
  if (e == nullptr) return false;
  std::string list(e), item;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || list[i] == ',') {
      if (item == plan || item == "all") return true;
      item.clear();
    } else if (list[i] != ' ') {
      item += list[i];
    }
  }
  return false;
}

// -1: the mma plan; else the wgmma kernel's flags (ping-pong, overlap, split K/V rings) | kPersistent.
// OPPO_PREFILL_PLAN unset (or "auto"), on an sm_90a device, unless OPPO_PREFILL_WGMMA_OFF names the
// plan (bench/RESULTS.md):
//   head dim 128: wgmma_pp_ov_qp_xc_ps; without the chained turns (wgmma_pp_ov_qp_ps) 1.29-1.36x
//     FlexAttention on issue 8's D=128 shapes (0.64-0.73 of the bf16 matmul rate; session 17, H100);
//   head dim 64, bf16: wgmma3_pp_ov_qp_xc_ps; without the chained turns 1.13x FlexAttention on
//     issue 8's D=64 shape (0.47 of the matmul rate), where the two-warpgroup plan and Triton are
//     0.91x and 0.93x (session 17); the chained turns (_xc) are session 18's, measured beside them;
// mma otherwise (fp16 at D=64: the Python side picks Triton there, as fast as two warpgroups).
int prefill_plan(const at::Tensor& q) {
  const char* e = std::getenv("OPPO_PREFILL_PLAN");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) {
    using namespace oppo::attn::wgp;
    if (q.size(2) == 128 && !wgmma_plan_off("wgmma_pp_ov_qp_xc_ps") && sm90a_here(q))
      return kFlagPingPong | kFlagOverlap | kFlagQPrefetch | kFlagChain | kPersistent;
    if (q.size(2) == 64 && q.scalar_type() == at::kBFloat16 && !wgmma_plan_off("wgmma3_pp_ov_qp_xc_ps") &&
        sm90a_here(q))
      return kFlagPingPong | kFlagOverlap | kFlagQPrefetch | kFlagChain | kPersistent | kThreeWG;
    return -1;
  }
  if (std::strcmp(e, "mma") == 0) return -1;
  std::string name(e);
  int flags = 0;
  if (name.compare(0, 6, "wgmma3") == 0) {
    flags |= kThreeWG;
    name.erase(5, 1);  // wgmma3_pp_ov -> wgmma_pp_ov
  }
  // the optional suffixes, taken off from the end in this order (the grammar's order reversed)
  {
    using namespace oppo::attn::wgp;
    constexpr std::pair<const char*, int> kSuffixes[] = {
        {"_ps", kPersistent}, {"_ks", kFlagKeySplit}, {"_mi", kFlagMerge},
        {"_xc", kFlagChain},  {"_qp", kFlagQPrefetch}, {"_kv", kFlagSplitKV}};
    for (const auto& [suffix, flag] : kSuffixes) {
      if (name.size() > 3 && name.compare(name.size() - 3, 3, suffix) == 0) {
        flags |= flag;
        name.resize(name.size() - 3);
      }
    }
  }
  if (name == "wgmma_pp") flags |= oppo::attn::wgp::kFlagPingPong;
  else if (name == "wgmma_ov") flags |= oppo::attn::wgp::kFlagOverlap;
  else if (name == "wgmma_pp_ov") flags |= oppo::attn::wgp::kFlagPingPong | oppo::attn::wgp::kFlagOverlap;
  else OPPO_CHECK(name == "wgmma", "OPPO_PREFILL_PLAN must be auto, mma or wgmma[3][_pp][_ov][_kv][_qp][_xc][_mi][_ks][_ps] (e.g. wgmma_pp_ov_kv_ps), got '",
                  e, "'");
  OPPO_CHECK(!(flags & oppo::attn::wgp::kFlagChain) || (flags & oppo::attn::wgp::kFlagPingPong), "OPPO_PREFILL_PLAN=", e,
             ": _xc chains the ping-pong turns across items, so it needs _pp");
  OPPO_CHECK(!(flags & oppo::attn::wgp::kFlagMerge) || (q.scalar_type() == at::kBFloat16 &&
             ((q.size(2) == 64 && (flags & kThreeWG)) || (q.size(2) == 128 && !(flags & kThreeWG)))),
             "OPPO_PREFILL_PLAN=", e, ": the _mi plans are built for wgmma3 at head dim 64 and wgmma at head dim 128, ",
             "in bf16 only; got head dim ", q.size(2), " and ", q.scalar_type());
  OPPO_CHECK(!(flags & oppo::attn::wgp::kFlagKeySplit) ||
             ((flags & kThreeWG) && q.size(2) == 64 && q.scalar_type() == at::kBFloat16 &&
              !(flags & (oppo::attn::wgp::kFlagMerge | oppo::attn::wgp::kFlagSplitKV))),
             "OPPO_PREFILL_PLAN=", e, ": the _ks plans are built for wgmma3 at head dim 64 in bf16, without _mi and _kv; ",
             "got head dim ", q.size(2), " and ", q.scalar_type());
  OPPO_CHECK(!(flags & kThreeWG) || (q.size(2) == 64 && q.scalar_type() == at::kBFloat16),
             "OPPO_PREFILL_PLAN=", e, ": the three-warpgroup plans are built for head dim 64 and bf16 only, got head dim ",
             q.size(2), " and ", q.scalar_type());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  OPPO_CHECK(major == 9 && minor == 0, "OPPO_PREFILL_PLAN=wgmma needs an sm_90 device, this is sm_", major, minor);
#ifdef OPPO_CUDA_ARCHS
  OPPO_CHECK(std::strstr(OPPO_CUDA_ARCHS, "sm_90a") != nullptr,
             "OPPO_PREFILL_PLAN=wgmma: the extension was built without sm_90a (TORCH_CUDA_ARCH_LIST has no 9.0a): ",
             OPPO_CUDA_ARCHS);
#endif
  return flags;
}

template <typename T, int D>
void launch(int plan, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, const at::Tensor& block_tables,
            double scale, int64_t max_seqlen_q) {
  using namespace oppo::attn;
  if (plan >= 0) {
    // the wgmma producer divides by block_size once per thread; its in-page row offsets
    // (row * Hkv * D + kv head * D < block_size * Hkv * D) are 32-bit
    OPPO_CHECK(k_cache.size(1) > 0 && k_cache.size(1) * k_cache.size(2) * D <= INT32_MAX,
               "paged_prefill_attention (wgmma): pages of ", k_cache.size(1), " x ", k_cache.size(2), " x ", D,
               " elements (empty, or past 32-bit offsets); use OPPO_PREFILL_PLAN=mma");
    const int flags = plan & ~(kPersistent | kThreeWG);
    const Grid grid = (plan & kPersistent) ? Grid::persistent : Grid::items;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {   // _mi: its own instantiations (prefill_plan checked which)
      if (plan & wgp::kFlagMerge) {
        if constexpr (D == 64) {
          using G3 = wgp::Geo<3>;
          launch_kernel<T, D, true, 3, true>(wgp::paged_prefill_wgmma_kernel<T, D, 3, true>, G3::kBM, G3::kThreads,
                                             wgp::Cfg<D, 3>::kSmem, flags, grid, out, q, k_cache, v_cache, cu_seqlens_q,
                                             context_lens, block_tables, scale, max_seqlen_q);
        } else {
          launch_kernel<T, D, true, 2, true>(wgp::paged_prefill_wgmma_kernel<T, D, 2, true>, wgp::kBM, wgp::kThreads,
                                             wgp::Cfg<D>::kSmem, flags, grid, out, q, k_cache, v_cache, cu_seqlens_q,
                                             context_lens, block_tables, scale, max_seqlen_q);
        }
        return;
      }
    }
    if constexpr (D == 64 && std::is_same_v<T, __nv_bfloat16>) {
      if (plan & wgp::kFlagKeySplit) {   // _ks: its own instantiation (prefill_plan checked the rest)
        using G3 = wgp::Geo<3>;
        launch_kernel<T, D, true, 3, false, true>(wgp::paged_prefill_wgmma_kernel<T, D, 3, false, true>, G3::kBM,
                                                  G3::kThreads, wgp::Cfg<D, 3>::kSmem, flags, grid, out, q, k_cache,
                                                  v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                                  max_seqlen_q);
        return;
      }
      if ((plan & kThreeWG) && g_turn_stamps_on.load()) {   // bench/prefill_turns.py: its own instantiation
        using G3 = wgp::Geo<3>;
        launch_kernel<T, D, true, 3, false, false, true>(wgp::paged_prefill_wgmma_kernel<T, D, 3, false, false, true>,
                                                         G3::kBM, G3::kThreads, wgp::Cfg<D, 3>::kSmem, flags, grid, out,
                                                         q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                         scale, max_seqlen_q);
        return;
      }
      if (plan & kThreeWG) {   // prefill_plan checked head dim and dtype
        using G3 = wgp::Geo<3>;
        launch_kernel<T, D, true, 3>(wgp::paged_prefill_wgmma_kernel<T, D, 3>, G3::kBM, G3::kThreads,
                                     wgp::Cfg<D, 3>::kSmem, flags, grid, out, q, k_cache, v_cache, cu_seqlens_q,
                                     context_lens, block_tables, scale, max_seqlen_q);
        return;
      }
    }
    launch_kernel<T, D, true>(wgp::paged_prefill_wgmma_kernel<T, D>, wgp::kBM, wgp::kThreads, wgp::Cfg<D>::kSmem,
                              flags, grid, out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                              max_seqlen_q);
  } else {
    launch_kernel<T, D, false>(paged_prefill_kernel<T, D, kBlockN>, kPrefillBlockM, kPrefillThreads,
                               PrefillSmem<T, D, kBlockN>::kBytes, 0, Grid::three_d, out, q, k_cache, v_cache,
                               cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q);
  }
}

}  // namespace

// out          [Nq, Hq, D]  q's dtype or float32
// q            [Nq, Hq, D]  bf16/fp16 packed by cu_seqlens_q [B+1] int32, inner dim contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D]  each page contiguous, equal strides; the chunk's
//              K/V are already in the pages (kv_append)
// context_lens [B] int32 (prefix + chunk);  block_tables [B, max_blocks] int32
// max_seqlen_q >= every chunk length (sizes the grid; CTAs past a sequence's chunk exit)
void paged_prefill_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& context_lens, const at::Tensor& block_tables, double scale,
                                  int64_t max_seqlen_q) {
  constexpr const char* op = "paged_prefill_attention";
  OPPO_CHECK_CUDA(out, "paged_prefill_attention"); OPPO_CHECK_CUDA(q, "paged_prefill_attention");
  OPPO_CHECK_CUDA(k_cache, "paged_prefill_attention"); OPPO_CHECK_CUDA(v_cache, "paged_prefill_attention");
  OPPO_CHECK_CUDA(cu_seqlens_q, "paged_prefill_attention"); OPPO_CHECK_CUDA(context_lens, "paged_prefill_attention");
  OPPO_CHECK_CUDA(block_tables, "paged_prefill_attention");
  check_attention_tensors(op, "[Nq, Hq, D]", out, q, k_cache, v_cache);
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2), B = context_lens.size(0);
  OPPO_CHECK(cu_seqlens_q.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
             block_tables.scalar_type() == at::kInt, op, ": cu_seqlens_q, context_lens, block_tables must be int32");
  OPPO_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == B + 1 && cu_seqlens_q.is_contiguous(), op, ": cu_seqlens_q must be [B+1]");
  OPPO_CHECK(context_lens.dim() == 1 && context_lens.is_contiguous(), op, ": context_lens must be [B] contiguous");
  OPPO_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.stride(1) == 1, op, ": block_tables must be [B, max_blocks], rows contiguous");
  OPPO_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == D && k_cache.stride(1) == Hkv * D && v_cache.strides() == k_cache.strides(),
             op, ": each page must be contiguous [block_size, Hkv, D] and K/V caches share strides");
  OPPO_CHECK(q.stride(2) == 1 && out.stride(2) == 1, op, ": q/out inner dim must be contiguous");
  OPPO_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 &&
             k_cache.stride(0) % 8 == 0, op, ": strides must keep rows aligned");
  for (const at::Tensor& t : std::array<at::Tensor, 4>{q, k_cache, v_cache, out})
    OPPO_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": tensors must be 16-byte aligned");
  OPPO_CHECK(B <= 65535 && Hkv <= 65535, op, ": batch or kv heads above 65535");
  OPPO_CHECK(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0");
  if (q.size(0) == 0 || B == 0) return;
  const at::cuda::OptionalCUDAGuard guard(q.device());
  const int wg = prefill_plan(q);
  if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) launch<__nv_bfloat16, 64>(wg, out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q);
    else launch<__nv_bfloat16, 128>(wg, out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q);
  } else {
    if (D == 64) launch<__half, 64>(wg, out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q);
    else launch<__half, 128>(wg, out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_seqlen_q);
  }
}

// Per-item timestamps of the sm_90a wgmma prefill kernel (bench/prefill_stamps.py): item w writes
// row w (start ns, end ns as consumer warpgroup 0 sees them, SM id | key tiles << 32); see
// set_stamps.
void prefill_item_stamps_cuda(at::Tensor& stamps) {
  set_stamps("prefill_item_stamps", oppo::attn::wgp::prefill_stamps, stamps);
}

// Per-turn stamps of the three-warpgroup wgmma kernel (bench/prefill_turns.py; rows as
// kernels/paged_prefill_wgmma.cuh's prefill_turn_stamps says): while on, the wgmma3 plans without
// _mi and _ks run the kernel instantiated with them (the others write none); see set_stamps.
void prefill_turn_stamps_cuda(at::Tensor& stamps) {
  set_stamps("prefill_turn_stamps", oppo::attn::wgp::prefill_turn_stamps, stamps, &g_turn_stamps_on);
}
