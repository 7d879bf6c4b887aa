// CUDA implementations of the ops (launchers in csrc/*.cu: attention, gate_up_silu, linear_ksplit),
// registered by ops.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>

void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale,
                                 const std::optional<at::Tensor>& workspace, int64_t max_partition);
void paged_decode_attention_rope_cuda(at::Tensor& out, const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const at::Tensor& cos_sin, const at::Tensor& positions, const at::Tensor& slots,
                                      const std::optional<at::Tensor>& workspace, int64_t max_partition);
void decode_cta_stamps_cuda(at::Tensor& stamps);
void decode_tile_stamps_cuda(at::Tensor& stamps);
void prefill_item_stamps_cuda(at::Tensor& stamps);
void prefill_turn_stamps_cuda(at::Tensor& stamps);
int64_t paged_decode_workspace_size_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                         const at::Tensor& block_tables, int64_t max_partition);
// Whether this device runs the extension's sm_90a code (paged_prefill_attention.cu).
bool sm90a_here(const at::Tensor& t);
void gate_up_silu_cuda(at::Tensor& act, const at::Tensor& x, const at::Tensor& w);
void linear_ksplit_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w);
void paged_prefill_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& context_lens, const at::Tensor& block_tables, double scale,
                                  int64_t max_seqlen_q);

#define OPPO_REGISTER_CUDA_OPS(m)                                    \
  m.impl("paged_decode_attention", &paged_decode_attention_cuda);          \
  m.impl("paged_decode_attention_rope", &paged_decode_attention_rope_cuda); \
  m.impl("paged_decode_workspace_size", &paged_decode_workspace_size_cuda); \
  m.impl("decode_cta_stamps", &decode_cta_stamps_cuda);                    \
  m.impl("decode_tile_stamps", &decode_tile_stamps_cuda);                  \
  m.impl("paged_prefill_attention", &paged_prefill_attention_cuda);        \
  m.impl("prefill_item_stamps", &prefill_item_stamps_cuda);               \
  m.impl("prefill_turn_stamps", &prefill_turn_stamps_cuda);              \
  m.impl("gate_up_silu", &gate_up_silu_cuda);                              \
  m.impl("linear_ksplit", &linear_ksplit_cuda);
