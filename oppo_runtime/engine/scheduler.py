"""Continuous batching over the shared pool: admission, chunked prefill, decode, preemption.

Policy (one step is either a prefill step or a decode step):
  * prefill and decode alternate while both have work, so that neither starves;
  * a prefill step takes waiting sequences first-come-first-served (preempted ones first, in their
    original order) up to ``max_num_batched_tokens`` tokens; a long prompt is prefilled in chunks;
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

from ..memory import KVView, PoolExhausted
from .runner import Span
from .sequence import Sequence, SeqStatus

_first = operator.itemgetter(0)

__all__ = ["Scheduler", "ScheduledBatch", "NeedsDrain"]


class NeedsDrain(Exception):
    """A lagged decode step would have to preempt: the caller resolves its step in flight first."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    spans: list[Span]
    is_decode: bool
    sample: list[bool]          # does this span reach the sequence's end (sample a token)?


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
            todo = seq.num_tokens - seq.num_cached_tokens
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
            sample.append(n == todo)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, spans, False, sample)

    def prefill_pending(self) -> bool:
        return bool(self.waiting) or any(s.num_cached_tokens < s.num_tokens - 1 for s in self.running)

    def schedule_lagged_decode(self, exclude: set[int]) -> ScheduledBatch | None:
        """The next decode step while the previous one is still on the device (its tokens unread).

        Only when no prefill is pending; sequences in ``exclude`` (ending with their unread token)
        sit out. Raises NeedsDrain instead of preempting: pages freed now could still be written by
        the step in flight, so preemption waits until that step is resolved."""
        if self.waiting:
            return None
        self._lagged = True
        try:
            batch = self._schedule_decode(exclude, none_if_partial=True)
        finally:
            self._lagged = False
        if batch is not None:
            self._last_was_prefill = False
        return batch

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
        for _, n, seq in ready:
            if seq.status is not running:               # preempted by an older one this step
                continue
            sid = seq.seq_id
            have = pages.get((name, sid))
            if (have is not None and len(have) * T >= n) or self._grow(seq, n, seqs):
                seqs.append(seq)
                out = seq.output_ids
                spans.append(Span(sid, [out[-1] if out else seq.prompt_ids[-1]], n - 1))
            else:
                self.preempt(seq)
        if not seqs:
            return None
        return ScheduledBatch(seqs, spans, True, [True] * len(seqs))
