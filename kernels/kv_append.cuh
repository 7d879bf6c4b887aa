// KV append: scatter new K/V rows into the pages of a paged cache.
#pragma once
#include "common.cuh"

namespace oppo {

// key, value:   [num_tokens, num_kv_heads, head_dim]   row stride key_stride / value_stride
// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], page stride block_stride
// slot_mapping: [num_tokens]  slot = block * block_size + offset; -1 = skip
// One block per token; each thread moves 16-byte vectors (row_elems % vec == 0 is checked by
// the launcher, else the scalar path runs).
template <typename T, typename IdxT, bool kVec>
__global__ void kv_append_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                 T* __restrict__ k_cache, T* __restrict__ v_cache,
                                 const IdxT* __restrict__ slot_mapping,
                                 int64_t key_stride, int64_t value_stride, int64_t block_stride,
                                 int block_size, int row_elems) {
  const int64_t token = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slot_mapping[token]);
  if (slot < 0) return;
  const int64_t block = slot / block_size;
  const int64_t offset = slot % block_size;
  T* kdst = k_cache + block * block_stride + offset * row_elems;
  T* vdst = v_cache + block * block_stride + offset * row_elems;
  const T* ksrc = key + token * key_stride;
  const T* vsrc = value + token * value_stride;
  if constexpr (kVec) {
    constexpr int N = Vec16<T>::N;
    const int nvec = row_elems / N;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      reinterpret_cast<uint4*>(kdst)[i] = reinterpret_cast<const uint4*>(ksrc)[i];
      reinterpret_cast<uint4*>(vdst)[i] = reinterpret_cast<const uint4*>(vsrc)[i];
    }
  } else {
    for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
      kdst[i] = ksrc[i];
      vdst[i] = vsrc[i];
    }
  }
}

}  // namespace oppo
