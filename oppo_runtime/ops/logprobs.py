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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[i, tokens[i]] in float32 (float64 for float64 logits)."""
    N, V = logits.shape
    outs = []
    for s, e in _row_chunks(N, V):
        x = logits[s:e].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        if temperature != 1.0:
            x = x / temperature
        outs.append(x.gather(-1, tokens[s:e, None].long())[:, 0] - torch.logsumexp(x, dim=-1))
    return torch.cat(outs) if outs else logits.new_zeros(0, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per row, float32 [N]."""
    N, V = logits.shape
    outs = []
    for s, e in _row_chunks(N, V):
        x = logits[s:e].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        if temperature != 1.0:
            x = x / temperature
        logp = torch.log_softmax(x, dim=-1)
        outs.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(outs) if outs else logits.new_zeros(0, dtype=torch.float32)
