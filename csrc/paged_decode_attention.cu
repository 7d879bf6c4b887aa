// Launcher of paged decode attention: argument checks, the split-KV plan, dtype/head-dim
// dispatch, launches on the current stream.
//
// Workspace (num_splits > 1): taken from PyTorch's caching allocator (at::empty). That is
// graph-safe: under CUDA-graph capture the allocation comes from the graph's private pool at a
// fixed address, and nothing here syncs with the host. The split plan depends only on shapes
// (B, Hkv, G, block_tables' width x block_size, the SM count and the kernel's occupancy), never
// on context_lens' values.
//
// OPPO_DECODE_PLAN=v2 selects the previous plan (about 8 CTAs per SM) on the same kernels, for
// A/B timing; read at every call (the bench switches it between captures). Default: v3.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dispatch.h"
#include "../kernels/paged_decode_attention.cuh"

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

bool use_plan_v2() {
  const char* e = std::getenv("OPPO_DECODE_PLAN");
  if (e == nullptr || *e == 0 || std::strcmp(e, "v3") == 0) return false;
  TORCH_CHECK(std::strcmp(e, "v2") == 0, "OPPO_DECODE_PLAN must be v2 or v3, got '", e, "'");
  return true;
}

struct DecodePlan {
  int num_splits;
  int partition;  // tokens per split (a multiple of the tile); 1 << 30 with one split
};

// base = CTAs per split (B * Hkv * q_chunks); resident = CTAs of the kernel per SM.
//   v2: about 8 CTAs per SM in all.
//   v3: at most one wave of resident CTAs: splits = floor(SMs * resident / base), so no split at
//       all once B * Hkv * q_chunks fills half the machine (each CTA then writes `out` itself).
// Both: partitions of at least kMinPartition tokens, rounded up to the 64-token tile.
DecodePlan plan_decode(int64_t base, int64_t max_ctx, int sms, int resident, bool v2) {
  using oppo::attn::kDecodeTile;
  int64_t splits = 1;
  if (v2) {
    const int64_t target = 8LL * sms;
    if (base < target) splits = (target + base - 1) / base;
  } else {
    const int64_t slots = static_cast<int64_t>(sms) * std::max(1, resident);
    if (base < slots) splits = slots / base;
  }
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (max_ctx + kMinPartition - 1) / kMinPartition));
  if (splits > 1) {
    int64_t part = (max_ctx + splits - 1) / splits;
    part = (part + kDecodeTile - 1) / kDecodeTile * kDecodeTile;
    splits = (max_ctx + part - 1) / part;
    if (splits > 1) return {static_cast<int>(splits), static_cast<int>(part)};
  }
  return {1, 1 << 30};
}

template <typename T, int D>
void launch_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  using namespace oppo::attn;
  constexpr int kStages = DecodeCfg<D>::kStages;
  const int B = static_cast<int>(q.size(0)), Hq = static_cast<int>(q.size(1));
  const int block_size = static_cast<int>(k_cache.size(1)), Hkv = static_cast<int>(k_cache.size(2));
  const int G = Hq / Hkv;
  const int q_chunks = (G + 15) / 16;
  const int64_t max_ctx = std::min<int64_t>(block_tables.size(1) * static_cast<int64_t>(block_size), INT_MAX);
  const int dev = q.get_device();
  const int sms = sm_count(dev);

  auto kernel = paged_decode_kernel<T, D, kStages>;
  constexpr int smem = DecodeSmem<T, D, kStages>::kBytes;
  static int resident[64] = {};  // CTAs per SM (0: not yet set up on that device)
  if (resident[dev & 63] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    // All of the unified L1/smem as smem (D=64: 3 x 75 KiB): the kernel reads through cp.async.cg.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        static_cast<int>(cudaSharedmemCarveoutMaxShared)));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kDecodeThreads, smem));
    resident[dev & 63] = std::max(1, n);
  }

  const DecodePlan plan =
      plan_decode(static_cast<int64_t>(B) * Hkv * q_chunks, max_ctx, sms, resident[dev & 63], use_plan_v2());
  const int num_splits = plan.num_splits;

  at::Tensor ws;
  float* ws_o_ptr = nullptr;
  float* ws_lse_ptr = nullptr;
  if (num_splits > 1) {  // one allocation: o [B, Hq, S, D] then lse [B, Hq, S]
    const int64_t n = static_cast<int64_t>(B) * Hq * num_splits;
    ws = at::empty({n * (D + 1)}, q.options().dtype(at::kFloat));
    ws_o_ptr = ws.data_ptr<float>();
    ws_lse_ptr = ws_o_ptr + n * D;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const float scale_log2 = static_cast<float>(scale) * kLog2e;

  const dim3 grid(num_splits, Hkv * q_chunks, B);
  kernel<<<grid, kDecodeThreads, smem, stream>>>(
      out.data_ptr(), out_f32, out.stride(0), out.stride(1), reinterpret_cast<const T*>(q.data_ptr()), q.stride(0),
      q.stride(1), reinterpret_cast<const T*>(k_cache.data_ptr()), reinterpret_cast<const T*>(v_cache.data_ptr()),
      k_cache.stride(0), block_size, Hkv, block_tables.data_ptr<int>(), block_tables.stride(0),
      static_cast<int>(max_ctx), context_lens.data_ptr<int>(), ws_o_ptr, ws_lse_ptr, G, num_splits, plan.partition,
      scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1) {
    paged_decode_reduce_kernel<T, D><<<dim3(Hq, B), kDecodeReduceThreads, 0, stream>>>(
        out.data_ptr(), out_f32, out.stride(0), out.stride(1), ws_o_ptr, ws_lse_ptr, context_lens.data_ptr<int>(),
        Hq, num_splits, plan.partition);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// out          [B, Hq, D]  q's dtype or float32 (the tests use float32 to see the kernel's own error)
// q            [B, Hq, D]  bf16/fp16, inner dim contiguous
// k/v_cache    [num_blocks, block_size, Hkv, D]  each page contiguous, equal strides
// block_tables [B, max_blocks] int32;  context_lens [B] int32
void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale) {
  constexpr const char* op = "paged_decode_attention";
  OPPO_CHECK_CUDA(out, "paged_decode_attention"); OPPO_CHECK_CUDA(q, "paged_decode_attention");
  OPPO_CHECK_CUDA(k_cache, "paged_decode_attention"); OPPO_CHECK_CUDA(v_cache, "paged_decode_attention");
  OPPO_CHECK_CUDA(block_tables, "paged_decode_attention"); OPPO_CHECK_CUDA(context_lens, "paged_decode_attention");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op, ": bad ranks/shapes");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, op, ": q [B, Hq, D] must match the cache's D, Hq % Hkv == 0");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op, ": q must be bf16 or fp16, got ", q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op, ": q and caches must share a dtype");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat, op, ": out must be q's dtype or float32");
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, op, ": block_tables/context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.stride(1) == 1, op, ": block_tables must be [B, max_blocks], rows contiguous");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && context_lens.is_contiguous(), op, ": context_lens must be [B] contiguous");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == D && k_cache.stride(1) == Hkv * D && v_cache.strides() == k_cache.strides(),
              op, ": each page must be contiguous [block_size, Hkv, D] and K/V caches share strides");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, op, ": q/out inner dim must be contiguous");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && out.stride(0) % 4 == 0 && out.stride(1) % 4 == 0 &&
              k_cache.stride(0) % 8 == 0, op, ": strides must keep rows 16-byte aligned");
  for (const at::Tensor& t : std::array<at::Tensor, 4>{q, k_cache, v_cache, out})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": tensors must be 16-byte aligned");
  TORCH_CHECK(B <= 65535, op, ": batch above 65535");
  if (B == 0 || Hq == 0) return;
  const at::cuda::OptionalCUDAGuard guard(q.device());
  if (q.scalar_type() == at::kBFloat16) {
    if (D == 64) launch_decode<__nv_bfloat16, 64>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
    else launch_decode<__nv_bfloat16, 128>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
  } else {
    if (D == 64) launch_decode<__half, 64>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
    else launch_decode<__half, 128>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
  }
}
