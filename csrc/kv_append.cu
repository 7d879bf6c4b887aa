// Launcher of kv_append: checks arguments, picks the vector path, launches on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dispatch.h"
#include "../kernels/kv_append.cuh"

// key, value       [num_tokens, num_kv_heads, head_dim]  (rows may be strided, each row contiguous)
// k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]  (each page contiguous)
// slot_mapping     [num_tokens]  int32 or int64, -1 = skip
void kv_append_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "kv_append";
  OPPO_CHECK_CUDA(key, "kv_append"); OPPO_CHECK_CUDA(value, "kv_append");
  OPPO_CHECK_CUDA(k_cache, "kv_append"); OPPO_CHECK_CUDA(v_cache, "kv_append");
  OPPO_CHECK_CUDA(slot_mapping, "kv_append");
  OPPO_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), op, ": key/value must be [N, Hkv, D] of equal shape");
  OPPO_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op, ": caches must be [blocks, block_size, Hkv, D]");
  OPPO_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), op, ": key rows do not match the cache geometry");
  OPPO_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
             v_cache.scalar_type() == k_cache.scalar_type(), op, ": key, value and caches must share a dtype");
  OPPO_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), op, ": slot_mapping must be [N]");
  OPPO_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int32 or int64");
  OPPO_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 && value.stride(1) == value.size(2),
             op, ": each key/value row must be contiguous");
  OPPO_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) && k_cache.stride(1) == k_cache.size(2) * k_cache.size(3) &&
             v_cache.strides() == k_cache.strides(), op, ": each page must be contiguous and K/V caches share strides");
  const int64_t n = key.size(0);
  if (n == 0) return;
  const at::cuda::OptionalCUDAGuard guard(key.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int row_elems = static_cast<int>(key.size(1) * key.size(2));
  const int block_size = static_cast<int>(k_cache.size(1));
  OPPO_DISPATCH_FLOAT(key.scalar_type(), "kv_append", [&] {
    const int vec = oppo::Vec16<scalar_t>::N;
    const bool aligned = row_elems % vec == 0 && key.stride(0) % vec == 0 && value.stride(0) % vec == 0 &&
                         k_cache.stride(0) % vec == 0 &&
                         reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0;
    const int threads = std::min(256, std::max(32, aligned ? row_elems / vec : row_elems));
    auto launch = [&](auto idx_tag, auto vec_tag) {
      using IdxT = decltype(idx_tag);
      oppo::kv_append_kernel<scalar_t, IdxT, decltype(vec_tag)::value><<<n, threads, 0, stream>>>(
          reinterpret_cast<const scalar_t*>(key.data_ptr()), reinterpret_cast<const scalar_t*>(value.data_ptr()),
          reinterpret_cast<scalar_t*>(k_cache.data_ptr()), reinterpret_cast<scalar_t*>(v_cache.data_ptr()),
          slot_mapping.data_ptr<IdxT>(), key.stride(0), value.stride(0), k_cache.stride(0), block_size, row_elems);
    };
    if (slot_mapping.scalar_type() == at::kInt) {
      aligned ? launch(int32_t{}, std::true_type{}) : launch(int32_t{}, std::false_type{});
    } else {
      aligned ? launch(int64_t{}, std::true_type{}) : launch(int64_t{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
