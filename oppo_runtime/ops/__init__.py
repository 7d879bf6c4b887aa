"""Python face of every kernel: the CUDA op, its pure-torch reference, and dispatch."""
from ._backend import backends, extension, extension_error, has_cuda_kernels, MissingKernelError
from .attention import (kv_append, kv_append_ref, paged_decode_attention, paged_decode_attention_ref,
                        paged_decode_workspace,
                        paged_prefill_attention, paged_prefill_attention_ref, varlen_causal_attention,
                        gather_paged_kv, attention_kernels_support)
from .logprobs import token_logprobs, entropy_from_logits
from .norm_rope import rms_norm, rotary_cos_sin, apply_rotary
from .fused import fused_add_rms_norm, rotary_cos_sin_cache, rotary_qk, silu_mul
from .sampling import sample_tokens, process_logits, hash_uniform

__all__ = [
    "backends", "extension", "extension_error", "has_cuda_kernels", "MissingKernelError",
    "kv_append", "kv_append_ref", "paged_decode_attention", "paged_decode_attention_ref",
    "paged_decode_workspace", "paged_prefill_attention", "paged_prefill_attention_ref", "varlen_causal_attention",
    "gather_paged_kv", "attention_kernels_support", "token_logprobs", "entropy_from_logits", "rms_norm", "rotary_cos_sin",
    "apply_rotary", "sample_tokens", "process_logits", "hash_uniform",
    "fused_add_rms_norm", "rotary_cos_sin_cache", "rotary_qk", "silu_mul",
]
