"""The rollout stage of a PPO step: the actor generates, the scorers score, with or without overlap.

    rollout = Rollout(actor, scorers=[reward, critic, ref], overlap=True)
    rollout.submit(prompts, sampling)            # B (+ delta) prompts
    done = rollout.collect(B)                    # the first B sequences finished *and* scored

``overlap=True`` (intra-step overlap): every C tokens the actor streams a chunk; each scorer
prefills pending chunks on its own CUDA stream (ordered by the host, which already holds the token
ids) while the actor keeps decoding on its stream. ``overlap=False`` is the sequential pipeline:
generate, then score; both share every line of code but the schedule.

``collect(n)`` returns as soon as ``n`` sequences are finished and scored; the others stay in flight
with their tokens and pages (inter-step overlap) and continue at the next ``collect``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .actor import ActorEngine
from .scorer import RuleReward, ScoreError, Scorer
from .sequence import Chunk, SamplingParams, Sequence, SeqStatus
from .timeline import profiler_range

__all__ = ["Rollout", "ScoredSequence"]

log = logging.getLogger("oppo_runtime.engine")


@dataclass
class ScoredSequence:
    seq: Sequence
    score: float | None = None                      # reward model score + rule reward (summed)
    scores: dict[str, float] = field(default_factory=dict)   # per source
    values: list[float] | None = None               # critic, per response token
    ref_logprobs: list[float] | None = None         # reference, per response token
    error: str | None = None                        # a scorer failed on this sequence


class Rollout:
    WORKER_TIMEOUT_S = 0.05      # the scorer thread's longest sleep (reads back device results)
    UNSTICK_AFTER_S = 0.04       # flushing: scorers with pending tokens but no progress this long

    def __init__(self, actor: ActorEngine, scorers: list[Scorer] = (), rule_reward: RuleReward | None = None,
                 overlap: bool = True, timeline=None, threaded: bool | None = None,
                 score_below_batch: int | None = None):
        if score_below_batch is not None and score_below_batch < 1:
            raise ValueError(f"score_below_batch must be >= 1 or None, got {score_below_batch}")
        self.actor = actor
        self.score_below_batch = score_below_batch    # see _threshold
        self.scorers = list(scorers)
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique, got {names}")
        self.rule_reward = rule_reward
        self.overlap = overlap
        self.timeline = timeline
        self._buffered: dict[int, list[Chunk]] = {}   # sequential mode: chunks held until scoring
        self._finished: list[Sequence] = []            # finish order (first finished = first trained)
        self.in_flight: dict[int, Sequence] = {}
        actor.add_chunk_consumer(self._on_chunks)
        actor.scheduler.on_pool_pressure = self._on_pool_pressure
        # scorer_pages_evicted: scorer KV pages dropped for the actor's pool pressure (the
        # scorers recompute those prefixes later)
        self.stats = {"actor_s": 0.0, "score_s": 0.0, "scorer_pages_evicted": 0}
        # (tokens, host seconds) per scorer call, less any CUDA graph capture inside it: the chunk
        # size model (ppo.controllers) fits a call's steady cost, and a capture is a one-off
        self.scorer_calls: list[tuple[int, float]] = []
        # On a GPU the scorers are driven from a host thread of their own: launching their eager
        # prefill costs milliseconds of host time, which would otherwise stall the decode loop.
        # On the CPU everything runs inline, in a fixed order (deterministic, testable).
        on_cuda = any(s.stream is not None for s in self.scorers)
        self.threaded = (overlap and on_cuda) if threaded is None else (threaded and overlap)
        self._lock = threading.RLock()             # scorer state, scorer pages
        self._inbox: deque = deque()               # (chunks, tokens) from the actor thread to the worker
        self._run = threading.Event()              # the worker works only inside collect()
        # The worker sleeps on _wake (releasing the GIL) until there is work worth launching; the
        # actor thread sets it. Token counters, each written by one thread only (no lock needed):
        self._wake = threading.Event()
        self._progress = threading.Event()         # set by the worker after each round (flush waits on it)
        self._appended_tokens = 0                  # actor thread: tokens put in the inbox
        self._drained_tokens = 0                   # worker (or collect, worker stopped): tokens taken out
        self._backlog = 0                          # worker: scorers' pending tokens left below the threshold
        self._worker_fed = 0                       # worker: rounds of _score_some that launched work
        self.worker_wakeups = 0                    # worker rounds (wake-ups that took the GIL and the lock)
        self._flush = False
        self._only: set[int] | None = None
        self._target: int | None = None            # n of the collect() under way (the threshold's end game)
        self._closed = False
        self._worker_error: BaseException | None = None
        self._worker = None
        if self.threaded:
            self._worker = threading.Thread(target=self._work, name="oppo-scorers", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ plumbing
    def _on_chunks(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            if c.final:
                self._finished.append(c.seq)
                if self.rule_reward is not None and not c.seq.finish_reason.startswith("error"):
                    self.rule_reward.submit(c.seq)
        if self.overlap and self.threaded:
            n = sum(c.end - c.start for c in chunks)
            self._inbox.append((chunks, n))
            self._appended_tokens += n
            # wake the worker (after the append: no lost wake-up) only when it would launch work:
            # the pending tokens reach _score_some's threshold, or anything arrives while flushing
            if self._flush:
                self._wake.set()
            elif not self._wake.is_set():
                pending = self._appended_tokens - self._drained_tokens + self._backlog
                if pending >= self._threshold(False):
                    self._wake.set()
        elif self.overlap:
            for s in self.scorers:
                s.submit(chunks)
        else:
            for c in chunks:
                self._buffered.setdefault(c.seq.seq_id, []).append(c)

    def _on_pool_pressure(self, n_pages: int) -> int:
        with self._lock:
            return self._evict_scorers(n_pages)

    def _evict_scorers(self, n_pages: int, pool=None, protect: frozenset = frozenset()) -> int:
        """``pool`` (default: the actor's) is short: drop up to ``n_pages`` of scorer KV that lives
        in it, never a ``protect``ed sequence's (scorers placed on another device have a pool of
        their own, and freeing theirs would not help the actor's)."""
        pool = self.actor.pool if pool is None else pool
        freed = 0
        for s in self.scorers:
            if freed < n_pages and s.pool is pool:
                freed += s.evict(n_pages - freed, protect=protect)
        self.stats["scorer_pages_evicted"] += freed
        return freed

    def _pools(self) -> list:
        """The page pools: the actor's, then those of scorers placed elsewhere."""
        pools = [self.actor.pool]
        for s in self.scorers:
            if all(s.pool is not p for p in pools):
                pools.append(s.pool)
        return pools

    def _pool_sizes(self) -> str:
        return ", ".join(f"{p.num_pages} pages on {p.device}" for p in self._pools())

    def _scorer_ctx(self, scorer: Scorer):
        return torch.cuda.stream(scorer.stream) if scorer.stream is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _span(self, lane: str, name: str, stream=None):
        """A timeline span timed on ``stream`` by CUDA events (host clock on the CPU). Yields a dict
        whose "name" the body may change (the span is recorded under it)."""
        label = {"name": name}
        if self.timeline is None:
            yield label
            return
        self.timeline.cuda_span_begin(lane, name, stream)
        try:
            yield label
        finally:
            self.timeline.cuda_span_end(lane, name, stream, as_name=label["name"])

    # ------------------------------------------------------------------ API
    def submit(self, prompts, sampling: SamplingParams | None = None, target_lens=None, sample_keys=None,
               metas=None) -> list[Sequence]:
        seqs = []
        for i, p in enumerate(prompts):
            seq = self.actor.add_request(p, sampling, target_len=None if target_lens is None else target_lens[i],
                                         sample_key=None if sample_keys is None else sample_keys[i])
            if metas is not None:
                seq.meta.update(metas[i])
            self.in_flight[seq.seq_id] = seq
            seqs.append(seq)
        return seqs

    def set_chunk_size(self, c: int) -> None:
        self.actor.chunk_size = c

    def reset_stats(self) -> None:
        self.stats = {k: type(v)(0) for k, v in self.stats.items()}
        self.scorer_calls = []

    def resume(self, seqs: list[Sequence]) -> None:
        """Put deferred sequences (from a checkpoint, or kept by the caller) back in flight."""
        for seq in seqs:
            self.in_flight[seq.seq_id] = seq
            self.actor.resume(seq)

    def resume_finished(self, seqs: list[Sequence]) -> None:
        """Put back sequences that had finished but were not trained yet (from a checkpoint)."""
        for seq in seqs:
            seq.status = SeqStatus.FINISHED
            seq.num_emitted = len(seq.output_ids)
            self.in_flight[seq.seq_id] = seq
            self._on_chunks([Chunk(seq, 0, len(seq.output_ids), True)])

    def _scored(self, seq: Sequence) -> bool:
        if seq.finish_reason and seq.finish_reason.startswith("error"):
            return True
        if self.rule_reward is not None and not self.rule_reward.done(seq.seq_id):
            return False
        return all(s.done(seq.seq_id) for s in self.scorers)

    def collect(self, n: int | None = None) -> list[ScoredSequence]:
        """Run until the first ``n`` finished sequences (all in flight if None) are scored."""
        n = len(self.in_flight) if n is None else n
        if n > len(self.in_flight):
            raise ValueError(f"collect({n}): only {len(self.in_flight)} sequences are in flight")
        self._target = n
        try:
            return self._collect(n)
        finally:
            self._target = None

    def _collect(self, n: int) -> list[ScoredSequence]:
        if self.threaded:
            return self._collect_threaded(n)
        take: list[Sequence] = []
        while True:
            take = self._finished[:n]
            if len(take) == n and (not self.overlap or all(self._scored(s) for s in take)):
                break
            # once n are done, the scorers finish those n (younger ones wait for the next collect:
            # feeding them could take the pages the n need)
            only = {q.seq_id for q in take} if len(take) == n else None
            flush = only is not None or not self.actor.has_unfinished()
            scored_some = self._score_some(flush, only) if self.overlap else False
            # the actor decodes until n sequences are done, then waits for the scorers' tail: the
            # progress of deferred sequences at the update must not depend on scorer timing
            if self.actor.has_unfinished() and len(self._finished) < n:
                self._actor_step()
                continue
            if scored_some:
                continue
            if not self.actor.has_unfinished() and len(self._finished) < n:
                raise RuntimeError(f"collect({n}): the actor has no work left but only "
                                   f"{len(self._finished)} sequences finished")
            self._wait_results(take)
            if any(s.pending_tokens(only) for s in self.scorers) and not self._unstick(take):
                raise RuntimeError(f"scorers cannot get pages for their pending tokens: the pool "
                                   f"({self._pool_sizes()}) is too small for one sequence")

        if not self.overlap:
            self._score_sequential(take)
        return self._finish_collect(take, n)

    def _finish_collect(self, take: list[Sequence], n: int) -> list[ScoredSequence]:
        self.actor.sync()          # book the decode step still on the device (sequences stay consistent)
        self._wait_results(take)
        out = [self._result(seq) for seq in take]
        self._finished = self._finished[n:]
        for seq in take:
            self.in_flight.pop(seq.seq_id, None)
            for s in self.scorers:
                s.release(seq.seq_id)
        return out

    def _unstick(self, take: list[Sequence]) -> bool:
        """Scorers hold pages of many half-scored sequences and none can grow: drop the KV of the
        youngest ones (recomputed later) until the oldest unscored sequence fits."""
        self.actor.sync()          # pages the actor frees below must be free at once
        oldest = next((q for q in take if not self._scored(q)), None)
        if oldest is None:
            return True
        ok = True
        sched = self.actor.scheduler
        for pool in self._pools():              # each pool on its own (scorers on another device)
            need = sum(s.pages_needed(oldest.seq_id) for s in self.scorers if s.pool is pool)
            self._evict_scorers(need, pool, protect=frozenset([oldest.seq_id]))
            while pool is self.actor.pool and pool.num_free < need and sched.running:   # the actor's youngest
                sched.preempt(max(sched.running, key=lambda q: q.admit_order))
            ok &= pool.num_free >= need
        if ok:
            # feed the oldest at once: left to the next round, the first scorer would take the freed
            # pages for younger sequences, the others would starve again, and the next unstick would
            # evict that work (a livelock with a pool that holds few sequences)
            self._score_some(True, {oldest.seq_id})
        return ok

    def _collect_threaded(self, n: int) -> list[ScoredSequence]:
        """Overlap on a GPU: this thread decodes, the worker thread scores."""
        self._flush = False
        self._only = None
        self._run.set()
        self._wake.set()           # a first round: chunks and backlog left from before this collect
        # Both threads launch CUDA work under the GIL. The worker sleeps in Event.wait (GIL released)
        # except when it launches a batch of scorer prefills, which costs milliseconds of host time:
        # with the default 5 ms switch interval the decode loop could wait that long behind such a
        # burst at each hand-over. 0.5 ms bounds the actor's wait; it costs nothing while the worker
        # sleeps (the interval only matters when two threads want the GIL).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.0005))
        try:
            while len(self._finished) < n:
                self._raise_worker_error()
                if not self.actor.has_unfinished():
                    raise RuntimeError(f"collect({n}): the actor has no work left but only "
                                       f"{len(self._finished)} sequences finished")
                self._actor_step()
            take = self._finished[:n]
            self._only = {q.seq_id for q in take}
            self._flush = True
            self._wake.set()
            # wait for the worker to score ``take``; if the scorers have pending tokens of ``take``
            # but make no progress for a while (no pages), unstick them
            idle_since, fed = time.monotonic(), self._worker_fed
            while True:
                self._progress.clear()         # before the check: a round that ends after it wakes us
                self._raise_worker_error()
                with self._lock:
                    if all(self._scored(q) for q in take):
                        break
                    now = time.monotonic()
                    busy = bool(self._inbox) or any(s._pending for s in self.scorers)
                    if busy or fed != self._worker_fed or not any(s.pending_tokens(self._only)
                                                                  for s in self.scorers):
                        idle_since, fed = now, self._worker_fed
                    elif now - idle_since > self.UNSTICK_AFTER_S:
                        if not self._unstick(take):
                            raise RuntimeError("scorers cannot get pages for their pending tokens: the pool "
                                               f"({self._pool_sizes()}) is too small")
                        self._wake.set()       # pages were freed: the worker retries at once
                self._wait_rule(take)
                self._progress.wait(timeout=0.005)
        finally:
            sys.setswitchinterval(switch)
            self._run.clear()
            with self._lock:               # the worker's current iteration, if any, is over
                pass
        with self._lock:
            self._drain_inbox()
            return self._finish_collect(take, n)

    def _actor_step(self) -> None:
        t0 = time.perf_counter()
        # named by what the step did: a prefill step (new prompts, recomputed KV of deferred or
        # preempted sequences) while others decode was drawn as "decode" before
        with self._span("actor", "decode", self.actor.stream) as label:
            n0 = self.actor.stats["prefill_steps"]
            self.actor.step()
            if self.actor.stats["prefill_steps"] != n0:
                label["name"] = "prefill"
        self.stats["actor_s"] += time.perf_counter() - t0

    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            err, self._worker_error = self._worker_error, None
            raise RuntimeError(f"the scorer thread failed: {type(err).__name__}: {err}") from err

    # The end game of a collect: once at most this share of its sequences is left to finish, the
    # threshold drops to one chunk, so that what is pending is scored under the last decode steps
    # instead of after them (the exposed tail of scoring on a PPO step).
    END_GAME_FRACTION = 8

    def _threshold(self, flush: bool) -> float:
        """Pending tokens from which a scorer launches a prefill (see ``_score_some``): about half
        a round of chunks (C tokens for half the running sequences), at most one chunk (C) in the
        end game of a collect (at most max(2, n / END_GAME_FRACTION) of its n sequences left to
        finish), and 1 when flushing. With ``score_below_batch``, infinite (no launch before the
        flush) while more sequences than that decode: scoring waits for the tail, where a small
        decode batch leaves the GPU's SMs idle (on T, scorers under a full batch slowed a
        device-bound decode more than they hid, session 11)."""
        if flush:
            return 1
        running = len(self.actor.scheduler.running)
        if self.score_below_batch is not None and running > self.score_below_batch:
            return math.inf
        C = self.actor.chunk_size
        t = max(1, C * running // 2)
        n = self._target
        if n is not None and n - len(self._finished) <= max(2, n // self.END_GAME_FRACTION):
            t = min(t, max(1, C))
        return t

    def _drain_inbox(self) -> None:
        """Hand the chunks of the inbox to the scorers (under the lock)."""
        while self._inbox:
            chunks, n = self._inbox.popleft()
            self._drained_tokens += n
            for s in self.scorers:
                s.submit(chunks)

    def _work(self) -> None:
        """The scorer thread: sleeps until the actor thread has work for it (or, as a safety net
        for reading back device results, a timeout), then launches until it runs out of work."""
        timeout = self.WORKER_TIMEOUT_S
        while True:
            self._wake.wait(timeout)
            if self._closed:
                return
            if not self._run.is_set():
                # outside collect: a wake-up (chunks from resume_finished) stays set for the next
                # collect; wait for that one instead of spinning
                timeout = self.WORKER_TIMEOUT_S
                if self._wake.is_set():
                    self._run.wait(self.WORKER_TIMEOUT_S)
                continue
            try:
                timeout = self._round()
            except BaseException as e:  # noqa: BLE001  (reported to the collecting thread)
                self._worker_error = e
                self._run.clear()
            self._progress.set()

    def _round(self) -> float:
        """One wake-up of the worker: drain the inbox and launch until ``_score_some`` finds nothing
        worth launching (a burst is handled without waiting again), then read back finished device
        results. Every step checks, under the lock, that collect() still runs. Returns how long to
        sleep before the next round unless woken."""
        first = True
        while True:
            with self._lock:
                if not self._run.is_set() or self._closed:
                    return self.WORKER_TIMEOUT_S
                if first:
                    self._wake.clear()         # before draining: a later append wakes us again
                    self.worker_wakeups += 1
                    first = False
                self._drain_inbox()
                if self._score_some(self._flush, self._only):
                    self._worker_fed += 1
                    continue           # (the lock is free for a moment: pool pressure, flush checks)
                for s in self.scorers:
                    s.poll()
                flush = self._flush
                threshold = self._threshold(flush)
                left = max((s.pending_tokens(self._only) for s in self.scorers), default=0)
                # leftovers count towards the next wake-up; a backlog the scorers cannot take (no
                # pages) does not, or every chunk would wake us for nothing
                self._backlog = left if left < threshold else 0
                results_due = any(s._pending for s in self.scorers)
                # flushing, the collecting thread waits for device results: read them back promptly
                return 0.0005 if (flush and results_due) else self.WORKER_TIMEOUT_S

    def close(self) -> None:
        """Stop the scorer thread (also done at interpreter exit: it is a daemon)."""
        self._closed = True
        self._wake.set()
        self._run.set()
        if self._worker is not None:
            self._worker.join(timeout=5)

    def _score_some(self, flush: bool = True, only: set[int] | None = None) -> bool:
        """Overlap mode: each scorer prefills one batch of pending tokens on its stream.

        Unless ``flush``, a scorer waits until about half a round of chunks is pending (C tokens
        for half the running sequences): each call costs a fixed host overhead, so final chunks of
        sequences ending one by one are gathered rather than prefilled one call each."""
        did = False
        threshold = self._threshold(flush)
        for s in self.scorers:
            s.poll()
            if s.pending_tokens(only) >= threshold:
                t0 = time.perf_counter()
                cap0 = s.runner.prefill_stats["capture_s"]
                with self._scorer_ctx(s), self._span(s.name, "prefill", s.stream), \
                        profiler_range(f"scorer/{s.name}"):
                    fed = s.step(only=only)
                did |= fed > 0
                dt = time.perf_counter() - t0
                self.stats["score_s"] += dt
                if fed:
                    # G full's C jumped 32-1024 between steps (session 13): calls with captures
                    # (0.1 s each) made the fitted overhead, and so C, swing; a new C made new
                    # buckets, and those more captures
                    self.scorer_calls.append((fed, max(0.0, dt - (s.runner.prefill_stats["capture_s"] - cap0))))
        return did

    def _score_sequential(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        for s in self.scorers:
            for seq in seqs:
                s.submit(self._buffered.get(seq.seq_id, []))
            with self._scorer_ctx(s), self._span(s.name, "prefill", s.stream):
                while s.pending_tokens():
                    if not s.step():
                        s.poll(wait=True)         # scored sequences give their pages back
                        if not s.step():
                            raise RuntimeError(f"scorer {s.name}: no pages for pending work "
                                               f"({self._pool_sizes()})")
        for seq in seqs:
            self._buffered.pop(seq.seq_id, None)
        self.stats["score_s"] += time.perf_counter() - t0

    def _wait_results(self, seqs: list[Sequence]) -> None:
        """Block until device results and rule rewards of ``seqs`` are in."""
        for s in self.scorers:
            s.poll(wait=True)
        self._wait_rule(seqs)

    def _wait_rule(self, seqs: list[Sequence]) -> None:
        if self.rule_reward is not None:
            for seq in seqs:
                f = self.rule_reward.futures.get(seq.seq_id)
                if f is not None:
                    f.exception()

    def _result(self, seq: Sequence) -> ScoredSequence:
        r = ScoredSequence(seq)
        if seq.finish_reason and seq.finish_reason.startswith("error"):
            r.error = seq.finish_reason
            return r
        try:
            total = 0.0
            for s in self.scorers:
                out = s.result(seq.seq_id)
                if s.kind == "reward":
                    r.scores[s.name] = out
                    total += out
                elif s.kind == "critic":
                    r.values = out
                else:
                    r.ref_logprobs = out
            if self.rule_reward is not None:
                v = self.rule_reward.result(seq.seq_id)
                r.scores[self.rule_reward.name] = v
                total += v
            r.score = total if r.scores else None
        except ScoreError as e:
            r.error = str(e)
            log.error("sequence %s: %s", seq.seq_id, e)
        return r
