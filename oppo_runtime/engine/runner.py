"""Runs one model over its pages of the shared pool: chunked prefill and decode steps.

Work that depends only on the batch's shape is prepared on the host (token ids, positions, slot
mapping, block tables, context lengths), staged through pinned memory and copied without
blocking; the forward then does device work only. Decode steps can be captured in CUDA graphs
for a ladder of batch sizes (needs the CUDA attention kernels: the reference ops sync).

Chunk prefill of every token (``last_only=False``: the scorers) can be captured too
(``prefill_graphs=True``, issue 4): a graph per bucket (tokens N -> n_bucket, sequences B ->
b_bucket, longest chunk -> q_bucket; ``_prefill_bucket``), captured lazily, replayed with the
padded inputs of ``_prefill_inputs``; a bucket's first requests borrow a captured larger one
(``_graph_for``) instead of paying a capture inside the step, and one that none holds runs eager
until it recurs. Padding rows write no KV (slot -1), sit at position 0 and belong to no sequence
(padding sequences are empty: cu_seqlens stays at N, context length 0), so attention never reads
them and every other op is row-wise; their hidden rows are garbage and only ``hidden[:N]`` is
returned. One launch replaces ~240 (24 layers x
~10 kernels), which a scorer thread would otherwise issue under the GIL while the actor's decode
loop waits for it.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..memory import KVView
from ..models.context import PagedContext
from ..ops import attention_kernels_support, paged_decode_workspace

__all__ = ["Span", "DecodeRows", "TokensFrom", "ModelRunner", "PinnedRing"]

# Prefill graph buckets: at least 64 tokens and chunks of 16 (smaller buckets would only add graphs),
# at most 256 sequences (padding sequences cost a few early-exiting attention CTAs each).
PREFILL_MIN_TOKENS = 64
PREFILL_MIN_CHUNK = 16
PREFILL_MAX_SEQS = 256
PREFILL_MAX_GRAPHS = 64

# One capture at a time in the process. The actor thread captures decode graphs with
# torch.cuda.graph(), whose entry synchronizes the device and empties the allocator's caches; an
# empty_cache while another thread's capture is underway fails the allocator's internal assert
# (captures_underway.empty()) and would abort the rollout. Scorer threads capture prefill graphs.
_CAPTURE_LOCK = threading.Lock()

log = logging.getLogger("oppo_runtime.engine")


@dataclass
class Span:
    """Tokens ``token_ids`` of sequence ``key`` at positions ``start .. start+len-1``."""
    key: object
    token_ids: list[int]
    start: int


class TokensFrom(NamedTuple):
    """Decode rows whose input token is still on the device (sampled by the step in flight): row
    ``dst[i]`` of this step takes ``tokens[src[i]]``; ``same``: dst and src are both 0..B-1."""
    dst: object           # list[int] or int64 array
    src: object
    tokens: torch.Tensor
    same: bool


@dataclass(eq=False)             # compared by identity (its fields are arrays)
class DecodeRows:
    """A decode batch as arrays, one row per sequence and one token each (the steady state of
    async decoding: the scheduler carries it from one lagged step to the next and filters it with
    numpy instead of walking every running sequence in Python; see Scheduler._lagged_rows).

    Row i decodes the token at position ``n[i] - 1`` of ``seqs[i]`` (its K/V land in slot n-1, the
    context is n tokens, the sampler's position is n). ``alive`` turns False when the sequence
    finishes (Scheduler.finish)."""
    seqs: list
    seq_ids: np.ndarray       # int64 [B]
    n: np.ndarray             # int64 [B] tokens of the sequence counting this step's input
    plen: np.ndarray          # int64 [B] prompt lengths
    max_new: np.ndarray       # int64 [B] told or maximum new tokens
    cap: np.ndarray           # int64 [B] tokens the sequence's pages hold
    prow: np.ndarray          # int64 [B] the sequence's row in the pool's table mirror
    keys: np.ndarray          # int64 [B] sampler keys
    temps: np.ndarray         # float32 [B]
    eos_ends: np.ndarray      # bool [B] the EOS token ends it (no told length, EOS not ignored)
    stops: np.ndarray         # bool [B] it has stop tokens (no told length)
    filtered: bool            # some row samples with top-k / top-p
    generation: int           # the pool's generation when made (its memory moved: walk again)
    from_prev: np.ndarray = None  # int64 [B]: each row's row in the previous step's rows (lagged steps)

    # per-row arrays, in field order (subset() slices them)
    _ROW_FIELDS = ("seq_ids", "n", "plen", "max_new", "cap", "prow", "keys", "temps", "eos_ends", "stops")

    def __post_init__(self):
        B = len(self.seqs)
        self.alive = np.ones(B, dtype=bool)          # False once the row's sequence finished
        self.n_alive = B
        self._index = None

    def row_of(self, seq_id) -> int | None:
        """The row of sequence ``seq_id`` (a dict made at the first call: most steps need none)."""
        if self._index is None:
            self._index = dict(zip(self.seq_ids.tolist(), range(len(self.seqs))))
        return self._index.get(seq_id)

    def __len__(self) -> int:
        return len(self.seqs)

    def subset(self, idx: np.ndarray, generation: int, **arrays) -> "DecodeRows":
        """Rows ``idx`` (increasing) as a new batch; ``arrays`` replace per-row fields (already
        taken at idx)."""
        seqs = self.seqs
        per_row = {f: arrays[f] if f in arrays else getattr(self, f)[idx] for f in self._ROW_FIELDS}
        out = DecodeRows([seqs[i] for i in idx.tolist()], filtered=self.filtered, generation=generation,
                         **per_row)
        out.from_prev = idx
        return out

    def plain_rows(self, tokens: np.ndarray, bad: np.ndarray, max_len: int, eos: int | None) -> list:
        """Per row: can its sampled token (``tokens``; ``bad``: NaN/inf logits) not end it? The
        booking takes such a row's token without the checks of a possible end (EOS, stop tokens,
        lengths, the context)."""
        n1 = self.n + 1                 # the sequence's tokens with this one
        ends = bad | (n1 - self.plen >= self.max_new) | (n1 >= max_len) | self.stops
        if eos is not None:
            ends |= self.eos_ends & (tokens == eos)
        return (~ends).tolist()

    def host_inputs(self, view: KVView) -> tuple[list, int]:
        """([ids, positions, slots, block tables (flat), context lengths, cu_seqlens], width), as
        ModelRunner._decode_host_inputs; ids are placeholders (-1: every row's token comes from the
        device)."""
        return _decode_inputs(view, np.full(len(self.seqs), -1, dtype=np.int64), self.n - 1,
                              lambda width: view.pool.table_at(self.prow, width), lambda i: int(self.seq_ids[i]))


def _decode_inputs(view: KVView, ids, starts: np.ndarray, tables, key_of) -> tuple[list, int]:
    """A decode batch's host inputs from its input ids and positions (``starts``, int64 [B]):
    [ids, positions, slots, block tables (flat), context lengths, cu_seqlens] and the tables'
    width; ``tables(width)`` gives the [B, width] tables and page counts, ``key_of(i)`` row i's
    sequence (for the error of a row without the pages of its tokens)."""
    B = len(starts)
    T = view.tokens_per_page
    ends = starts + 1
    used = (ends + (T - 1)) // T
    width = max(1, int(used.max()))
    table, counts = tables(width)
    short = np.nonzero(used > counts)[0]
    if short.size:
        i = int(short[0])
        raise RuntimeError(f"{view.name}: sequence {key_of(i)} has {int(counts[i])} pages for {int(ends[i])} tokens")
    slots = table[np.arange(B), starts // T] * T + starts % T
    return [ids, starts, slots, table.ravel(), ends, np.arange(B + 1, dtype=np.int64)], width


class _Staging:
    """Host->device copies through pinned memory (non-blocking on CUDA).

    On CUDA the pinned side is a ring of buffers this object owns (``RING`` of them, made when it is
    built, grown when a copy needs more), each reused only after the event recorded behind its last
    copy has completed: no pinned allocation per call. Pinning each call's data (``pin_memory()``)
    went through PyTorch's caching host allocator, whose reuse of a freed block waits on events it
    records itself; in a scorer thread while the actor thread captures a CUDA graph that is where
    session 20's "invalid argument" was raised, and a block reused under a copy still in flight would
    stage another step's block tables (session 27 saw an illegal address in the same overlapped
    rollout). Copies are issued and their events recorded on the caller's current stream."""

    RING = 8
    MIN_BYTES = 1 << 18

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._ring = PinnedRing(self.RING, self.pin) if self.pin else None
        self._events: list = [None] * self.RING
        self._lock = threading.Lock()   # a ring slot goes to one caller (a runner is one thread's, but cheap)
        if self.pin:    # the buffers now, on the constructing thread (see the class docstring)
            for _ in range(self.RING):
                self._ring.take(self.MIN_BYTES)

    def _to_device(self, flat: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor on the device: through the next pinned buffer on CUDA."""
        if not self.pin:
            return flat.to(self.device)
        with self._lock:
            nbytes = flat.numel() * flat.element_size()
            buf = self._ring.take(nbytes, self.MIN_BYTES)
            i = self._ring.i                           # the slot take() handed out (a buffer it
            # replaced to grow stays the host allocator's until the event it recorded behind its copy)
            if self._events[i] is not None:
                self._events[i].synchronize()          # its previous copy has read the buffer
            host = buf[:nbytes].view(flat.dtype).view(flat.shape)
            host.copy_(flat)
            dev = host.to(self.device, non_blocking=True)
            if self._events[i] is None:
                self._events[i] = torch.cuda.Event()
            self._events[i].record()
            return dev

    def __call__(self, data, dtype) -> torch.Tensor:
        t = torch.as_tensor(data, dtype=dtype)          # a list, or a numpy array without a copy
        return self._to_device(t.contiguous())

    def many(self, parts: list) -> list[torch.Tensor]:
        """Several int lists (or int64 numpy arrays) in one pinned buffer and one copy; int64
        views on the device."""
        # numpy builds the buffer ~5x faster than torch.tensor on a list (host time per step)
        sizes = [p.size if isinstance(p, np.ndarray) else len(p) for p in parts]
        n = sum(sizes)
        if any(isinstance(p, np.ndarray) for p in parts):
            flat = torch.from_numpy(np.concatenate([p.ravel() if isinstance(p, np.ndarray)
                                                    else np.fromiter(p, dtype=np.int64, count=len(p))
                                                    for p in parts]).astype(np.int64, copy=False))
        else:
            flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=n))
        dev = self._to_device(flat)
        out, o = [], 0
        for k in sizes:
            out.append(dev[o:o + k])
            o += k
        return out


class PinnedRing:
    """Reusable host byte buffers (pinned for CUDA) handed out in turn from a ring of ``size``: a
    buffer comes back ``size`` takes later, so a caller must be done with it by then (in the
    engine, a step's copies have run once the step is booked, which trails its launch by one)."""

    def __init__(self, size: int, pin: bool):
        self.bufs: list[torch.Tensor | None] = [None] * size
        self.i = 0
        self.pin = pin

    def take(self, nbytes: int, min_bytes: int = 0) -> torch.Tensor:
        """The next buffer, uint8, at least ``nbytes`` long (grown to max(nbytes, min_bytes))."""
        self.i = (self.i + 1) % len(self.bufs)
        buf = self.bufs[self.i]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, min_bytes), dtype=torch.uint8, pin_memory=self.pin)
            self.bufs[self.i] = buf
        return buf

    def take_like(self, tensors, min_bytes: int = 0) -> tuple:
        """Views shaped and typed like ``tensors``, carved from the next buffer (8-byte aligned)."""
        sizes = [-(-t.numel() * t.element_size() // 8) * 8 for t in tensors]
        buf = self.take(sum(sizes), min_bytes)
        views, o = [], 0
        for t, n in zip(tensors, sizes):
            views.append(buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
            o += n
        return tuple(views)


# ---------------------------------------------------------------------- decode graphs: one staged copy
# A decode batch's inputs travel in one byte buffer per graph batch size bs (and one pinned host
# buffer from a ring): int64 rows [_D64_ROWS, bs] = input ids, positions, slot mapping, sampler keys,
# sampler positions, and the dst / src rows of tokens that come from the step still on the device;
# then int32 context lengths [bs], temperatures (float32 bits) [bs] and the block tables [B, width]
# packed, which one strided copy puts into the graph's [bs, max_blocks] table. The graph reads its
# inputs where they land: one H2D copy and one table copy per step instead of ~20 small ops.
_D64_ROWS = 7


def _decode_layout(bs: int, max_blocks: int) -> tuple[int, int]:
    """(byte offset of the int32 part, total bytes) of a decode batch's buffer for batch size bs."""
    off32 = 8 * _D64_ROWS * bs
    return off32, off32 + 4 * (2 * bs + bs * max_blocks)


# ---------------------------------------------------------------------- prefill graphs: host side
def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _prefill_bucket(num_tokens: int, num_seqs: int, max_q: int, max_tokens: int = 8192,
                    max_seqs: int = PREFILL_MAX_SEQS) -> tuple[int, int, int] | None:
    """(n_bucket, b_bucket, q_bucket) of a chunk-prefill call, or None (too large: run eager).

    n_bucket: next power of two >= num_tokens, at least 64, at most next_pow2(max_tokens);
    b_bucket: next power of two >= num_seqs, at most max_seqs; q_bucket: next power of two >= the
    longest chunk, at least 16 (the attention grid is sized by it: rows past a chunk exit early)
    and at most n_bucket (a chunk is never longer than the batch)."""
    if num_tokens < 1 or num_seqs < 1 or not 1 <= max_q <= num_tokens:
        raise ValueError(f"_prefill_bucket: bad batch ({num_tokens} tokens, {num_seqs} sequences, "
                         f"longest chunk {max_q})")
    if num_tokens > _next_pow2(max(max_tokens, PREFILL_MIN_TOKENS)) or num_seqs > max_seqs:
        return None
    n_bucket = max(PREFILL_MIN_TOKENS, _next_pow2(num_tokens))
    q_bucket = min(n_bucket, max(PREFILL_MIN_CHUNK, _next_pow2(max_q)))
    return n_bucket, _next_pow2(num_seqs), q_bucket


# A new bucket first borrows a captured graph whose bucket holds it (every dimension at least as
# large: more padding rows, padding sequences, idle attention CTAs), or runs eager where none does,
# and is captured only on its CAPTURE_ON_SIGHTING-th request. A capture costs two eager forwards
# and the capture itself (60-90 ms of host time on T's scorers, session 12); a borrowed graph costs
# only its padding, bounded by REUSE_MAX_ROWS; an eager forward one forward's launches. Capturing
# every bucket that found nothing to borrow at its first request (sessions 12-13) still captured
# 5-8 graphs in most timed steps of workload G's full mode (0.4-0.9 s of host time each step, the
# slow steps among them): the bucket space (rows x sequences x chunk length, the chunk size moving)
# is large and most buckets come once.
CAPTURE_ON_SIGHTING = 3
REUSE_MAX_ROWS = (2, 1024)      # a borrowed graph has at most max(2 x the bucket's rows, 1024) rows
EAGER_UNTIL_CAPTURE = True      # False: a bucket with nothing to borrow is captured at once (sessions 12-13)


def _graph_for(bucket: tuple[int, int, int], captured, seen: int, eager_first: bool | None = None
               ) -> tuple[str, tuple[int, int, int] | None]:
    """What a chunk-prefill call of ``bucket`` runs: ("replay", the captured bucket to replay: itself,
    or a larger one it borrows), ("capture", bucket) or ("eager", None).

    ``seen``: how many times ``bucket`` was requested, this time included. Before its
    CAPTURE_ON_SIGHTING-th request a bucket borrows the smallest captured bucket (rows, then chunk
    length, then sequences) that holds it within REUSE_MAX_ROWS, and runs eager if none does
    (``eager_first``, default EAGER_UNTIL_CAPTURE; else it is captured at once); from then on it
    gets its own."""
    eager_first = EAGER_UNTIL_CAPTURE if eager_first is None else eager_first
    if bucket in captured:
        return "replay", bucket
    if seen >= CAPTURE_ON_SIGHTING:
        return "capture", bucket
    n, b, q = bucket
    limit = max(REUSE_MAX_ROWS[0] * n, REUSE_MAX_ROWS[1])
    fits = [c for c in captured if n <= c[0] <= limit and b <= c[1] and q <= c[2]]
    if fits:
        return "replay", min(fits)
    return ("eager", None) if eager_first else ("capture", bucket)


def _align16(x: int) -> int:
    return -(-x // 16) * 16


def _prefill_layout(b_bucket: int, max_blocks: int) -> tuple[int, int, int, int]:
    """Offsets of cu_seqlens_q [b+1], context_lens [b], block_tables [b, max_blocks] in the one
    int32 buffer of a prefill graph (each 64-byte aligned), and its length."""
    off_cu = 0
    off_ctx = _align16(b_bucket + 1)
    off_bt = off_ctx + _align16(b_bucket)
    return off_cu, off_ctx, off_bt, off_bt + b_bucket * max_blocks


def _prefill_inputs(spans: list[Span], pages_of, tokens_per_page: int, bucket: tuple[int, int, int],
                    max_blocks: int, out64: np.ndarray | None = None, out32: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """The padded host inputs of a prefill graph: (i64 [3, n_bucket], i32 [layout length], n32).

    i64 rows: input_ids, positions, slot_mapping; rows N.. are padding: id 0, position 0 (rotary
    reads it: a valid row of the cos/sin cache), slot -1 (no KV written). i32: ``_prefill_layout``:
    cu_seqlens_q (padding sequences empty: cu stays at N), context_lens (0 for padding sequences),
    the block tables of the B real sequences (zeros past each table's pages). Only the first
    ``n32`` int32 values need copying: rows of padding sequences in the block tables are never read
    (their chunk is empty, so the attention kernels exit before reading their table)."""
    n_bucket, b_bucket, _ = bucket
    T = tokens_per_page
    B = len(spans)
    lens = np.fromiter((len(sp.token_ids) for sp in spans), dtype=np.int64, count=B)
    starts = np.fromiter((sp.start for sp in spans), dtype=np.int64, count=B)
    N = int(lens.sum())
    if B > b_bucket or N > n_bucket:
        raise ValueError(f"_prefill_inputs: {B} sequences / {N} tokens do not fit bucket {bucket}")
    off_cu, off_ctx, off_bt, size = _prefill_layout(b_bucket, max_blocks)
    a64 = np.empty((3, n_bucket), dtype=np.int64) if out64 is None else out64
    a32 = np.empty(size, dtype=np.int32) if out32 is None else out32
    ends = starts + lens
    cu = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    bt = a32[off_bt:off_bt + B * max_blocks].reshape(B, max_blocks)
    bt.fill(0)
    tables = [pages_of(sp.key) for sp in spans]
    used = -(-ends // T)                                   # pages each sequence's context spans
    have = np.fromiter((len(t) for t in tables), dtype=np.int64, count=B)
    bad = np.flatnonzero((used > have) | (used > max_blocks))
    if bad.size:
        b = int(bad[0])
        raise RuntimeError(f"sequence {spans[b].key}: {int(ends[b])} tokens, {int(have[b])} pages "
                           f"(at most {max_blocks} per sequence)")
    # all tables in one scatter (a row at a time costs ~2 us each)
    total = int(used.sum())
    flat = np.fromiter(itertools.chain.from_iterable(t[:u] for t, u in zip(tables, used.tolist())),
                       dtype=np.int32, count=total)
    first = np.zeros(B, dtype=np.int64)
    np.cumsum(used[:-1], out=first[1:])
    bt[np.repeat(np.arange(B), used), np.arange(total) - np.repeat(first, used)] = flat
    a64[0, :N] = np.fromiter(itertools.chain.from_iterable(sp.token_ids for sp in spans), dtype=np.int64, count=N)
    seq_of_row = np.repeat(np.arange(B), lens)
    pos = starts[seq_of_row] + (np.arange(N) - cu[:-1][seq_of_row])
    a64[1, :N] = pos
    a64[2, :N] = bt[seq_of_row, pos // T].astype(np.int64) * T + pos % T
    a64[0, N:] = 0
    a64[1, N:] = 0
    a64[2, N:] = -1
    a32[off_cu:off_cu + B + 1] = cu
    a32[off_cu + B + 1:off_ctx] = N         # padding sequences: empty (and the alignment gap)
    a32[off_ctx:off_ctx + B] = ends
    a32[off_ctx + B:off_bt] = 0
    return a64, a32, off_bt + B * max_blocks


def _weight_fingerprint(model) -> tuple[int, ...]:
    """Addresses of every weight a captured graph reads (parameters, buffers, fused projections,
    norm-folded copies)."""
    ptrs = [t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())]
    for m in model.modules():
        for name in ("qkv", "gate_up"):
            fused = getattr(m, name, None)
            if fused is not None and hasattr(fused, "weight"):
                ptrs.append(fused.weight.data_ptr())
                if fused.bias is not None:
                    ptrs.append(fused.bias.data_ptr())
        fold = getattr(m, "norm_fold", None)
        if fold is not None:
            ptrs += [fold.qkv.data_ptr(), fold.gate_up.data_ptr()]
    return tuple(ptrs)


@dataclass
class _PrefillGraph:
    graph: object                 # torch.cuda.CUDAGraph
    flat64: torch.Tensor          # [3, n_bucket] input_ids | positions | slot_mapping
    flat32: torch.Tensor          # _prefill_layout: cu_seqlens_q | context_lens | block_tables
    hidden: torch.Tensor          # [n_bucket, H], written by each replay
    replays: int = 0


class ModelRunner:
    def __init__(self, model, view: KVView, max_model_len: int, enforce_eager: bool = True,
                 graph_batch_sizes: tuple[int, ...] = (), prefill_graphs: bool = False,
                 max_prefill_tokens: int = 8192, max_prefill_graphs: int = PREFILL_MAX_GRAPHS,
                 decode_max_partition: int = 0):
        self.model, self.view = model, view
        self.decode_max_partition = decode_max_partition    # EngineConfig.decode_max_partition
        self.device = next(model.parameters()).device
        if self.device.type == "cuda" and hasattr(model, "fuse_projections"):
            # one QKV and one gate_up GEMM; the named parameters become views of the fused weights,
            # so a training model's optimizer steps reach the engine without a copy
            model.fuse_projections()
        # The per-device constants a forward makes on first use (rotary inv_freq, a host-to-device copy,
        # and the cos|sin cache) are made here, on the constructing thread. Made lazily by a scorer's
        # first forward in the scorer thread while the actor thread captures a decode graph, that copy
        # raised "Cannot copy between CPU and CUDA tensors during CUDA graph capture" (session 27's
        # GPU suite, test_scorer_graphs_gpu's overlapped rollout).
        for m in model.modules():
            if callable(getattr(m, "cos_sin_cache", None)):
                m.cos_sin_cache(self.device)
        self.max_model_len = max_model_len
        self.max_blocks = view.pages_for_tokens(max_model_len)
        self.stage = _Staging(self.device)
        self.graphs: dict[int, tuple] = {}
        self.decode_head = None             # see set_decode_head (the LM head + sampler in decode graphs)
        # a decode graph of norm-folded layers reads copies of weights that the eager forward would
        # refresh; a replay does not run it, so the runner refreshes them first (see _NormFold)
        self._refresh_folds = getattr(model, "refresh_norm_folds", None)
        self._graph_generation = view.pool.generation
        g = view.geometry
        kernels = attention_kernels_support(g.dtype, g.head_dim)
        self.use_graphs = not enforce_eager and self.device.type == "cuda" and kernels and bool(graph_batch_sizes)
        if not enforce_eager and self.device.type == "cuda" and not kernels:
            # the reference attention syncs with the host: it cannot be captured
            log.warning("CUDA graphs off for %s: no CUDA attention kernel for %s, head_dim %d",
                        view.name, g.dtype, g.head_dim)
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes))
        # decode steps through the static buffers of _decode_layout: with CUDA graphs, or eagerly on
        # a CPU when OPPO_STATIC_DECODE=1 (the same packing and padding, testable without a GPU)
        self.static_decode = self.use_graphs or (self.device.type != "cuda" and bool(self.graph_batch_sizes)
                                                 and os.environ.get("OPPO_STATIC_DECODE") == "1")
        self._host_ring = PinnedRing(3, self.device.type == "cuda")   # _decode_layout's host side
        # chunk prefill in CUDA graphs (scorers); see the module docstring
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_graphs = max_prefill_graphs
        self.prefill_graphs: dict[tuple[int, int, int], _PrefillGraph] = {}
        self.prefill_stats = {"replays": 0, "captures": 0, "eager": 0, "capture_s": 0.0, "borrowed": 0}
        self._bucket_seen: dict[tuple[int, int, int], int] = {}
        self._prefill_pool = None           # one memory pool for all of this runner's prefill graphs
        self._capture_stream = None
        self._prefill_stream = None         # the stream of the last replay (static buffers in use there)
        self._refused_logged = False
        self._weights = None                # _weight_fingerprint at the first capture
        self.prefill_graphs_off_reason = self._prefill_graphs_off_reason(prefill_graphs, enforce_eager, kernels)
        self.use_prefill_graphs = self.prefill_graphs_off_reason is None

    def _prefill_graphs_off_reason(self, wanted: bool, enforce_eager: bool, kernels: bool) -> str | None:
        if not wanted:
            return "not requested"
        if enforce_eager:
            return "enforce_eager"
        if self.device.type != "cuda":
            return f"the model is on {self.device.type}, not on a CUDA device"
        g = self.view.geometry
        if not kernels:
            return (f"no CUDA attention kernels for {g.dtype}, head_dim {g.head_dim} (the reference ops "
                    "sync with the host)")
        from ..ops.attention import _prefill_backend
        try:
            which = _prefill_backend(torch.empty(0, 1, g.head_dim, dtype=g.dtype, device=self.device), None)
        except Exception as e:  # noqa: BLE001  (a backend asked for by env that cannot run: say so)
            return f"paged_prefill_attention has no backend here: {e}"
        if which not in ("cuda", "triton"):
            return f"paged_prefill_attention runs the {which} backend (it syncs with the host)"
        return None

    # ------------------------------------------------------------------ batch metadata
    def _decode_host_inputs(self, spans: list[Span]) -> tuple[list, int] | None:
        """A decode batch's host inputs ([ids, positions, slots, block tables (flat), context
        lengths, cu_seqlens], table width) built with numpy from the pool's row mirror (the
        per-page Python loops of the general path cost ~0.5 ms per step at B=256 here), or None
        when a span is not one token. ``spans`` may be a DecodeRows (the arrays are there)."""
        if isinstance(spans, DecodeRows):
            return spans.host_inputs(self.view)
        toks = [sp.token_ids for sp in spans]
        if any(len(t) != 1 for t in toks):
            return None
        starts = np.fromiter((sp.start for sp in spans), dtype=np.int64, count=len(spans))
        keys = [sp.key for sp in spans]
        return _decode_inputs(self.view, [t[0] for t in toks], starts,
                              lambda width: self.view.block_table(keys, width), keys.__getitem__)

    def _context(self, spans: list[Span], pages_of, ids_from=None) -> tuple[torch.Tensor, torch.Tensor, PagedContext]:
        fast = self._decode_host_inputs(spans) if pages_of == self.view.pages else None
        if fast is not None:
            return self._stage_context(fast[0], len(spans), fast[1], 1, True, ids_from)
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
        return self._stage_context([ids, pos, slots, flat_tables, ctx_lens, cu], len(spans), width, max_q, is_decode,
                                   ids_from)

    def _stage_context(self, host: list, B: int, width: int, max_q: int, is_decode: bool, ids_from
                       ) -> tuple[torch.Tensor, torch.Tensor, PagedContext]:
        """One staged copy of the host inputs [ids, pos, slots, flat tables, ctx lens, cu]."""
        ids = host[0]
        if ids_from is None:
            d_ids, d_pos, d_slots, d_tables, d_ctx, d_cu = self.stage.many(host)
        else:
            # some input tokens live only on the device (sampled by the step still in flight):
            # rows ``dst`` take ``src_tokens[src]``
            dst, src, src_tokens, same = ids_from
            d_ids, d_pos, d_slots, d_tables, d_ctx, d_cu, d_dst, d_src = self.stage.many(host + [dst, src])
            if same and len(dst) == len(ids):          # same rows, same order
                d_ids = src_tokens[:len(ids)].to(torch.int64)
            elif len(dst):
                d_ids = d_ids.index_copy(0, d_dst, src_tokens.index_select(0, d_src).to(torch.int64))
        ctx = PagedContext(
            kv_caches=self.view.kv_caches,
            slot_mapping=d_slots,
            block_tables=d_tables.view(B, width).to(torch.int32),
            context_lens=d_ctx.to(torch.int32),
            cu_seqlens_q=d_cu.to(torch.int32),
            max_seqlen_q=max_q,
            is_decode=is_decode,
            decode_max_partition=self.decode_max_partition,
        )
        return d_ids, d_pos, ctx

    @torch.inference_mode()
    def forward(self, spans: list[Span], pages_of, last_only: bool = True, ids_from=None) -> torch.Tensor:
        """Hidden states of the last token of each span [B, H] (or of every token [N, H]).

        With prefill graphs, the [N, H] result is a view of the graph's static output: valid until
        the next forward of this runner, and to be read on the stream it was computed on.

        ``ids_from`` (a TokensFrom): decode rows ``dst`` take their input token from the device
        tensor ``tokens[src]`` instead of the span (whose id is a placeholder). ``spans`` may be a
        DecodeRows for a decode batch."""
        if not spans:
            raise ValueError("forward: empty batch")
        if self.use_prefill_graphs and not last_only and ids_from is None:
            hidden = self._graph_prefill(spans, pages_of)
            if hidden is not None:
                return hidden
            self.prefill_stats["eager"] += 1
        if self.static_decode and len(spans) <= self.graph_batch_sizes[-1]:
            st = self._static_decode(spans, pages_of, ids_from)
            if st is not None:
                return st["hidden"][:len(spans)]
        input_ids, positions, ctx = self._context(spans, pages_of, ids_from)
        hidden = self.model(input_ids, positions, ctx)
        if last_only and not ctx.is_decode:
            hidden = hidden[ctx.cu_seqlens_q[1:].long() - 1]
        return hidden

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def forward_sample(self, spans: list[Span], pages_of, ids_from, keys: list[int], positions: list[int],
                       temperature: list[float]):
        """A decode step, the LM head and the sampler in one graph replay: (tokens int64, log-probs
        float32, bad bool) [B] as views of the graph's outputs (valid until its next replay), or
        None when this step cannot take that path (no head set, eager, not a decode batch, too
        large): the caller then runs forward() and samples eagerly. keys/positions/temperature:
        the sampler's per-row inputs [B] on the host (they travel with the step's other inputs)."""
        if self.decode_head is None or not self.static_decode or len(spans) > self.graph_batch_sizes[-1]:
            return None
        st = self._static_decode(spans, pages_of, ids_from, (keys, positions, temperature))
        if st is None:
            return None
        B = len(spans)
        tok, logp, bad = st["sampled"]
        return tok[:B], logp[:B], bad[:B]

    def _static_decode(self, spans, pages_of, ids_from, sampler=None) -> dict | None:
        """Pack the step's inputs into the static buffers of its batch size and replay (or, on a CPU,
        run) the decode step there; returns the buffers (``hidden``, ``sampled``), or None when the
        batch is not a decode batch of the pool's own page lists."""
        fast = self._decode_host_inputs(spans) if pages_of == self.view.pages else None
        if fast is None:
            return None
        if self._graph_generation != self.view.pool.generation:
            self.reset_graphs()                  # the pool's memory moved: captured pointers are stale
        B = len(spans)
        bs = next(s for s in self.graph_batch_sizes if s >= B)
        if bs not in self.graphs:
            self._capture(bs)
        graph, st = self.graphs[bs]
        self._pack_decode(bs, st, fast[0], B, fast[1], ids_from, sampler)
        if graph is not None:
            if self._refresh_folds is not None:
                self._refresh_folds()            # norm-folded layers: weights changed since their fold
            graph.replay()
        else:                                    # CPU (OPPO_STATIC_DECODE=1): the same buffers, eagerly
            st["hidden"], st["sampled"] = st["step"]()
        return st

    def _pack_decode(self, bs: int, st: dict, host: list, B: int, width: int, ids_from, sampler) -> None:
        """This step's inputs into graph bs's buffers: padding rows past B get id 0, position 0, slot
        -1 (no K/V written), context length 1, sampler key 0, position 0, temperature 1 (their
        outputs are never read). One H2D copy, one copy of the tables, and one or two ops when
        input tokens come from the step still on the device (``ids_from``)."""
        off32, _ = _decode_layout(bs, self.max_blocks)
        used = off32 + 4 * (2 * bs + B * width)
        hbuf = self._host_ring.take(used, _decode_layout(self.graph_batch_sizes[-1], self.max_blocks)[1])
        raw = hbuf.numpy()
        h64 = raw[:off32].view(np.int64).reshape(_D64_ROWS, bs)
        h32 = raw[off32:used].view(np.int32)
        ids, starts, slots, table, ends, _ = host
        h64[0, :B] = ids
        h64[1, :B] = starts
        h64[2, :B] = slots
        h64[0:2, B:] = 0
        h64[2, B:] = -1
        h32[:B] = ends
        h32[B:bs] = 1
        temps = h32[bs:2 * bs].view(np.float32)
        h64[3:5] = 0
        temps[:] = 1.0
        if sampler is not None:
            keys, spos, temperature = sampler
            h64[3, :B] = keys
            h64[4, :B] = spos
            temps[:B] = temperature
        h32[2 * bs:] = table
        nd = 0
        if ids_from is not None:
            dst, src, src_tokens, same = ids_from
            nd = len(dst)
            h64[5, :nd] = dst
            h64[6, :nd] = src
        st["flat"][:used].copy_(hbuf[:used], non_blocking=True)
        st["block_tables"][:B, :width].copy_(st["v32"][2 * bs:2 * bs + B * width].view(B, width))
        if nd:
            if same and nd == B:                            # same rows, same order
                st["input_ids"][:B].copy_(src_tokens[:B])
            else:
                st["input_ids"].index_copy_(0, st["v64"][5, :nd],
                                            src_tokens.index_select(0, st["v64"][6, :nd]).to(torch.int64))

    def set_decode_head(self, head) -> None:
        """``head(hidden [bs, H], temperature [bs], keys [bs], positions [bs]) -> (tokens, log-probs,
        bad)``, captured with each decode graph from now on (graphs captured before are dropped),
        for forward_sample(); None: decode graphs end at the hidden states."""
        if self.graphs:
            self.reset_graphs()
        self.decode_head = head

    def capture_decode_graphs(self) -> int:
        """Capture the decode graph of every batch size not captured yet (what `_graph_decode`
        would otherwise do lazily, the first time a step has that many sequences); returns how many
        were captured. Call it before timing, or before the first step, so that no capture (tens
        of ms each) falls inside a generation."""
        if not self.static_decode:
            return 0
        if self._graph_generation != self.view.pool.generation:
            self.reset_graphs()
        todo = [bs for bs in self.graph_batch_sizes if bs not in self.graphs]
        for bs in todo:
            self._capture(bs)
        return len(todo)

    def _capture(self, bs: int) -> None:
        dev = self.device
        off32, nbytes = _decode_layout(bs, self.max_blocks)
        flat = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        v64 = flat[:off32].view(torch.int64).view(_D64_ROWS, bs)
        v32 = flat[off32:].view(torch.int32)
        st = {
            "flat": flat, "v64": v64, "v32": v32,
            "input_ids": v64[0], "positions": v64[1], "slot_mapping": v64[2],
            "context_lens": v32[:bs],
            "block_tables": torch.zeros(bs, self.max_blocks, dtype=torch.int32, device=dev),
        }
        st["slot_mapping"].fill_(-1)
        st["context_lens"].fill_(1)
        k0 = self.view.kv_caches[0][0]
        q_like = torch.empty(bs, self.model.config.num_attention_heads, k0.shape[3], dtype=k0.dtype, device=dev)
        ctx = PagedContext(self.view.kv_caches, st["slot_mapping"], st["block_tables"], st["context_lens"],
                           torch.arange(bs + 1, dtype=torch.int32, device=dev), 1, True,
                           # the graph's own split-KV scratch (all layers share it: one stream)
                           decode_workspace=paged_decode_workspace(q_like, k0, st["block_tables"],
                                                                   max_partition=self.decode_max_partition),
                           decode_max_partition=self.decode_max_partition)
        # st keeps every tensor the graph reads or writes alive for the graph's life: the context's
        # workspace and cu_seqlens come from the caching allocator outside the graph's pool, and a
        # freed block handed to another tensor would take the replays' writes (session 10 lost a
        # G run to this: an illegal address at the third PPO step)
        st["ctx"] = ctx
        head = self.decode_head
        if head is not None:     # the sampler's per-row inputs (padding rows: key 0, position 0, T=1)
            st["keys"], st["sample_pos"] = v64[3], v64[4]
            st["temperature"] = v32[bs:2 * bs].view(torch.float32)
            st["temperature"].fill_(1.0)

        # no_grad whatever the caller's mode: the model takes its fused inference path only with
        # grad off, and a graph freezes the path of its capture. ActorEngine.warmup() captures
        # outside the step's inference_mode; without this its graphs replayed the autograd path
        # (~45 kernels a layer instead of ~10: 2.1 ms per decode step instead of 1.1 at B <= 4 on
        # an H200, intra_overlap's `alone` 4.37 s vs the same rollout lazily captured 2.37 s)
        @torch.no_grad()
        def step():
            hidden = self.model(st["input_ids"], st["positions"], ctx)
            sampled = head(hidden, st["temperature"], st["keys"], st["sample_pos"]) if head is not None else None
            return hidden, sampled

        if not self.use_graphs:          # CPU, OPPO_STATIC_DECODE=1: run step() eagerly on the buffers
            st["step"] = step
            self.graphs[bs] = (None, st)
            return
        with _CAPTURE_LOCK:                          # a scorer thread may be capturing (see _CAPTURE_LOCK)
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):                       # warm-up outside the graph
                    step()
            torch.cuda.current_stream(dev).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the scorer thread keeps launching on its own stream while we capture
            with torch.cuda.graph(graph, pool=getattr(self, "_graph_pool", None), capture_error_mode="thread_local"):
                st["hidden"], st["sampled"] = step()
        self._graph_pool = graph.pool()
        self.graphs[bs] = (graph, st)
        log.info("%s: captured a decode CUDA graph for batch %d%s", self.view.name, bs,
                 " (with the LM head and the sampler)" if head is not None else "")

    # ------------------------------------------------------------------ CUDA graphs (chunk prefill)
    def _graph_prefill(self, spans: list[Span], pages_of) -> torch.Tensor | None:
        """Every token's hidden state [N, H] from a prefill graph, or None: run eager (too large,
        or the bound on graphs is reached)."""
        if self._graph_generation != self.view.pool.generation:
            self.reset_graphs()                  # the pool's memory moved: captured pointers are stale
        N, max_q = 0, 0
        for sp in spans:
            n = len(sp.token_ids)
            N += n
            if n > max_q:
                max_q = n
        bucket = _prefill_bucket(N, len(spans), max_q, self.max_prefill_tokens)
        if bucket is None:
            return None
        seen = self._bucket_seen[bucket] = self._bucket_seen.get(bucket, 0) + 1
        action, use = _graph_for(bucket, self.prefill_graphs, seen)
        if action == "eager":
            return None
        if use != bucket:
            self.prefill_stats["borrowed"] += 1
            bucket = use
        entry = self.prefill_graphs.get(bucket)
        if entry is None and len(self.prefill_graphs) >= self.max_prefill_graphs:
            # refuse, not LRU: a capture costs two eager forwards and the pool keeps the memory of
            # every graph captured, so churning graphs would cost more than running eager
            if not self._refused_logged:
                log.warning("%s: %d chunk-prefill graphs captured (the bound): batches of new buckets run "
                            "eager (first refused: %s)", self.view.name, len(self.prefill_graphs), bucket)
                self._refused_logged = True
            return None
        dev = self.device
        n_bucket, b_bucket, _ = bucket
        _, _, _, size32 = _prefill_layout(b_bucket, self.max_blocks)
        # fresh pinned buffers from the caching host allocator, which keeps each one until its
        # non-blocking copy has run (a reused buffer could be overwritten before the copy reads it)
        h64 = torch.empty((3, n_bucket), dtype=torch.int64, pin_memory=True)
        h32 = torch.empty(size32, dtype=torch.int32, pin_memory=True)
        _, _, n32 = _prefill_inputs(spans, pages_of, self.view.tokens_per_page, bucket, self.max_blocks,
                                    out64=h64.numpy(), out32=h32.numpy())
        stream = torch.cuda.current_stream(dev)
        if self._prefill_stream is not None and self._prefill_stream != stream:
            stream.wait_stream(self._prefill_stream)   # the last replay still reads the static buffers there
        self._prefill_stream = stream
        if entry is None:
            flat64 = torch.empty((3, n_bucket), dtype=torch.int64, device=dev)
            flat32 = torch.zeros(size32, dtype=torch.int32, device=dev)
            flat64.copy_(h64, non_blocking=True)
            flat32[:n32].copy_(h32[:n32], non_blocking=True)
            entry = self._capture_prefill(bucket, flat64, flat32)
        else:
            entry.flat64.copy_(h64, non_blocking=True)
            entry.flat32[:n32].copy_(h32[:n32], non_blocking=True)
        entry.graph.replay()
        entry.replays += 1
        self.prefill_stats["replays"] += 1
        return entry.hidden[:N]

    def _prefill_context(self, bucket, flat64: torch.Tensor, flat32: torch.Tensor) -> PagedContext:
        n_bucket, b_bucket, q_bucket = bucket
        off_cu, off_ctx, off_bt, size32 = _prefill_layout(b_bucket, self.max_blocks)
        # is_decode=False and max_seqlen_q=q_bucket (static): the attention grid depends only on
        # q_bucket, b_bucket and Hkv; CTAs past a sequence's chunk (and all of a padding sequence's)
        # exit before reading anything (Triton and CUDA kernels alike)
        return PagedContext(
            kv_caches=self.view.kv_caches,
            slot_mapping=flat64[2],
            block_tables=flat32[off_bt:size32].view(b_bucket, self.max_blocks),
            context_lens=flat32[off_ctx:off_ctx + b_bucket],
            cu_seqlens_q=flat32[off_cu:off_cu + b_bucket + 1],
            max_seqlen_q=q_bucket,
            is_decode=False,
        )

    def _capture_prefill(self, bucket, flat64: torch.Tensor, flat32: torch.Tensor) -> _PrefillGraph:
        """Warm up eagerly on this call's own (already copied) inputs, then capture. The warm-up
        writes the same K/V the replay writes again (deterministic, row by row). Weights: the graph
        reads the model's tensors at their addresses now; in-place updates (``copy_``, optimizer
        steps: the critic after each PPO step) reach it, replaced tensors do not (``check_weights``)."""
        dev = self.device
        t0 = time.perf_counter()
        ctx = self._prefill_context(bucket, flat64, flat32)
        input_ids, positions = flat64[0], flat64[1]
        stream = torch.cuda.current_stream(dev)
        if self._capture_stream is None:
            # our own stream: torch.cuda.graph() would share one capture stream with the actor's
            # decode captures, and synchronize the device and empty the allocator caches under it
            self._capture_stream = torch.cuda.Stream(dev)
            self._prefill_pool = torch.cuda.graph_pool_handle()
        cap = self._capture_stream
        cap.wait_stream(stream)                       # the static inputs were copied on ``stream``
        with _CAPTURE_LOCK, torch.cuda.stream(cap):   # no decode capture (empty_cache) meanwhile
            for _ in range(2):                        # Triton autotune/compile, cuBLAS, lazy caches
                self.model(input_ids, positions, ctx)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the actor thread keeps launching (and allocating) while we capture
            graph.capture_begin(pool=self._prefill_pool, capture_error_mode="thread_local")
            try:
                hidden = self.model(input_ids, positions, ctx)
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:  # noqa: BLE001  (the first error is the one to report)
                    pass
                raise
            graph.capture_end()
        stream.wait_stream(cap)
        if self._weights is None:
            self._weights = _weight_fingerprint(self.model)
        # All graphs share one pool: safe because one runner replays one graph at a time, on one
        # stream (ordered by ``_prefill_stream``), and a graph's live tensors (its output) stay
        # allocated, so later captures reuse only other graphs' intermediates, which each replay
        # rewrites before reading.
        entry = _PrefillGraph(graph, flat64, flat32, hidden)
        self.prefill_graphs[bucket] = entry
        self.prefill_stats["captures"] += 1
        self.prefill_stats["capture_s"] += time.perf_counter() - t0
        log.info("%s: captured a chunk-prefill CUDA graph for %d tokens, %d sequences, chunks <= %d "
                 "(%d graphs, %.0f ms)", self.view.name, *bucket, len(self.prefill_graphs),
                 1e3 * (time.perf_counter() - t0))
        return entry

    def check_weights(self) -> bool:
        """Drop the graphs if the model's weights were replaced (not copied in place) since they
        were captured; True if they were. Called by ``Scorer.invalidate`` after weight updates."""
        if self._weights is None or _weight_fingerprint(self.model) == self._weights:
            return False
        log.warning("%s: model weights were replaced since the CUDA graphs were captured: graphs dropped",
                    self.view.name)
        self.reset_graphs()
        return True

    def reset_graphs(self) -> None:
        """Drop captured graphs (the pool's memory moved, or weights were replaced)."""
        if self.prefill_graphs and self._prefill_stream is not None:
            self._prefill_stream.synchronize()     # rare: a replay in flight must not see its pool freed
        self.graphs.clear()
        self._graph_pool = None
        self.prefill_graphs.clear()
        self._prefill_pool = torch.cuda.graph_pool_handle() if self._capture_stream is not None else None
        self._prefill_stream = None
        self._refused_logged = False
        self._weights = None
        self._graph_generation = self.view.pool.generation
