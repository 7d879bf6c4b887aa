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

__all__ = ["hash_uniform", "process_logits", "sample_tokens", "colmix"]

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # murmur3 finaliser on int64 lanes kept to 32 bits
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


# The column's half of the hash input: rowhash ^ colmix(col), then ONE murmur3 finaliser per entry.
# colmix is injective on [0, 2^32) for col < 2^32: the low 12 bits hold (col & 4095) * _COL_LO mod 2^12
# (a bijection of col & 4095, the multiplier being odd) and the high 20 bits add (col >> 12) * _COL_HI mod
# 2^20, so no two columns of a row share an input (hence a uniform: the finaliser is a bijection). Split at
# 4096 so that a kernel sweeping 4096-column blocks hoists the finaliser's first xor-shift out of its
# loop: x ^ (x >> 16) is linear over xor, so it is (R ^ R >> 16) ^ (L ^ L >> 16) with R per block
# (rowhash ^ hi(col)) and L per lane (lo(col)), one xor per entry (see sampling_triton).
_COL_LO = 0x9E3779B1
_COL_HI = 0x7FEB352D
COL_SPLIT = 12


def colmix(col: torch.Tensor) -> torch.Tensor:
    """The 32-bit column term of the noise hash (int64 lanes holding uint32 values)."""
    hi = ((col >> COL_SPLIT) * _COL_HI << COL_SPLIT) & _M32
    return hi ^ (((col & ((1 << COL_SPLIT) - 1)) * _COL_LO) & _M32)


def hash_uniform(seed: int, seq_keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [B, vocab], a pure function of (seed, key, position, column).

    Per row a hash of (seed, key, position); per entry one murmur3 finaliser of rowhash ^ colmix(col),
    whose top 23 bits k give u = (2k + 1) / 2^24 exactly: u lies in [2^-24, 1 - 2^-24], never 0 or 1
    (the previous stream rounded (h + 0.5) / 2^32 to float32, which gave u == 1.0, so a Gumbel noise of
    +inf, for h >= 2^32 - 128: about one row in 220 at V = 151936 then drew a uniformly random token).
    """
    dev = seq_keys.device
    row = _mix32(_mix32(seq_keys.to(torch.int64) * 0x9E3779B1 + seed) ^ (positions.to(torch.int64) * 0x7FEB352D))
    col = torch.arange(vocab, device=dev, dtype=torch.int64)
    k = _mix32(row[:, None] ^ colmix(col)[None, :]) >> 9
    return (2 * k + 1).to(torch.float32) * (1.0 / 16777216.0)


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
