"""ActorEngine: generates the actor's responses over the shared page pool.

    engine = ActorEngine(model, pool, EngineConfig(chunk_size=16), eos_token_id=tok.eos_token_id)
    engine.add_chunk_consumer(lambda chunks: ...)     # the scorers attach here
    seqs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=1.0, max_new_tokens=64))

Every sampled token carries the behaviour log-prob of the distribution it was sampled from (see
``ops.sampling``) and the policy version the engine had when it sampled it (``update_weights``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..memory import KVGeometry, PagePool
from ..ops import sample_tokens, sampling_triton
from .config import EngineConfig
from .runner import DecodeRows, ModelRunner, PinnedRing, TokensFrom
from .scheduler import NeedsDrain, Scheduler
from .sequence import Chunk, RequestError, SamplingParams, Sequence, SeqStatus
from .timeline import profiler_range

__all__ = ["ActorEngine"]

log = logging.getLogger("oppo_runtime.engine")

_PENDING = -1       # output_ids entry of a sampled token not yet read back from the device


@dataclass
class _InFlight:
    """A launched step whose sampled tokens are still on the device."""
    seqs: list[Sequence]
    idx: list[int]                 # where each row's token goes in seq.output_ids
    version: int
    tokens: torch.Tensor           # [B] on the device: the next step's input tokens
    host: tuple                    # (tokens, log-probs, NaN flags) [B] each, on the host (pinned)
    event: object                  # CUDA event after the copy (None on the CPU)
    launch_id: int
    rows: DecodeRows | None = None  # the step's arrays (the next lagged step filters them)
    _row: dict | None = None

    @property
    def row(self) -> dict:
        """seq_id -> row (made when a step that walks the sequences needs it)."""
        if self._row is None:
            self._row = {s.seq_id: r for r, s in enumerate(self.seqs)}
        return self._row


def _needs_filter(sampling: list[SamplingParams], V: int) -> bool:
    """Whether a row of the step samples with top-k or top-p over a vocabulary of V (the fused
    sampler, and so the graph-captured head, cannot)."""
    return any(0 < p.top_k < V or p.top_p < 1.0 for p in sampling)


class ActorEngine:
    def __init__(self, model, pool: PagePool, config: EngineConfig | None = None, *, name: str = "actor",
                 eos_token_id: int | None = None, on_pool_pressure: Callable[[int], int] | None = None):
        self.model, self.pool = model, pool
        self.config = config or EngineConfig()
        self.name = name
        self.eos_token_id = eos_token_id
        L, Hkv, D = model.kv_geometry()
        dtype = next(model.parameters()).dtype
        self.view = pool.views.get(name) or pool.register(name, KVGeometry(L, Hkv, D, dtype))
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        self.runner = ModelRunner(model, self.view, self.max_model_len, self.config.enforce_eager,
                                  self.config.graph_batch_sizes,
                                  decode_max_partition=self.config.decode_max_partition)
        self.scheduler = Scheduler(self.view, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   on_pool_pressure)
        self.scheduler.max_model_len = self.max_model_len
        self.version = 0
        self._num_requests = 0
        self.chunk_size = self.config.chunk_size
        self._consumers: list[Callable[[list[Chunk]], None]] = []
        # host_s: host-side scheduling, batch preparation and token bookkeeping (not GPU work)
        # wasted_rows: decode rows of sequences that had ended at an earlier token (async decode: an
        # EOS or stop token is read one step late; ends by length are known and sit out)
        # drains: async decode steps that had to read the step in flight back before scheduling
        # (a prefill pending, a preemption, the end), i.e. the GPU idled while the host caught up;
        # waiting_decode_steps: decode steps taken while sequences waited for admission (a slot or pages)
        # lagged_prefills: prefill steps launched behind the decode step in flight (not drained first)
        self.stats = {"decode_steps": 0, "prefill_steps": 0, "generated_tokens": 0, "host_s": 0.0,
                      "wasted_rows": 0, "drains": 0, "waiting_decode_steps": 0, "lagged_prefills": 0}
        self.step_hooks: list[Callable[[str, float, float], None]] = []   # (kind, t0, t1) per step
        # async decode: read each decode step's tokens back while the next one runs (see step())
        self.async_decode = self.config.async_decode
        if self.async_decode is None:       # default: on CUDA; OPPO_ASYNC_DECODE=0|1 overrides
            env = os.environ.get("OPPO_ASYNC_DECODE")
            self.async_decode = env == "1" if env in ("0", "1") else self.runner.device.type == "cuda"
        # the LM head and the sampler inside the decode graphs (EngineConfig.graph_sampling)
        gs = self.config.graph_sampling
        if gs is None:
            gs = os.environ.get("OPPO_GRAPH_SAMPLING", "1") != "0"
        # (CUDA: captured, so the fused Triton sampler; a CPU with OPPO_STATIC_DECODE=1: the reference)
        self.graph_sampling = bool(gs) and self.runner.static_decode and (
            self.runner.device.type != "cuda" or sampling_triton.available())
        if self.graph_sampling:
            seed = self.config.seed
            self.runner.set_decode_head(lambda h, temp, keys, pos: sample_tokens(
                self.model.compute_logits(h), temp, None, None, seed, keys, pos, needs_filter=False))
        self._inflight: _InFlight | None = None
        # the last prefill step that sampled nothing, not yet known done (async decode): nothing
        # to read back, so the host goes on; the next booking (or sync()) settles it
        self._unbooked: _InFlight | None = None
        # a step's read-back lands in reused pinned buffers, not a pinned allocation per tensor and step
        self._readback = PinnedRing(3, self.runner.device.type == "cuda")
        self._launch_id = 0             # steps launched so far
        self._booked_id = 0             # the device is known to be done with steps up to this one
        self._retired: list = []        # (launch id when freed, quarantine owner key)
        self._retire_count = 0
        self._waited = 0.0
        self.scheduler.release_pages = self._release_pages
        # The actor decodes on a stream of the highest priority: when scorers prefill on their own
        # (default-priority) streams, the GPU schedules the decode's blocks first as SMs free up,
        # so a large scorer GEMM delays a decode step by one wave of its blocks, not by all of it.
        self.stream = (torch.cuda.Stream(self.runner.device, priority=-100)
                       if self.runner.device.type == "cuda" else None)

    def warmup(self) -> int:
        """Capture every decode CUDA graph now (on the engine's stream), instead of lazily inside
        the generations that first reach each batch size. Returns the number captured (0 on the
        CPU or with enforce_eager). Needs no request in flight."""
        if self.has_unfinished():
            raise RuntimeError(f"{self.name}: warmup() with requests in flight")
        if self.stream is None:
            return self.runner.capture_decode_graphs()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            n = self.runner.capture_decode_graphs()
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        if n:
            log.info("%s: captured %d decode CUDA graphs (batch sizes %s)", self.name, n,
                     ",".join(map(str, self.runner.graph_batch_sizes)))
        return n

    # ------------------------------------------------------------------ requests
    def add_chunk_consumer(self, fn: Callable[[list[Chunk]], None]) -> None:
        self._consumers.append(fn)

    def validate(self, prompt_ids, sampling: SamplingParams, target_len: int | None) -> None:
        if len(prompt_ids) == 0:
            raise RequestError("empty prompt: at least one token is needed")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                               f"{self.max_model_len} tokens (room for one new token is needed)")
        new = target_len if target_len is not None else sampling.max_new_tokens
        total = min(len(prompt_ids) + new, self.max_model_len)
        if self.view.pages_for_tokens(total) > self.pool.num_pages:
            raise RequestError(f"request of up to {total} tokens needs {self.view.pages_for_tokens(total)} pages; "
                               f"the whole pool has {self.pool.num_pages}")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def add_request(self, prompt_ids, sampling: SamplingParams | None = None, *, target_len: int | None = None,
                    seq: Sequence | None = None, sample_key: int | None = None) -> Sequence:
        """Queue a request; raises RequestError (and queues nothing) if it cannot be served.

        The sampling noise of a sequence is keyed by ``sample_key`` (default: the engine's count of
        requests so far), so the same requests in the same order give the same tokens under the
        same seed, whatever the batching, preemption or overlap schedule.
        """
        sampling = sampling or SamplingParams()
        if seq is None:
            seq = Sequence(list(prompt_ids), sampling, target_len=target_len,
                           sample_key=self._num_requests if sample_key is None else sample_key)
        self._num_requests += 1
        self.validate(seq.prompt_ids, seq.sampling, seq.target_len)
        self.scheduler.add(seq)
        return seq

    def resume(self, seq: Sequence) -> None:
        """Re-queue a sequence that keeps its generated tokens (deferred, or pages dropped)."""
        self.sync()
        seq.num_cached_tokens = 0 if not self.view.pages(seq.seq_id) else seq.num_cached_tokens
        self.scheduler.add(seq)

    def finish_now(self, seq: Sequence, reason: str) -> None:
        """End a sequence where it stands (e.g. it would exceed the staleness bound)."""
        self.sync()
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self._emit([seq])
        self.scheduler.finish(seq)

    def reset_stats(self) -> None:
        """Zero the per-run counters of ``stats`` (a PPO step's, a benchmark repetition's), in place."""
        for k, v in self.stats.items():
            self.stats[k] = type(v)(0)

    def drop_kv(self) -> int:
        """Free the actor KV of every sequence in flight: they are re-prefilled (under the current
        weights) when next scheduled. Returns how many sequences were affected."""
        self.sync()
        running = list(self.scheduler.running)
        for seq in running:
            self.scheduler.preempt(seq, pressure=False)
        return len(running)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running + list(self.scheduler.waiting)

    # ------------------------------------------------------------------ weights
    def update_weights(self, version: int, state_dict: dict | None = None) -> None:
        """Take new weights; tokens sampled from now on carry ``version``.

        With ``state_dict=None`` the engine already runs on the training model's parameters (no
        copy); otherwise the tensors are copied into the engine's parameters in place (CUDA graphs
        stay valid). Call it after every change of the weights: the norm-folded decode layers'
        weight copies are refreshed here (a fused optimizer's step is visible to nothing else).
        """
        self.sync()
        if state_dict is not None:
            params = dict(self.model.named_parameters(remove_duplicate=False))   # tied names too
            with torch.no_grad():
                for k, v in state_dict.items():
                    params[k].copy_(v)
        refold = getattr(self.model, "refresh_norm_folds", None)
        if refold is not None:
            # the norm-folded decode layers' weight copies (OPPO_DECODE_NORM_FOLD): forced, because a
            # fused optimizer's in-place step bumps no version counter (models.transformer._NormFold)
            refold(force=True)
        self.version = version

    # ------------------------------------------------------------------ the step
    def step(self) -> list[Sequence]:
        """One prefill or decode step (see ``_step``), on the engine's high-priority CUDA stream."""
        if self.stream is None:
            return self._step()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))   # e.g. new weights
        with torch.cuda.stream(self.stream):
            return self._step()

    @torch.inference_mode()
    def _step(self) -> list[Sequence]:
        """One prefill or decode step. Returns the sequences that finished (in it, or -- with
        ``async_decode`` -- in the decode step before it, whose tokens are read back now).

        Async decode: a decode step samples on the device and returns without waiting for its
        tokens; the next decode step takes its input tokens from the device, is launched, and only
        then are the previous step's tokens read back (their copy finished long ago) and booked.
        The host's scheduling, staging and bookkeeping thus run while the GPU decodes. Until booked,
        a sampled token is a placeholder in ``output_ids`` (the log-probs, versions and chunks only
        ever hold booked tokens). A sequence that ends by EOS/stop token decodes one wasted row;
        ends by length are known in advance and sit out. A prefill step of waiting sequences is
        launched behind the decode step in flight the same way (a lagged prefill), and one that
        samples nothing is not waited for at all (``_unbooked``)."""
        t0 = time.perf_counter()
        if self._unbooked is not None and self._retired:
            self._book(self._unbooked)          # free quarantined pages before the scheduler needs pages
        prev, self._inflight = self._inflight, None
        finished: list[Sequence] = []
        batch, ids_from = None, None
        self.scheduler.track_rows = self.async_decode      # the lagged steps' arrays (DecodeRows)
        if prev is not None:
            try:
                batch = self.scheduler.schedule_lagged(prev.seqs, prev.rows)
            except NeedsDrain:
                batch = None
            if batch is None:                       # prefill, preemption or the end: book first
                self.stats["drains"] += 1
                finished += self._book(prev)
                prev = None
            elif not batch.is_decode:               # a lagged prefill: none of prev's sequences
                self.stats["lagged_prefills"] += 1
            elif batch.spans is batch.rows:         # made from prev's rows: every row continues one
                src = batch.rows.from_prev
                B = len(src)
                ids_from = TokensFrom(np.arange(B, dtype=np.int64), src, prev.tokens, bool(src[-1] == B - 1))
            else:
                row = prev.row
                dst, src = [], []
                for i, s in enumerate(batch.seqs):
                    r = row.get(s.seq_id)
                    if r is not None:
                        dst.append(i)
                        src.append(r)
                ids_from = TokensFrom(dst, src, prev.tokens, len(dst) == len(batch.seqs) and dst == src)
        if batch is None:
            batch = self.scheduler.schedule()
        if batch is None:
            if not finished and self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]
                raise RuntimeError(f"{self.name}: cannot admit sequence {seq.seq_id}: {self.pool.num_free} free "
                                   f"pages of {self.pool.num_pages}, and no other user of the pool frees any")
            self._account(t0)
            return finished
        kind = "decode" if batch.is_decode else "prefill"
        self.stats[f"{kind}_steps"] += 1
        if batch.is_decode and self.scheduler.waiting:
            self.stats["waiting_decode_steps"] += 1
        # a profiler range per step kind (bench/trace_phases.py --prefix engine/ splits the rollout's
        # kernels by it); nothing when no profiler runs
        with profiler_range(f"engine/{kind}"):
            launched = self._launch(batch, ids_from)
        if prev is not None:
            finished += self._book(prev)
        if batch.is_decode and self.async_decode:
            self._inflight = launched
        elif self.async_decode and not launched.seqs:
            # a prefill step that samples nothing (a chunk of a long prompt, the KV of a deferred
            # or preempted sequence): the next step is launched behind it without waiting
            self._unbooked = launched
        else:
            finished += self._book(launched)
        self._account(t0)
        for hook in self.step_hooks:
            hook(kind, t0, time.perf_counter())
        return finished

    def sync(self) -> list[Sequence]:
        """Book the decode step still on the device, if any; returns the sequences it finished.
        Called before anything that changes sequences or weights from outside the step loop."""
        if self._inflight is None:
            if self._unbooked is not None:      # the device done with it: quarantined pages free
                t0 = time.perf_counter()
                self._book(self._unbooked)
                self._account(t0)
            if self.stream is not None:
                torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            return []
        prev, self._inflight = self._inflight, None
        t0 = time.perf_counter()
        done = self._book(prev)
        self._account(t0)
        if self.stream is not None:     # work queued after this point sees the actor's writes
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return done

    def _account(self, t0: float) -> None:
        # host_s: time the host spent in step() not waiting for the device
        self.stats["host_s"] += time.perf_counter() - t0 - self._waited
        self._waited = 0.0

    def _release_pages(self, seq_id) -> None:
        """Free a sequence's pages; while a step is on the device they wait in quarantine (the step
        may still write them, and a scorer on another stream could otherwise take them)."""
        if self._inflight is None and self._unbooked is not None:
            # only a prefill that samples nothing is on the device: wait for it rather than hold
            # the pages (the scheduler frees pages to make room: held, it would preempt more)
            self._book(self._unbooked)
        if self._booked_id == self._launch_id:           # nothing on the device
            self.view.free(seq_id)
            return
        self._retire_count += 1
        key = ("retired", self._retire_count)
        if self.pool.rename((self.name, seq_id), (self.name, key)):
            self._retired.append((self._launch_id, key))

    def _free_retired(self) -> None:
        """Free quarantined pages that no step still on the device was launched before."""
        keep = []
        for launch_id, key in self._retired:
            if launch_id <= self._booked_id:
                self.view.free(key)
            else:
                keep.append((launch_id, key))
        self._retired = keep

    def _launch(self, batch, ids_from) -> "_InFlight":
        """Forward and sampling on the device; the tokens' read-back is started, not awaited."""
        self._launch_id += 1        # pages freed from now until this step is booked are quarantined
        rows = batch.rows
        if batch.is_decode:         # every row samples
            seqs = batch.seqs
            sampled_rows = None
        else:
            sampled_rows = [i for i, s in enumerate(batch.sample) if s]
            seqs = [batch.seqs[i] for i in sampled_rows]
        V = self.model.config.vocab_size
        out = None
        if self.graph_sampling and batch.is_decode and sampled_rows is None:
            needs_filter, keys, pos, temps = self._sampler_rows(seqs, V, rows)
            if not needs_filter:
                # one replay: forward, LM head and sampler, the sampler's inputs packed with the
                # step's (None: this step cannot take that path)
                out = self.runner.forward_sample(batch.spans, self.view.pages, ids_from, keys, pos, temps)
        if out is None:
            hidden = self.runner.forward(batch.spans, self.view.pages, ids_from=ids_from)
            if seqs:
                if sampled_rows is not None and len(sampled_rows) != hidden.shape[0]:
                    hidden = hidden[sampled_rows]
                logits = self.model.compute_logits(hidden)
                out = self._sample(seqs, logits, rows)
        if rows is None:
            for seq, span in zip(batch.seqs, batch.spans):
                seq.num_cached_tokens = span.start + len(span.token_ids)
        tokens = host = None
        if out is not None:
            tokens = out[0]
            # three copies into pinned memory (no stack/convert kernels on the device)
            host = self._readback.take_like(out, min_bytes=16 * self.config.max_num_seqs)
            for h, t in zip(host, out):
                h.copy_(t, non_blocking=True)
        event = None
        if self.runner.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        if rows is not None:                # each row's token goes at index n - prompt length
            idx = (rows.n - rows.plen).tolist()
            for seq, n in zip(seqs, rows.n.tolist()):
                seq.num_cached_tokens = n
                seq.output_ids.append(_PENDING)
        else:
            idx = []
            for seq in seqs:
                seq.output_ids.append(_PENDING)
                idx.append(len(seq.output_ids) - 1)
        return _InFlight(seqs, idx, self.version, tokens, host, event, self._launch_id, rows)

    def _book(self, fl: "_InFlight") -> list[Sequence]:
        """Read back a launched step's tokens and book them; returns the sequences that finished."""
        if fl.event is not None:
            t = time.perf_counter()
            fl.event.synchronize()
            self._waited += time.perf_counter() - t
        # the stream is in order: every step launched up to this one is done
        self._booked_id = max(self._booked_id, fl.launch_id)
        if self._unbooked is not None and self._unbooked.launch_id <= self._booked_id:
            self._unbooked = None
        self._free_retired()
        finished: list[Sequence] = []
        if not fl.seqs:
            return finished
        toks, lps, bad = fl.host[0].tolist(), fl.host[1].tolist(), fl.host[2].tolist()
        live = []
        version, booked, max_len = fl.version, 0, self.max_model_len
        done = SeqStatus.FINISHED
        # rows whose token cannot end them (no EOS/stop/length/context end, finite logits): booked
        # without the checks; from the step's arrays when it has them
        if fl.rows is not None:
            plain = fl.rows.plain_rows(fl.host[0].numpy(), fl.host[2].numpy(), max_len, self.eos_token_id)
        else:
            plain = [not b and s.target_len is not None and i + 1 < s.target_len and len(s.prompt_ids) + i + 1 < max_len
                     for s, i, b in zip(fl.seqs, fl.idx, bad)]
        wasted = 0
        for seq, i, tok, lp, is_bad, is_plain in zip(fl.seqs, fl.idx, toks, lps, bad, plain):
            out = seq.output_ids
            if seq.status is done or len(out) <= i:
                wasted += 1               # ended at an earlier token: this row was wasted work
                continue
            live.append(seq)
            if is_plain:
                out[i] = tok              # the common case: booked, not ending
                seq.logprobs.append(lp)
                seq.versions.append(version)
                booked += 1
                continue
            if is_bad:      # NaN/+inf logits: this request ends with an error, the others go on
                del seq.output_ids[i:]
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "error: NaN/inf in the actor's logits"
                log.error("%s: sequence %s: NaN/inf in the logits at position %d", self.name, seq.seq_id,
                          seq.num_tokens)
                finished.append(seq)
                continue
            out[i] = tok
            seq.logprobs.append(lp)
            seq.versions.append(version)
            booked += 1
            if self._check_finish(seq, i):
                del out[i + 1:]            # a later step's unread token, if any
                finished.append(seq)
        self.stats["generated_tokens"] += booked
        self.stats["wasted_rows"] += wasted
        self._emit(live)                  # (a sequence that ended earlier has had its final chunk)
        for seq in finished:
            self.scheduler.finish(seq)
        return finished

    @staticmethod
    def _sampler_rows(seqs: list[Sequence], V: int, rows: DecodeRows | None):
        """(needs_filter, keys, positions, temperatures) of the sampled rows on the host: from the
        batch's arrays when it has them (a decode batch), else from the sequences."""
        if rows is not None:
            return rows.filtered and _needs_filter([s.sampling for s in seqs], V), rows.keys, rows.n, rows.temps
        sp = [s.sampling for s in seqs]
        return (_needs_filter(sp, V), [s.sample_key for s in seqs],
                [len(s.prompt_ids) + len(s.output_ids) for s in seqs], [p.temperature for p in sp])

    def _sample_inputs(self, seqs: list[Sequence], V: int, rows: DecodeRows | None = None):
        """(needs_filter, keys, positions, temperature, top_k, top_p) of the rows over a vocabulary
        of V, staged on the device (top_k/top_p only when a row filters or the fused sampler cannot
        run). ``rows``: the batch's arrays (a decode batch: keys, positions n, temperatures)."""
        needs_filter, keys, pos, temps = self._sampler_rows(seqs, V, rows)
        # per-row parameters in two staged copies and no conversion kernels (this runs every step)
        keys, pos = self.runner.stage.many([keys, pos])
        temp = self.runner.stage(temps, torch.float32)
        if needs_filter or not (self.runner.device.type == "cuda" and sampling_triton.available()):
            sp = [s.sampling for s in seqs]
            top_k = self.runner.stage([p.top_k for p in sp], torch.int64)
            top_p = self.runner.stage([p.top_p for p in sp], torch.float32)
        else:                   # the fused sampler does not read them
            top_k = top_p = None
        return needs_filter, keys, pos, temp, top_k, top_p

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, rows: DecodeRows | None = None):
        """Sample each row on the device: (tokens [B] int64, log-probs [B] float32, NaN flags [B] bool)."""
        needs_filter, keys, pos, temp, top_k, top_p = self._sample_inputs(seqs, logits.shape[-1], rows)
        tokens, logps, bad = sample_tokens(logits, temp, top_k, top_p, self.config.seed, keys, pos,
                                           needs_filter=needs_filter)
        return tokens, logps, bad

    def _check_finish(self, seq: Sequence, i: int | None = None) -> bool:
        """Does ``seq`` end with its output token ``i`` (default: the last)?"""
        i = len(seq.output_ids) - 1 if i is None else i
        n = i + 1
        tok = seq.output_ids[i]
        reason = None
        if seq.target_len is not None:
            reason = "length" if n >= seq.target_len else None
        elif self.eos_token_id is not None and tok == self.eos_token_id and not seq.sampling.ignore_eos:
            reason = "eos"
        elif tok in seq.sampling.stop_token_ids:
            reason = "stop"
        elif n >= seq.sampling.max_new_tokens:
            reason = "length"
        if reason is None and len(seq.prompt_ids) + n >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            seq.status = SeqStatus.FINISHED
        return reason is not None

    def _emit(self, seqs: list[Sequence]) -> None:
        if not self._consumers:
            return
        chunks = []
        for seq in seqs:
            n = len(seq.logprobs)            # booked tokens only (not a step's unread placeholder)
            final = seq.status is SeqStatus.FINISHED
            if n > seq.num_emitted and (final or n - seq.num_emitted >= self.chunk_size):
                chunks.append(Chunk(seq, seq.num_emitted, n, final))
                seq.num_emitted = n
            elif final and n == seq.num_emitted:
                chunks.append(Chunk(seq, n, n, True))
        if chunks:
            for fn in self._consumers:
                fn(chunks)

    # ------------------------------------------------------------------ batch API
    def generate(self, prompts, sampling: SamplingParams | None = None, target_lens=None,
                 progress: bool = False) -> list[Sequence]:
        """Generate for every prompt; a request that cannot be served comes back with
        ``finish_reason='error: ...'`` and the others go on."""
        seqs = []
        for i, p in enumerate(prompts):
            tl = None if target_lens is None else target_lens[i]
            try:
                seqs.append(self.add_request(p, sampling, target_len=tl))
            except RequestError as e:
                s = Sequence(list(p), sampling or SamplingParams(), target_len=tl)
                s.status, s.finish_reason = SeqStatus.FINISHED, f"error: {e}"
                seqs.append(s)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="seq")
        while self.has_unfinished():
            done = self.step()
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return seqs
