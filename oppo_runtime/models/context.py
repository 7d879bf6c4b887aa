"""What a model's attention layers need to know about the batch they run on.

Two modes, one forward:
  * ``DenseContext`` -- packed sequences (no padding), causal within each; no KV cache. Training
    (autograd) and plain scoring.
  * ``PagedContext`` -- the engine's mode: the new tokens' K/V are appended to the model's pages of
    the shared pool (``slot_mapping``), then attention runs over the pages: one query per sequence
    (``is_decode``) or a chunk of queries per sequence over its cached prefix (chunked prefill).

Tokens are always packed: ``input_ids [N]``, ``positions [N]``; sequence b owns rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DenseContext", "PagedContext"]


@dataclass
class DenseContext:
    cu_seqlens: torch.Tensor            # [B+1] int32/int64, on the model's device
    max_seqlen: int | None = None


@dataclass
class PagedContext:
    kv_caches: list                     # per layer: (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor          # [N] where each new token's K/V go (-1 = skip)
    block_tables: torch.Tensor          # [B, max_blocks] int32
    context_lens: torch.Tensor          # [B] int32: cached prefix + this step's tokens
    cu_seqlens_q: torch.Tensor          # [B+1] int32
    max_seqlen_q: int
    is_decode: bool                     # every sequence has exactly one new token
    decode_workspace: torch.Tensor | None = None  # split-KV scratch of the decode kernel (a captured
                                                  # graph's own; None: the kernel allocates one)
    decode_max_partition: int = 0       # the decode kernel's cap on tokens per split (EngineConfig)
