// CUDA implementations of the attention ops (launchers in csrc/*.cu), registered by ops.cpp.
#pragma once
#include <ATen/ATen.h>

void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale);
void paged_prefill_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& context_lens, const at::Tensor& block_tables, double scale,
                                  int64_t max_seqlen_q);

#define OPPO_REGISTER_CUDA_ATTENTION(m)                                    \
  m.impl("paged_decode_attention", &paged_decode_attention_cuda);          \
  m.impl("paged_prefill_attention", &paged_prefill_attention_cuda);
