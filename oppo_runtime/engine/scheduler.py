"""Continuous batching over the shared pool: admission, chunked prefill, decode, preemption.

Policy (one step is either a prefill step or a decode step):
  * prefill and decode alternate while both have work, so that neither starves;
  * a prefill step takes waiting sequences first-come-first-served (preempted ones first, in their
    original order) up to ``max_num_batched_tokens`` tokens; a long prompt is prefilled in chunks;
    a sequence that already has generated tokens (preempted, deferred, its KV dropped) is
    re-prefilled up to its last token only, which its next decode step feeds (so such a prefill
    samples nothing, and an async engine does not wait for it);
  * a decode step takes every running sequence (up to ``max_num_seqs``);
  * when pages run out, the most recently admitted running sequence is preempted: its pages are
    freed and it is recomputed later from its tokens (nothing generated is lost). The oldest
    sequence is never preempted while another one could be, so every sequence finishes.
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..memory import KVView, PoolExhausted
from .runner import DecodeRows, Span
from .sequence import Sequence, SeqStatus

_first = operator.itemgetter(0)

__all__ = ["Scheduler", "ScheduledBatch", "NeedsDrain"]


class NeedsDrain(Exception):
    """A lagged decode step would have to preempt: the caller resolves its step in flight first."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    spans: list[Span] | DecodeRows   # a decode batch may come as arrays
    is_decode: bool
    sample: list[bool]          # does this span reach the sequence's end (sample a token)? (decode: all)
    rows: DecodeRows | None = None   # a decode batch's arrays (async decode), also when spans are Spans


class Scheduler:
    def __init__(self, view: KVView, max_num_seqs: int, max_num_batched_tokens: int,
                 on_pool_pressure: Callable[[int], int] | None = None):
        self.view = view
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_pool_pressure = on_pool_pressure      # asks other pool users to free n pages
        self._admitted = 0
        self._last_was_prefill = False
        self.num_preemptions = 0
        self.release_pages: Callable[[object], None] = view.free   # the engine may defer frees
        self._lagged = False
        # the last decode batch as arrays (DecodeRows), made when track_rows is set (the engine does
        # for async decode): the next lagged step filters them (see _lagged_rows)
        self.track_rows = False
        self.max_model_len: int | None = None
        self._rows: DecodeRows | None = None
        self.rows_stats = {"fast": 0, "slow": 0}

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        if seq.admit_order < 0:
            seq.admit_order = self._admitted
            self._admitted += 1
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ pages
    def _grow(self, seq: Sequence, num_tokens: int, protect) -> bool:
        """Give ``seq`` pages for ``num_tokens`` tokens, preempting younger sequences if needed
        (never one in ``protect``: seq ids, or the sequences already taken into this step)."""
        while True:
            try:
                self.view.ensure(seq.seq_id, num_tokens)
                return True
            except PoolExhausted:
                pass
            need = self.view.pages_for_tokens(num_tokens) - len(self.view.pages(seq.seq_id))
            if self.on_pool_pressure is not None and self.on_pool_pressure(need) > 0:
                continue
            if not isinstance(protect, set):           # the step's sequences: their ids only when needed
                protect = {x.seq_id for x in protect}
            victims = [s for s in self.running if s is not seq and s.seq_id not in protect]
            if self._lagged:
                raise NeedsDrain(f"sequence {seq.seq_id} needs {need} pages")
            if not victims:
                return False
            self.preempt(max(victims, key=lambda s: s.admit_order))

    def preempt(self, seq: Sequence, pressure: bool = True) -> None:
        """Drop ``seq``'s pages; it is recomputed from its tokens when next scheduled.
        ``pressure=False``: not for lack of pages (e.g. stale KV after a weight update)."""
        self.release_pages(seq.seq_id)
        seq.num_cached_tokens = 0
        if pressure:
            seq.num_preemptions += 1
            self.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        # back to the queue in admission order: older sequences are served first
        items = list(self.waiting) + [seq]
        items.sort(key=lambda s: s.admit_order)
        self.waiting = deque(items)

    def finish(self, seq: Sequence) -> None:
        rows = self._rows
        r = rows.row_of(seq.seq_id) if rows is not None else None
        if r is not None and rows.seqs[r] is seq and rows.alive[r]:
            rows.alive[r] = False
            rows.n_alive -= 1
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release_pages(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    # ------------------------------------------------------------------ steps
    def schedule(self) -> ScheduledBatch | None:
        ready = None
        if self.waiting:
            pending = True
        else:       # one pass over the running sequences: the decode-ready ones, and whether any has prefill left
            ready, pending = self._decode_ready(frozenset(), stop_at_partial=False)
        prefill_first = pending and (not self.running or not self._last_was_prefill)
        if prefill_first:
            ready = None            # a prefill step (even one that takes nothing) may preempt: look again
        batch = (self._schedule_prefill() if prefill_first else None) or self._schedule_decode(ready=ready) \
            or self._schedule_prefill()
        if batch is not None:
            self._last_was_prefill = not batch.is_decode
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs, spans, sample = [], [], []
        taken: set[int] = set()
        partial = sorted((s for s in self.running if s.num_cached_tokens < s.num_tokens - 1),
                         key=lambda s: s.admit_order)
        for seq in partial + list(self.waiting):
            if budget <= 0:
                break
            new = seq.status is SeqStatus.WAITING
            if new and len(self.running) >= self.max_num_seqs:
                break
            if seq.status is SeqStatus.WAITING and seq not in self.waiting:
                continue
            # A sequence with generated tokens (deferred, preempted, its KV dropped) is re-prefilled
            # up to its last token, which the next decode step feeds and samples from, as it would
            # have anyway: its prefill samples nothing, so the engine need not wait for it.
            todo = seq.num_tokens - (1 if seq.output_ids else 0) - seq.num_cached_tokens
            if todo <= 0 and new:               # its KV is all there (kept pages): decode-ready
                self.waiting.remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                continue
            n = min(todo, budget)
            if not self._grow(seq, seq.num_cached_tokens + n, protect=taken):
                break
            taken.add(seq.seq_id)
            if new:
                self.waiting.remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
            spans.append(Span(seq.seq_id, seq.all_ids[seq.num_cached_tokens:seq.num_cached_tokens + n],
                              seq.num_cached_tokens))
            seqs.append(seq)
            sample.append(n == todo and not seq.output_ids)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, spans, False, sample)

    def prefill_pending(self) -> bool:
        return bool(self.waiting) or any(s.num_cached_tokens < s.num_tokens - 1 for s in self.running)

    def schedule_lagged(self, prev_seqs: list[Sequence], prev_rows: DecodeRows | None = None
                        ) -> ScheduledBatch | None:
        """The next step while the previous decode step (over ``prev_seqs``) is still on the device
        (its tokens unread): a decode step, or a prefill step of waiting sequences (see the end).

        A decode step only when no prefill is pending, or only waiting sequences that cannot be
        admitted anyway (every batch slot taken: ``_schedule_prefill`` would take none of them);
        sequences whose unread token is their last by length sit out. Raises NeedsDrain instead of preempting:
        pages freed now could still be written by the step in flight, so preemption waits until
        that step is resolved. With ``prev_rows`` (the in-flight step's DecodeRows) and no change
        of the running set since, the batch is made from those arrays (``_lagged_rows``);
        otherwise by walking the running sequences.

        When every waiting sequence fits a free batch slot (so the in-flight step's ends,
        unread yet, cannot change who is admitted), the prefill step that ``schedule()`` would
        take after booking is taken now instead (a lagged prefill: the sequences it takes are not
        in the step in flight; NeedsDrain where it would preempt). The engine launches it behind
        the decode step and books that one after: the GPU is not left idle while the host builds
        a prefill step (the KV recompute of deferred sequences after a weight update: several
        16k-token steps)."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            if len(self.running) + len(self.waiting) > self.max_num_seqs:
                return None                     # admission may hinge on the step's unread ends
            self._lagged = True
            try:
                batch = self._schedule_prefill()
            finally:
                self._lagged = False
            if batch is not None:
                self._last_was_prefill = True
            return batch
        self._lagged = True
        try:
            done, batch = self._lagged_rows(prev_rows) if prev_rows is not None else (False, None)
            if not done:
                self.rows_stats["slow"] += 1
                batch = self._schedule_decode(self._ending_by_length(prev_seqs), none_if_partial=True)
            else:
                self.rows_stats["fast"] += 1
        finally:
            self._lagged = False
        if batch is not None:
            self._last_was_prefill = False
        return batch

    def _ending_by_length(self, seqs: list[Sequence]) -> set:
        """Ids of ``seqs`` whose unread token is their last by length (their told or maximum number of
        new tokens, or the context): they sit out the next lagged step."""
        max_len, out = self.max_model_len, set()
        for seq in seqs:
            n = len(seq.output_ids)
            if n >= seq.max_new or (max_len is not None and len(seq.prompt_ids) + n >= max_len):
                out.add(seq.seq_id)
        return out

    def _lagged_rows(self, rows: DecodeRows) -> tuple[bool, ScheduledBatch | None]:
        """The lagged decode step from the in-flight step's rows, with numpy: (True, the batch or
        None if no row is left), or (False, None) when the running sequences are not those rows
        (the caller walks them then). Same result as ``_schedule_decode`` over them: every row
        still running whose unread token is not its last by length, in admission order (the rows
        are), with pages for its next token.

        Why the rows are the running set: they are the last decode batch (``self._rows``), which
        held every decode-ready sequence; a sequence ended since is marked dead by finish(); one
        preempted leaves ``running`` but stays alive (counts differ); one admitted or prefilled
        comes through a prefill step, after which the next decode batch is walked again; a row
        left out as ending by length finishes when the step in flight is booked, before this."""
        pool = self.view.pool
        if (rows is not self._rows or rows.generation != pool.generation or rows.n_alive != len(self.running)
                or self.max_model_len is None):
            return False, None
        n = rows.n + 1                          # the unread token now counts
        keep = rows.alive & (n - rows.plen < rows.max_new) & (n < self.max_model_len)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return True, None
        n = n[idx]
        cap = rows.cap[idx]
        prow = rows.prow[idx]
        grow = np.flatnonzero(cap < n)
        if grow.size:                           # ~B/T rows per step, a page each: one allocation
            T = self.view.tokens_per_page
            need = ((n[grow] + (T - 1)) // T - cap[grow] // T).tolist()
            name = self.view.name
            try:
                pool.allocate_many([(name, int(rows.seq_ids[i])) for i in idx[grow].tolist()], need)
            except PoolExhausted:               # short of pages: one by one, asking the pool's other
                taken = [rows.seqs[i] for i in idx.tolist()]    # users first (lagged: NeedsDrain)
                for j in grow.tolist():
                    self._grow(taken[j], int(n[j]), taken)
            cap[grow] = pool.page_counts_at(prow[grow]) * T
        new = self._rows = rows.subset(idx, pool.generation, n=n, cap=cap, prow=prow)
        return True, ScheduledBatch(new.seqs, new, True, [True] * len(new.seqs), new)

    def _make_rows(self, seqs: list[Sequence], ns: list[int]) -> DecodeRows:
        """The arrays of a decode batch made by walking (its sequences' tokens counting the input, ns)."""
        B = len(seqs)
        ids = [s.seq_id for s in seqs]
        pool = self.view.pool
        prow = pool.mirror_rows(self.view.name, ids)
        sp = [s.sampling for s in seqs]
        untold = np.fromiter((s.target_len is None for s in seqs), dtype=bool, count=B)
        return DecodeRows(
            seqs, np.array(ids, dtype=np.int64), np.array(ns, dtype=np.int64),
            plen=np.fromiter((len(s.prompt_ids) for s in seqs), dtype=np.int64, count=B),
            max_new=np.fromiter((s.max_new for s in seqs), dtype=np.int64, count=B),
            cap=pool.page_counts_at(np.maximum(prow, 0)) * self.view.tokens_per_page * (prow >= 0), prow=prow,
            keys=np.fromiter((s.sample_key for s in seqs), dtype=np.int64, count=B),
            temps=np.fromiter((p.temperature for p in sp), dtype=np.float32, count=B),
            eos_ends=untold & np.fromiter((not p.ignore_eos for p in sp), dtype=bool, count=B),
            stops=untold & np.fromiter((bool(p.stop_token_ids) for p in sp), dtype=bool, count=B),
            filtered=any(p.top_k > 0 or p.top_p < 1.0 for p in sp), generation=pool.generation)

    def _decode_ready(self, exclude, stop_at_partial: bool) -> tuple[list | None, bool]:
        """(running sequences whose prefill is complete -- cached all but their newest token -- as
        (admit order, length, seq), sorted by admission; whether a running sequence has prefill
        left). One pass that reads each length once: this runs every decode step over every running
        sequence (host time per step at B=256). stop_at_partial: (None, True) at the first one."""
        ready, partial = [], False
        for s in self.running:
            n = len(s.prompt_ids) + len(s.output_ids)
            c = s.num_cached_tokens
            if c == n - 1:
                if s.seq_id not in exclude:
                    ready.append((s.admit_order, n, s))
            elif c < n - 1:
                if stop_at_partial:
                    return None, True
                partial = True
        ready.sort(key=_first)
        return ready, partial

    def _schedule_decode(self, exclude: set[int] = frozenset(), none_if_partial: bool = False,
                         ready: list | None = None) -> ScheduledBatch | None:
        """A decode step over the ready sequences (``ready``: from ``_decode_ready``, if the caller
        has it); touches the pool only for sequences that need a page. none_if_partial: None if a
        running sequence has prefill left."""
        if ready is None:
            ready, _ = self._decode_ready(exclude, stop_at_partial=none_if_partial)
            if ready is None:
                return None
        del ready[self.max_num_seqs:]
        seqs, spans = [], []
        T = self.view.tokens_per_page
        pages = self.view.pool.page_lists     # owner -> page list (read only)
        name = self.view.name
        running = SeqStatus.RUNNING
        ns = []
        for _, n, seq in ready:
            if seq.status is not running:               # preempted by an older one this step
                continue
            sid = seq.seq_id
            have = pages.get((name, sid))
            if (have is not None and len(have) * T >= n) or self._grow(seq, n, seqs):
                seqs.append(seq)
                ns.append(n)
                out = seq.output_ids
                spans.append(Span(sid, [out[-1] if out else seq.prompt_ids[-1]], n - 1))
            else:
                self.preempt(seq)
        if not seqs:
            self._rows = None
            return None
        rows = None
        if self.track_rows:          # seeds the next lagged step's arrays (the inputs here are the spans)
            rows = self._rows = self._make_rows(seqs, ns)
        return ScheduledBatch(seqs, spans, True, [True] * len(seqs), rows)
