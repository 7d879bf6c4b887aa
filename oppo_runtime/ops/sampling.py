"""Token sampling whose randomness depends only on (seed, sequence, position), never on the batch.

Sampling uses the Gumbel-max trick with counter-based noise: the uniform for vocabulary entry v of
the token at position p of sequence s is a hash of (seed, s, p, v). The sampled token therefore
does not depend on which other sequences share the batch, on preemption and recompute, or on
whether the scorers overlap with decoding: the same seed gives the same tokens in every schedule.

The behaviour log-prob returned with each token is the log-probability of that token under the
distribution actually sampled from: logits / temperature, restricted to top-k and top-p (nucleus),
renormalised. Greedy (temperature 0) returns the argmax and the log-prob of the unmodified softmax.
"""
from __future__ import annotations

import torch

from ._backend import record_backend

__all__ = ["hash_uniform", "process_logits", "sample_tokens"]

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # murmur3 finaliser on int64 lanes kept to 32 bits
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, seq_keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [B, vocab], a pure function of (seed, key, position, column)."""
    dev = seq_keys.device
    row = _mix32(_mix32(seq_keys.to(torch.int64) * 0x9E3779B1 + seed) ^ (positions.to(torch.int64) * 0x7FEB352D))
    col = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = _mix32(row[:, None] ^ _mix32(col + 0x632BE5AB)[None, :])
    x = _mix32(x + (row[:, None] >> 7))
    return (x.to(torch.float32) + 0.5) * (1.0 / 4294967296.0)


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs [B, V] (float32) of the distribution sampled from; excluded entries are -inf.

    temperature [B] (0 = greedy: rows are returned as plain log_softmax), top_k [B] (0 = off),
    top_p [B] (1.0 = off); None for either: off in every row.
    """
    x = logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    x = x / t[:, None]
    V = x.shape[-1]
    if top_k is None:           # None: off for every row (the graph-captured sampler passes none)
        top_k = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if top_p is None:
        top_p = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    if bool(((top_k > 0) & (top_k < V)).any()) or bool((top_p < 1.0).any()):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        ranks = torch.arange(V, device=x.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).to(x.device)
        drop = ranks >= k[:, None]
        probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop |= mass_before >= top_p.to(x.device).float()[:, None]
        drop[:, 0] = False
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    return torch.log_softmax(x, dim=-1)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seed: int, seq_keys: torch.Tensor, positions: torch.Tensor,
                  needs_filter: bool | None = None, backend: str | None = None):
    """Sample one token per row: (tokens [B] int64, behaviour log-probs [B] float32, bad [B] bool).

    ``bad`` marks rows whose logits hold NaN or +inf (their token is meaningless: the caller ends
    those requests). ``needs_filter`` (top-k/top-p active in some row) lets the caller skip a host
    sync; rows without filtering on CUDA take the fused Triton kernel (one pass over the logits).
    """
    if needs_filter is None:
        V = logits.shape[-1]
        needs_filter = (top_k is not None and bool(((top_k > 0) & (top_k < V)).any())) or \
            (top_p is not None and bool((top_p < 1.0).any()))
    if logits.is_cuda and not needs_filter and backend != "reference":
        from . import sampling_triton
        if sampling_triton.available():
            record_backend("sample_tokens", "triton")
            return sampling_triton.gumbel_sample(logits, temperature, seed, seq_keys, positions)
    record_backend("sample_tokens", "reference")
    bad = (torch.isnan(logits) | (logits == float("inf"))).any(-1)
    logits = logits.masked_fill(bad[:, None], 0.0)
    logp = process_logits(logits, temperature, top_k, top_p)
    greedy = temperature <= 0
    g = -torch.log(-torch.log(hash_uniform(seed, seq_keys, positions, logits.shape[-1])))
    sampled = torch.argmax(logp + g, dim=-1)
    tokens = torch.where(greedy.to(logits.device), torch.argmax(logits, dim=-1), sampled)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0], bad
