"""Runs one model over its pages of the shared pool: chunked prefill and decode steps.

Work that depends only on the batch's shape is prepared on the host (token ids, positions, slot
mapping, block tables, context lengths), staged through pinned memory and copied without
blocking; the forward then does device work only. Decode steps can be captured in CUDA graphs
for a ladder of batch sizes (needs the CUDA attention kernels: the reference ops sync).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..memory import KVView
from ..models.context import PagedContext
from ..ops import attention_kernels_support

__all__ = ["Span", "ModelRunner"]

log = logging.getLogger("oppo_runtime.engine")


@dataclass
class Span:
    """Tokens ``token_ids`` of sequence ``key`` at positions ``start .. start+len-1``."""
    key: object
    token_ids: list[int]
    start: int


class _Staging:
    """Host->device copies through pinned memory (non-blocking on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"

    def __call__(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def many(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Several int lists in one pinned buffer and one copy; int64 views on the device."""
        # numpy builds the buffer ~5x faster than torch.tensor on a list (host time per step)
        n = sum(len(p) for p in parts)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=n))
        dev = flat.pin_memory().to(self.device, non_blocking=True) if self.pin else flat.to(self.device)
        out, o = [], 0
        for p in parts:
            out.append(dev[o:o + len(p)])
            o += len(p)
        return out


class ModelRunner:
    def __init__(self, model, view: KVView, max_model_len: int, enforce_eager: bool = True,
                 graph_batch_sizes: tuple[int, ...] = ()):
        self.model, self.view = model, view
        self.device = next(model.parameters()).device
        if self.device.type == "cuda" and hasattr(model, "fuse_projections"):
            # one QKV and one gate_up GEMM; the named parameters become views of the fused weights,
            # so a training model's optimizer steps reach the engine without a copy
            model.fuse_projections()
        self.max_model_len = max_model_len
        self.max_blocks = view.pages_for_tokens(max_model_len)
        self.stage = _Staging(self.device)
        self.graphs: dict[int, tuple] = {}
        self._graph_generation = view.pool.generation
        g = view.geometry
        kernels = attention_kernels_support(g.dtype, g.head_dim)
        self.use_graphs = not enforce_eager and self.device.type == "cuda" and kernels and bool(graph_batch_sizes)
        if not enforce_eager and self.device.type == "cuda" and not kernels:
            # the reference attention syncs with the host: it cannot be captured
            log.warning("CUDA graphs off for %s: no CUDA attention kernel for %s, head_dim %d",
                        view.name, g.dtype, g.head_dim)
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes))

    # ------------------------------------------------------------------ batch metadata
    def _context(self, spans: list[Span], pages_of, ids_from=None) -> tuple[torch.Tensor, torch.Tensor, PagedContext]:
        ids, pos, slots, tables, ctx_lens, cu = [], [], [], [], [], [0]
        T = self.view.tokens_per_page
        width = 1
        max_q = 0
        for sp in spans:
            pages = pages_of(sp.key)
            start = sp.start
            n = len(sp.token_ids)
            end = start + n
            if end > len(pages) * T:
                raise RuntimeError(f"{self.view.name}: sequence {sp.key} has {len(pages)} pages for {end} tokens")
            ids += sp.token_ids
            if n == 1:                                  # decode: the common case, kept cheap
                pos.append(start)
                slots.append(pages[start // T] * T + start % T)
            else:
                pos += range(start, end)
                slots += [pages[p // T] * T + p % T for p in range(start, end)]
            used = -(-end // T)
            tables.append(pages[:used])
            if used > width:
                width = used
            if n > max_q:
                max_q = n
            ctx_lens.append(end)
            cu.append(cu[-1] + n)
        flat_tables: list[int] = []
        for t in tables:
            flat_tables += t
            flat_tables += [0] * (width - len(t))
        is_decode = cu[-1] == len(spans)
        if ids_from is None:
            d_ids, d_pos, d_slots, d_tables, d_ctx, d_cu = self.stage.many([ids, pos, slots, flat_tables, ctx_lens, cu])
        else:
            # some input tokens live only on the device (sampled by the step still in flight):
            # rows ``dst`` take ``src_tokens[src]``
            dst, src, src_tokens = ids_from
            d_ids, d_pos, d_slots, d_tables, d_ctx, d_cu, d_dst, d_src = self.stage.many(
                [ids, pos, slots, flat_tables, ctx_lens, cu, dst, src])
            if dst == src and len(dst) == len(ids):          # same rows, same order
                d_ids = src_tokens[:len(ids)].to(torch.int64)
            elif dst:
                d_ids = d_ids.index_copy(0, d_dst, src_tokens.index_select(0, d_src).to(torch.int64))
        ctx = PagedContext(
            kv_caches=self.view.kv_caches,
            slot_mapping=d_slots,
            block_tables=d_tables.view(len(spans), width).to(torch.int32),
            context_lens=d_ctx.to(torch.int32),
            cu_seqlens_q=d_cu.to(torch.int32),
            max_seqlen_q=max_q,
            is_decode=is_decode,
        )
        return d_ids, d_pos, ctx

    @torch.inference_mode()
    def forward(self, spans: list[Span], pages_of, last_only: bool = True, ids_from=None) -> torch.Tensor:
        """Hidden states of the last token of each span [B, H] (or of every token [N, H]).

        ``ids_from=(dst_rows, src_rows, tokens)``: decode rows ``dst_rows`` take their input token
        from the device tensor ``tokens[src_rows]`` instead of the span (whose id is a placeholder)."""
        if not spans:
            raise ValueError("forward: empty batch")
        input_ids, positions, ctx = self._context(spans, pages_of, ids_from)
        if ctx.is_decode and self.use_graphs and len(spans) <= self.graph_batch_sizes[-1]:
            if self._graph_generation != self.view.pool.generation:
                self.reset_graphs()              # the pool's memory moved: captured pointers are stale
            return self._graph_decode(input_ids, positions, ctx)
        hidden = self.model(input_ids, positions, ctx)
        if last_only and not ctx.is_decode:
            hidden = hidden[ctx.cu_seqlens_q[1:].long() - 1]
        return hidden

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def _graph_decode(self, input_ids, positions, ctx: PagedContext) -> torch.Tensor:
        B = input_ids.shape[0]
        bs = next(s for s in self.graph_batch_sizes if s >= B)
        if bs not in self.graphs:
            self._capture(bs)
        graph, st = self.graphs[bs]
        width = ctx.block_tables.shape[1]
        st["input_ids"][:B].copy_(input_ids)
        st["positions"][:B].copy_(positions)
        st["slot_mapping"].fill_(-1)
        st["slot_mapping"][:B].copy_(ctx.slot_mapping)
        st["context_lens"].fill_(1)
        st["context_lens"][:B].copy_(ctx.context_lens)
        st["block_tables"][:B, :width].copy_(ctx.block_tables)
        graph.replay()
        return st["hidden"][:B]

    def _capture(self, bs: int) -> None:
        dev = self.device
        st = {
            "input_ids": torch.zeros(bs, dtype=torch.int64, device=dev),
            "positions": torch.zeros(bs, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((bs,), -1, dtype=torch.int64, device=dev),
            "context_lens": torch.ones(bs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(bs, self.max_blocks, dtype=torch.int32, device=dev),
        }
        ctx = PagedContext(self.view.kv_caches, st["slot_mapping"], st["block_tables"], st["context_lens"],
                           torch.arange(bs + 1, dtype=torch.int32, device=dev), 1, True)
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(2):                       # warm-up outside the graph
                self.model(st["input_ids"], st["positions"], ctx)
        torch.cuda.current_stream(dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the scorer thread keeps launching on its own stream while we capture
        with torch.cuda.graph(graph, pool=getattr(self, "_graph_pool", None), capture_error_mode="thread_local"):
            st["hidden"] = self.model(st["input_ids"], st["positions"], ctx)
        self._graph_pool = graph.pool()
        self.graphs[bs] = (graph, st)
        log.info("%s: captured a decode CUDA graph for batch %d", self.view.name, bs)

    def reset_graphs(self) -> None:
        """Drop captured graphs (the pool's memory moved, or weights were replaced)."""
        self.graphs.clear()
        self._graph_pool = None
        self._graph_generation = self.view.pool.generation
