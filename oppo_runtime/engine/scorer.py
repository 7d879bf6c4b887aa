"""Scorers: downstream models that prefill the actor's output chunk by chunk.

Each scorer keeps its own KV of every sequence in the shared pool and, as chunks arrive,
prefills only the new tokens against the cached prefix (prompt first, then chunk after chunk).
When a sequence ends, only its last chunk is left to prefill.

What each kind produces, aligned with the response tokens (output token j, at absolute position
P+j where P is the prompt length):
  * "reference": log p_ref(output[j] | tokens before it)  -> hidden state at position P+j-1;
  * "critic":    value V_j                                 -> hidden state at position P+j-1;
  * "reward":    one scalar, the score head at the last token (position P+T-1).
So a scorer always holds back the newest known token (its hidden state would predict a token
not generated yet); only the reward model feeds the very last token, once the sequence ends.

Rule rewards (Python callables on the finished response) run in a thread pool, off the
critical path; an exception is reported with the sequence it came from.

``graphs`` (default on, env ``OPPO_SCORER_GRAPHS=0`` turns it off; measured 1.5-4% faster than
eager in bench/intra_overlap.py, sessions 7 and 10): on a CUDA device the chunk prefill replays
CUDA graphs over bucketed shapes (``runner._prefill_bucket``) instead of launching ~10 kernels
per layer from Python; where graphs cannot run (the CPU, no attention kernels) the scorer says
so in the log and runs eager.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..memory import KVGeometry, PagePool, PoolExhausted
from .runner import ModelRunner, Span
from .sequence import Chunk, Sequence

__all__ = ["Scorer", "RuleReward", "ScoreError", "SCORER_KINDS"]

log = logging.getLogger("oppo_runtime.engine")

SCORER_KINDS = ("reward", "critic", "reference")


class ScoreError(RuntimeError):
    """A scorer produced an invalid result (NaN/inf) or a rule reward raised."""


@dataclass(eq=False)       # identity hashing: states are keys of in-flight bookkeeping
class _SeqState:
    seq: Sequence
    known: int = 0            # tokens of the sequence this scorer may read (prompt + emitted output)
    fed: int = 0              # tokens prefilled into this scorer's pages
    final: bool = False
    values: list[float] = field(default_factory=list)    # per response token (critic / reference)
    inflight: int = 0         # results computed on the device, not read back yet
    score: float | None = None
    error: str | None = None



def _token_slice(seq: Sequence, a: int, b: int) -> list[int]:
    """Tokens a..b-1 of the sequence (prompt then output): ``[seq.token_at(i) for i in range(a, b)]``."""
    P = len(seq.prompt_ids)
    if b <= P:
        return seq.prompt_ids[a:b]
    if a >= P:
        return seq.output_ids[a - P:b - P]
    return seq.prompt_ids[a:] + seq.output_ids[:b - P]


def _graphs_from_env() -> bool | None:
    """OPPO_SCORER_GRAPHS: 0 or 1, or None when unset (the default, graphs on)."""
    v = os.environ.get("OPPO_SCORER_GRAPHS", "").strip()
    if v == "":
        return None
    if v in ("0", "1"):
        return v == "1"
    raise ValueError(f"OPPO_SCORER_GRAPHS={v!r}: expected 0 or 1")


class Scorer:
    def __init__(self, name: str, model, pool: PagePool, kind: str, *, max_model_len: int,
                 max_num_batched_tokens: int = 8192, temperature: float = 1.0, own_stream: bool = True,
                 final_value: bool = False, graphs: bool | None = None):
        if kind not in SCORER_KINDS:
            raise ValueError(f"scorer {name!r}: kind must be one of {SCORER_KINDS}, got {kind!r}")
        self.name, self.model, self.kind = name, model, kind
        self.pool = pool
        L, Hkv, D = model.kv_geometry()
        self.view = pool.views.get(name) or pool.register(name, KVGeometry(L, Hkv, D, next(model.parameters()).dtype))
        asked = _graphs_from_env() if graphs is None else bool(graphs)   # None: the default
        want_graphs = asked is not False
        # decode graphs are irrelevant here (no graph_batch_sizes); prefill graphs only if asked
        self.runner = ModelRunner(model, self.view, max_model_len, enforce_eager=not want_graphs,
                                  prefill_graphs=want_graphs, max_prefill_tokens=max_num_batched_tokens)
        self.graphs = self.runner.use_prefill_graphs
        if self.graphs:
            log.info("scorer %s: chunk prefill in CUDA graphs", name)
        elif asked:
            log.warning("scorer %s: CUDA graphs requested but chunk prefill runs eager: %s", name,
                        self.runner.prefill_graphs_off_reason)
        else:
            log.info("scorer %s: chunk prefill eager (%s)", name, "graphs off" if asked is False else
                     self.runner.prefill_graphs_off_reason)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.temperature = temperature          # reference log-probs use the actor's sampling temperature
        if final_value and kind != "critic":
            raise ValueError(f"scorer {name!r}: final_value is for critics (V after the last token)")
        self.final_value = final_value          # critic: one more value, after the last token (TRL reads it)
        self.device = next(model.parameters()).device
        # its own CUDA stream, so that its prefill overlaps the actor's decode (stream B)
        self.stream = torch.cuda.Stream(self.device) if (own_stream and self.device.type == "cuda") else None
        self.states: dict[int, _SeqState] = {}
        self._pending: list = []      # (owners, host values, event) awaiting read-back
        self.busy_s = 0.0
        self.tokens_prefilled = 0

    # ------------------------------------------------------------------ input
    def submit(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            st = self.states.get(c.seq.seq_id)
            if st is None:
                st = self.states[c.seq.seq_id] = _SeqState(c.seq)
            st.known = len(c.seq.prompt_ids) + c.end
            st.final = st.final or c.final

    def _want(self, st: _SeqState) -> int:
        if st.error is not None:
            return st.fed
        if self.kind == "reward" or self.final_value:
            return st.known if st.final else st.known - 1
        return st.known - 1

    def pending_tokens(self, only: set[int] | None = None) -> int:
        return sum(max(0, self._want(st) - st.fed) for st in self.states.values()
                   if only is None or st.seq.seq_id in only)

    def done(self, seq_id: int) -> bool:
        st = self.states.get(seq_id)
        if st is None or not st.final:
            return False
        if st.error is not None:
            return True
        if st.inflight:
            return False
        if self.kind == "reward":
            return st.score is not None
        return st.fed >= self._want(st)

    # ------------------------------------------------------------------ work
    @torch.inference_mode()
    def step(self, max_tokens: int | None = None, only: set[int] | None = None) -> int:
        """Prefill pending tokens of as many sequences as fit the token budget (oldest first; only
        the sequences in ``only`` if given). Returns tokens fed."""
        budget = min(max_tokens or self.max_num_batched_tokens, self.max_num_batched_tokens)
        spans, states = [], []
        for st in sorted(self.states.values(), key=lambda s: s.seq.admit_order):
            if only is not None and st.seq.seq_id not in only:
                continue
            want = self._want(st)
            n = min(want - st.fed, budget)
            if n <= 0:
                continue
            try:
                self.view.ensure(st.seq.seq_id, st.fed + n)
            except PoolExhausted:
                break                 # wait for pages (the actor frees finished sequences)
            spans.append(Span(st.seq.seq_id, _token_slice(st.seq, st.fed, st.fed + n), st.fed))
            states.append(st)
            budget -= n
            if budget <= 0:
                break
        if not spans:
            return 0
        hidden = self.runner.forward(spans, self.view.pages, last_only=False)
        self._consume(spans, states, hidden)
        fed = sum(len(s.token_ids) for s in spans)
        self.tokens_prefilled += fed
        return fed

    def _consume(self, spans: list[Span], states: list[_SeqState], hidden: torch.Tensor) -> None:
        # ranges and slices, not a Python loop per token: this runs on the scorer thread under the
        # GIL, while the actor's decode loop waits for it
        rows, nexts, owners = [], [], []          # owners: (state, number of consecutive rows)
        row = 0
        for sp, st in zip(spans, states):
            n = len(sp.token_ids)
            end = sp.start + n
            if self.kind == "reward":
                i = st.known - 1 - sp.start
                if st.final and 0 <= i < n:
                    rows.append(row + i)
                    owners.append((st, 1))
            else:
                first = max(sp.start, len(st.seq.prompt_ids) - 1)   # the state before response token pos+1-P
                if first < end:
                    rows.extend(range(row + first - sp.start, row + n))
                    if self.kind == "reference":
                        nexts.extend(_token_slice(st.seq, first + 1, end + 1))
                    owners.append((st, end - first))
            row += n
            st.fed = end
        if not rows:
            return
        stage = self.runner.stage
        h = hidden[stage(rows, torch.int64)]
        if self.kind == "reference":
            vals = self.model.compute_logprobs(h, stage(nexts, torch.int64), self.temperature)
        else:
            vals = self.model.compute_scores(h)
        self._read_back(owners, vals)

    def _read_back(self, owners: list[tuple[_SeqState, int]], vals: torch.Tensor) -> None:
        """Queue device results for their sequences (``owners``: runs of consecutive rows of one
        sequence), without a host sync; poll() finishes it."""
        for st in {st for st, _ in owners}:
            st.inflight += 1
        if vals.device.type == "cuda":
            host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
            host.copy_(vals, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending.append((owners, host, ev))
        else:
            self._pending.append((owners, vals, None))
            self.poll()

    def poll(self, wait: bool = False) -> None:
        """Move finished device results into the sequences' states (in order)."""
        while self._pending:
            owners, vals, ev = self._pending[0]
            if ev is not None:
                if wait:
                    ev.synchronize()
                elif not ev.query():
                    return
            self._pending.pop(0)
            flat = vals.double().tolist()
            o = 0
            for st, k in owners:                 # a slice per run, not a Python step per token
                part = flat[o:o + k]
                o += k
                if st.error is None and not all(map(math.isfinite, part)):
                    v = next(x for x in part if not math.isfinite(x))
                    st.error = f"{self.name}: non-finite {self.kind} output {v} for sequence {st.seq.seq_id}"
                    log.error(st.error)
                if self.kind == "reward":
                    st.score = part[-1]
                else:
                    st.values.extend(part)
            for st in {st for st, _ in owners}:
                st.inflight -= 1
                if self.done(st.seq.seq_id):         # its KV is no longer needed: pages go back now
                    self.view.free(st.seq.seq_id)

    # ------------------------------------------------------------------ output and pages
    def result(self, seq_id: int):
        """'reward': the score; 'critic'/'reference': one float per response token.

        Raises ScoreError if the scorer saw a NaN/inf for this sequence."""
        st = self.states[seq_id]
        if st.error is not None:
            raise ScoreError(st.error)
        return st.score if self.kind == "reward" else list(st.values)

    def _quiesce(self) -> None:
        """Before pages go back to the pool, the device work that writes them must be done."""
        if self.stream is not None:
            self.stream.synchronize()
        elif self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.poll(wait=True)

    def release(self, seq_id: int) -> None:
        """Forget a sequence (its result was taken) and free its pages."""
        self._quiesce()
        self.view.free(seq_id)
        self.states.pop(seq_id, None)

    def pages_needed(self, seq_id: int) -> int:
        """Pages this scorer still has to get for ``seq_id``'s pending tokens."""
        st = self.states.get(seq_id)
        if st is None:
            return 0
        return max(0, self.view.pages_for_tokens(self._want(st)) - len(self.view.pages(seq_id)))

    def evict(self, n_pages: int, protect: frozenset = frozenset()) -> int:
        """Free at least ``n_pages`` pages (pool pressure) by dropping the KV of the youngest
        unfinished sequences; they are recomputed from their tokens later. Returns pages freed."""
        self._quiesce()
        freed = 0
        for st in sorted(self.states.values(), key=lambda s: -s.seq.admit_order):
            if freed >= n_pages:
                break
            if st.seq.seq_id in protect:
                continue
            pages = len(self.view.pages(st.seq.seq_id))
            if pages and not self.done(st.seq.seq_id):
                self.view.free(st.seq.seq_id)
                self._reset(st)
                freed += pages
        return freed

    def invalidate(self) -> None:
        """The model's weights changed (the critic after an update): drop every sequence's KV and
        results; each is re-prefilled from its tokens, so its values come from the new weights."""
        self._quiesce()
        self.follow_weights()
        for st in self.states.values():
            self.view.free(st.seq.seq_id)
            self._reset(st)
            st.error = None

    def follow_weights(self) -> None:
        """The model's weights were just written, on the calling thread's current stream (the
        optimizer step, or the copy from the training GPU): this scorer's next prefill, on its own
        stream, must come after that write. Prefill graphs read the weights where they were at
        capture: in-place updates reach them; replaced tensors drop the graphs."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.runner.check_weights()

    def _reset(self, st: _SeqState) -> None:
        st.fed = 0
        st.values = []
        st.score = None


class RuleReward:
    """A Python reward on the finished response, run in a worker thread.

    ``fn(prompt_ids, response_ids, text) -> float`` where text is the decoded response if a
    tokenizer is given, else None.
    """

    def __init__(self, fn: Callable, tokenizer=None, name: str = "rule", max_workers: int = 2):
        self.fn, self.tokenizer, self.name = fn, tokenizer, name
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"oppo-{name}")
        self.futures: dict[int, Future] = {}

    def submit(self, seq: Sequence) -> None:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer is not None else None
        self.futures[seq.seq_id] = self.pool.submit(self.fn, list(seq.prompt_ids), list(seq.output_ids), text)

    def done(self, seq_id: int) -> bool:
        f = self.futures.get(seq_id)
        return f is not None and f.done()

    def result(self, seq_id: int) -> float:
        f = self.futures.pop(seq_id)
        try:
            v = float(f.result())
        except Exception as e:  # noqa: BLE001  (a user's reward function may raise anything)
            raise ScoreError(f"rule reward {self.name!r} raised on sequence {seq_id}: {type(e).__name__}: {e}") from e
        if not math.isfinite(v):
            raise ScoreError(f"rule reward {self.name!r} returned {v} for sequence {seq_id}")
        return v
