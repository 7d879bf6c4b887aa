"""Log-probabilities and entropy of chosen tokens over a large vocabulary.

``token_logprobs`` never materialises the full [N, V] float32 log-softmax at once: it works in
row chunks (the reference of a fused kernel that would read each logit once). Autograd flows.

``linear_token_logprobs`` goes one step further for training: it takes the LM head's input and
weight instead of the logits, and is one autograd op whose forward and backward both work one
row chunk of logits at a time. Composing ``lm_head`` with ``token_logprobs`` under autograd keeps
every chunk's float32 logits alive until backward ([N, V] float32: tens of GB for a micro-batch of
16k tokens over a 152k vocabulary); the fused op keeps only the per-row log-sum-exp (and entropy)
and recomputes each chunk's logits in backward: one more LM-head GEMM for [N, V] less memory.

On CUDA the per-row work over the logits (log-sum-exp, the token's log-prob, the entropy, and in
backward the logits' gradient) is one Triton kernel each way (``logprobs_triton``: one read of the
logits in their own dtype instead of ~6-10 float32 passes); the torch code below is the reference
and what the CPU runs (``OPPO_OP_BACKEND=reference`` forces it on CUDA, for A/B runs). The
kernel path takes larger row chunks (512 MiB of logits in the GEMM's dtype: no float32 copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_logprobs", "entropy_from_logits", "linear_token_logprobs"]

_KERNEL_CHUNK_BYTES = 1 << 29   # kernel path: rows per chunk = this / (V * itemsize) (512 MiB of logits)


def _kernel(op: str, t: torch.Tensor, backend: str | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel on ``t`` (CUDA, half/float32; logged once per op)."""
    from . import logprobs_triton
    from .fused import _choose
    return logprobs_triton.available() and _choose(op, (t,), backend) == "triton"


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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   backend: str | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[i, tokens[i]] in float32 (float64 for float64 logits)."""
    if logits.dim() == 2 and logits.stride(1) == 1 and _kernel("token_logprobs", logits, backend):
        from .logprobs_triton import row_stats
        return row_stats(logits, tokens.to(device=logits.device, dtype=torch.long).contiguous(),
                         temperature, False)[0]
    return _per_row_chunk(logits, temperature, lambda x, s, e: x.gather(-1, tokens[s:e, None].long())[:, 0]
                          - torch.logsumexp(x, dim=-1))


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per row, float32 [N] (float64 for float64 logits)."""
    if logits.dim() == 2 and logits.stride(1) == 1 and _kernel("entropy_from_logits", logits, backend):
        from .logprobs_triton import row_stats
        return row_stats(logits, None, temperature, True)[2]

    def entropy(x, s, e):
        logp = torch.log_softmax(x, dim=-1)
        plogp = logp.exp() * logp
        return -torch.where(logp == float("-inf"), 0.0, plogp).sum(-1)    # 0 log 0 = 0 (a -inf logit)
    return _per_row_chunk(logits, temperature, entropy)


# ----------------------------------------------------------------------------- LM head fused
_LINEAR_CHUNK_ELEMS = 1 << 26   # rows per chunk = this / V (about 256 MiB of float32 logits)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would run its GEMM in here (autocast included)."""
    dev = hidden.device.type
    low = (torch.float16, torch.bfloat16, torch.float32)
    if torch.is_autocast_enabled(dev) and hidden.dtype in low and weight.dtype in low:
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) need the same dtype")
    return hidden.dtype


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, cdtype: torch.dtype,
                  acc: torch.dtype) -> torch.Tensor:
    """(h @ w.T) in cdtype, upcast to acc, / temperature: a fresh tensor the caller may overwrite."""
    z = F.linear(h.to(cdtype), w)
    if z.dtype != acc:
        z = z.to(acc)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _linear_logprobs_forward(hidden, weight, tokens, temperature, with_entropy, rows, cdtype, kernel=False):
    """-> logprobs [N], lse [N], entropy [N] or None (all in acc dtype), one row chunk at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    w = weight.to(cdtype)
    lp = torch.empty(N, dtype=acc, device=hidden.device)
    lse = torch.empty(N, dtype=acc, device=hidden.device)
    ent = torch.empty(N, dtype=acc, device=hidden.device) if with_entropy else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        if kernel:      # the GEMM in cdtype, then one pass over its logits
            from .logprobs_triton import row_stats
            z = F.linear(hidden[s:e].to(cdtype), w)
            row_stats(z, tokens[s:e], temperature, with_entropy,
                      out=(lp[s:e], lse[s:e], ent[s:e] if with_entropy else None))
            del z
            continue
        z = _chunk_logits(hidden[s:e], w, temperature, cdtype, acc)
        m = torch.logsumexp(z, dim=-1)
        lse[s:e] = m
        lp[s:e] = z.gather(-1, tokens[s:e, None])[:, 0] - m
        if with_entropy:
            logp = z.sub_(m[:, None])
            ent[s:e] = -logp.exp().mul_(logp).sum(-1)
        del z
    return lp, lse, ent


class _LinearTokenLogprobs(torch.autograd.Function):
    """(hidden, weight, tokens) -> logprobs [N] (, entropy [N]); saves no logits (see module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, with_entropy, rows, cdtype, kernel):
        with torch.autocast(hidden.device.type, enabled=False):
            lp, lse, ent = _linear_logprobs_forward(hidden, weight, tokens, temperature, with_entropy, rows,
                                                    cdtype, kernel)
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.with_entropy, ctx.rows, ctx.cdtype = temperature, with_entropy, rows, cdtype
        ctx.kernel = kernel
        ctx.save_for_backward(hidden, weight, tokens, lse, ent)
        return (lp, ent) if with_entropy else lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, tokens, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rest = (None,) * 6
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return (None, None) + rest
        T, rows, cdtype, acc = ctx.temperature, ctx.rows, ctx.cdtype, lse.dtype
        N = hidden.shape[0]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if ctx.kernel:              # the kernel divides by T itself
            from .logprobs_triton import grad_logits_
            g_lp = None if g_lp is None else g_lp.to(acc).contiguous()
            g_ent = None if g_ent is None else g_ent.to(acc).contiguous()
        else:
            g_lp = None if g_lp is None else g_lp.to(acc) / T
            g_ent = None if g_ent is None else g_ent.to(acc) / T
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, N, rows):
                e = min(N, s + rows)
                h = hidden[s:e].to(cdtype)
                sl = (tokens[s:e], lse[s:e], None if ent is None else ent[s:e],
                      None if g_lp is None else g_lp[s:e], None if g_ent is None else g_ent[s:e])
                if ctx.kernel:      # one pass, in place over the chunk's logits (in cdtype)
                    gz = grad_logits_(F.linear(h, w), *sl, T)
                else:
                    gz = _chunk_logits_grad(_chunk_logits(h, w, T, cdtype, acc), *sl).to(cdtype)
                if need_h:
                    grad_h[s:e] = gz @ w
                if need_w:
                    _accumulate_gemm(grad_w, gz.t(), h)
                del gz
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype)) + rest


def _chunk_logits_grad(z, tokens, lse, ent, g_lp, g_ent):
    """The reference of ``logprobs_triton.grad_logits_``: d(sum g_lp * logprobs + g_ent * entropy)
    / d(z) for a chunk of scaled logits z (float32, overwritten), with g_lp, g_ent already divided
    by the temperature. d lp / dz = onehot - p;  d H / dz = -p * (logp + H)."""
    logp = z.sub_(lse[:, None])
    if g_ent is not None:       # gz = -p * (g_lp + g_ent * (logp + H)) (+ g_lp at the token)
        p = logp.exp()
        gz = logp.add_(ent[:, None]).mul_(g_ent[:, None])
        if g_lp is not None:
            gz.add_(g_lp[:, None])
        gz.mul_(p).neg_()
    else:                       # gz = -p * g_lp (+ g_lp at the token)
        gz = logp.exp_().mul_(-g_lp[:, None])
    if g_lp is not None:
        gz.scatter_add_(-1, tokens[:, None], g_lp[:, None])
    return gz


def _accumulate_gemm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32/64 and a, b possibly half precision (float32 accumulation)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)   # one GEMM, C in float32
    else:
        acc.add_(a @ b)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          chunk_rows: int | None = None, backend: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``tokens`` (and entropy) under ``softmax(hidden @ weight.T / temperature)``.

    hidden [N, H], weight [V, H] (an LM head's weight, no bias), tokens [N] int. Returns
    (logprobs [N], entropy [N] or None), float32 (float64 for float64 inputs). Equal to::

        z = F.linear(hidden, weight).float() / temperature     # GEMM in the input (or autocast) dtype
        logp = z.log_softmax(-1)
        logprobs, entropy = logp.gather(-1, tokens[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    but one autograd op that holds at most one row chunk of logits (``chunk_rows`` rows; by
    default about 256 MiB of float32: max(1, 2**26 // V)) in forward and in backward: it saves
    hidden, weight, tokens and the per-row log-sum-exp (and entropy) and recomputes the logits in
    backward. Gradients flow to hidden and weight (whichever need them) through both outputs,
    entropy included; weight's gradient is accumulated over chunks in float32. Under autocast the
    GEMMs run in the autocast dtype, as F.linear's would, and the gradients come back in the
    inputs' own dtypes.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tokens.shape != hidden.shape[:1]:
        raise ValueError(f"need tokens [{hidden.shape[0]}], got {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cdtype = _compute_dtype(hidden, weight)
    kernel = cdtype != torch.float64 and _kernel("linear_token_logprobs",
                                                 hidden.new_empty(0, dtype=cdtype), backend)
    V = max(weight.shape[0], 1)
    if chunk_rows is not None:
        rows = int(chunk_rows)
    elif kernel:
        rows = max(1, _KERNEL_CHUNK_BYTES // (V * torch.empty(0, dtype=cdtype).element_size()))
    else:
        rows = max(1, _LINEAR_CHUNK_ELEMS // V)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    tokens = tokens.to(device=hidden.device, dtype=torch.long).contiguous()
    temperature, with_entropy = float(temperature), bool(with_entropy)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = _LinearTokenLogprobs.apply(hidden, weight, tokens, temperature, with_entropy, rows, cdtype, kernel)
        return out if with_entropy else (out, None)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        lp, _, ent = _linear_logprobs_forward(hidden, weight, tokens, temperature, with_entropy, rows, cdtype,
                                              kernel)
    return lp, ent
