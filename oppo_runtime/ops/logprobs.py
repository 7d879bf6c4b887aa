"""Log-probabilities and entropy of chosen tokens over a large vocabulary.

``token_logprobs`` never materialises the full [N, V] float32 log-softmax at once: it works in
row chunks (the reference of a fused kernel that would read each logit once). Autograd flows.
"""
from __future__ import annotations

import torch

__all__ = ["token_logprobs", "entropy_from_logits"]

_CHUNK_ELEMS = 1 << 24   # rows per chunk = this / V (about 64 MiB of float32 per chunk)


def _row_chunks(n: int, v: int):
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _per_row_chunk(logits: torch.Tensor, temperature: float, fn) -> torch.Tensor:
    """fn(scaled logits chunk, start, end) -> [rows], over row chunks, upcast to >= float32."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    outs = []
    for s, e in _row_chunks(N, V):
        x = logits[s:e].to(acc)
        if temperature != 1.0:
            x = x / temperature
        outs.append(fn(x, s, e))
    return torch.cat(outs) if outs else logits.new_zeros(0, dtype=acc)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[i, tokens[i]] in float32 (float64 for float64 logits)."""
    return _per_row_chunk(logits, temperature, lambda x, s, e: x.gather(-1, tokens[s:e, None].long())[:, 0]
                          - torch.logsumexp(x, dim=-1))


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per row, float32 [N] (float64 for float64 logits)."""
    def entropy(x, s, e):
        logp = torch.log_softmax(x, dim=-1)
        return -(logp.exp() * logp).sum(-1)
    return _per_row_chunk(logits, temperature, entropy)
