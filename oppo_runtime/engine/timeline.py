"""The timeline of a step: spans (lane, name, start, end) on each stream, to see the overlap.

Two clocks. Host spans (``with tl.span(lane, name):``) use ``time.perf_counter`` relative to the
timeline's origin. CUDA spans (``cuda_span_begin`` / ``cuda_span_end``) record timing events on a
stream and cost no sync inside the step; ``resolve()`` at step end waits on the end events and
places the spans in seconds relative to a reference event recorded at ``mark_reference()`` (whose
device time is taken equal to the host time at that call: record it when the stream is idle,
at the start of the step). Events of different GPUs cannot be compared, so each device has its
own reference: ``mark_reference(stream)`` for a stream of another GPU (the scorers placed on a
second GPU) at the start of the step, or else at that device's first span. Without CUDA the
CUDA-span calls fall back to the host clock, so engine code is the same on both.

Exports: Chrome/Perfetto trace JSON (one pid per step, one tid per lane) and a Gantt PNG.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Timeline", "TimelineSpan", "stage_kind", "STAGE_COLOURS", "PIPELINE_LANES", "profiler_range"]


def profiler_range(name: str):
    """A torch.profiler range ``name`` while a profiler runs, else nothing (this is on the decode
    loop's path: a range costs microseconds even with no profiler)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()

# lanes of a PPO step that are not a scorer: the actor's, the training step's, its phases'
PIPELINE_LANES = ("actor", "train", "update")

STAGE_COLOURS = {
    "prefill": "#4C72B0", "decode": "#55A868", "score": "#DD8452",
    "train": "#C44E52", "other": "#8C8C8C",
}
_KIND_WORDS = (
    ("prefill", ("prefill",)),
    ("train", ("train", "update", "backward", "optim", "adv", "gae")),
    ("decode", ("decode", "generate", "gen")),
    ("score", ("score", "reward", "value", "critic", "ref")),
)


def stage_kind(name: str) -> str:
    """prefill / decode / score / train / other, from words in a span's name."""
    low = name.lower()
    for kind, words in _KIND_WORDS:
        if any(w in low for w in words):
            return kind
    return "other"


@dataclass
class TimelineSpan:
    lane: str
    name: str
    start_s: float
    end_s: float
    args: dict = field(default_factory=dict)
    step: int = 0

    @property
    def kind(self) -> str:
        return self.args.get("kind") or stage_kind(self.name)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class Timeline:
    def __init__(self, step: int = 0, use_cuda: bool | None = None, event_factory=None):
        self.step = step
        self.spans: list[TimelineSpan] = []
        self.t0 = time.perf_counter()
        self.use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        # event_factory() -> an object with record(stream), synchronize(), elapsed_time(other) in ms
        self._new_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._real_events = event_factory is None
        self._refs: dict = {}         # device index -> (event, host seconds since t0)
        self._open: dict[tuple[str, str], tuple] = {}
        self._pending: list[tuple] = []

    # ------------------------------------------------------------------ recording
    def clear(self) -> None:
        """Forget everything recorded so far: spans, and CUDA spans not yet resolved (a warm-up's
        events would otherwise turn into spans at the next resolve())."""
        if self._open:
            raise RuntimeError(f"clear() with spans still open: {sorted(self._open)}")
        self.spans.clear()
        self._pending.clear()
        self._refs.clear()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, lane: str, name: str, start_s: float, end_s: float, step: int | None = None,
            **args) -> TimelineSpan:
        if end_s < start_s:
            raise ValueError(f"span {lane}/{name} ends before it starts ({end_s} < {start_s})")
        step = self.step if step is None else step
        span = TimelineSpan(lane, name, float(start_s), float(end_s), args, step)
        self.spans.append(span)
        return span

    def span(self, lane: str, name: str, **args):
        return _HostSpan(self, lane, name, args)

    def _device_of(self, stream):
        """The GPU a stream belongs to (None: the current one; test doubles have no device)."""
        dev = getattr(stream, "device", None)
        if dev is not None:
            return getattr(dev, "index", dev)
        return torch.cuda.current_device() if self._real_events else None

    def mark_reference(self, stream=None):
        """Record the CUDA reference event of ``stream``'s device (device zero = host time now)."""
        if self.use_cuda:
            ev = self._new_event()
            ev.record(stream)
            self._refs[self._device_of(stream)] = (ev, self.now())

    def cuda_span_begin(self, lane: str, name: str, stream=None, **args):
        key = (lane, name)
        if key in self._open:
            raise RuntimeError(f"span {lane}/{name} is already open")
        if not self.use_cuda:
            self._open[key] = (None, self.now(), args)
            return
        dev = self._device_of(stream)
        if dev not in self._refs:
            self.mark_reference(stream)
        ev = self._new_event()
        ev.record(stream)
        self._open[key] = (ev, dev, args)

    def cuda_span_end(self, lane: str, name: str, stream=None, as_name: str | None = None):
        """End the span begun as (lane, name); ``as_name`` renames it (what it turned out to be)."""
        try:
            start_ev, where, args = self._open.pop((lane, name))   # where: host start, or the device
        except KeyError:
            raise RuntimeError(f"span {lane}/{name} was not begun") from None
        name = as_name or name
        if start_ev is None:
            self.add(lane, name, where, self.now(), **args)
            return
        end_ev = self._new_event()
        end_ev.record(stream)
        self._pending.append((lane, name, start_ev, end_ev, where, args))

    def resolve(self) -> "Timeline":
        """Turn recorded CUDA events into spans; call after the step's work is done."""
        if self._open:
            raise RuntimeError(f"spans still open at resolve: {sorted(self._open)}")
        if self._pending:
            for lane, name, start_ev, end_ev, dev, args in self._pending:
                ref_ev, ref_host = self._refs[dev]
                end_ev.synchronize()
                start = ref_host + ref_ev.elapsed_time(start_ev) / 1e3
                end = ref_host + ref_ev.elapsed_time(end_ev) / 1e3
                self.add(lane, name, start, end, **args)
            self._pending.clear()
        return self

    # ------------------------------------------------------------------ queries
    @property
    def lanes(self) -> list[str]:
        return list(dict.fromkeys(s.lane for s in self.spans))

    def extent(self) -> tuple[float, float]:
        if not self.spans:
            return 0.0, 0.0
        return min(s.start_s for s in self.spans), max(s.end_s for s in self.spans)

    def busy_s(self, lane: str) -> float:
        """Seconds the lane is busy: the union of its spans (overlapping spans count once)."""
        return self.union_s([lane])

    def scorer_lanes(self) -> list[str]:
        """Every lane but the actor's and training's (each scorer records on a lane of its name)."""
        return [lane for lane in self.lanes if lane not in PIPELINE_LANES]

    def _merged(self, lanes) -> list[list[float]]:
        return _merge((s.start_s, s.end_s) for s in self.spans if s.lane in lanes)

    def union_s(self, lanes=None) -> float:
        """Seconds when any of ``lanes`` (default: all) is busy."""
        return _length(self._merged(self.lanes if lanes is None else lanes))

    def overlap_s(self, lanes, under) -> float:
        """Seconds when one of ``lanes`` and one of ``under`` are busy together."""
        return _overlap(self._merged(lanes), self._merged(under))

    def hidden_fraction(self, under=("actor",)) -> float:
        """The share of the scorers' busy seconds (summed over scorer lanes) that ran while the
        actor was busy: scoring hidden under decode. 0 without scorer spans."""
        lanes = self.scorer_lanes()
        total = sum(self.busy_s(lane) for lane in lanes)
        return sum(self.overlap_s([lane], under) for lane in lanes) / total if total else 0.0

    def exposed_s(self, under=("actor",)) -> float:
        """Seconds when a scorer ran and the actor did not: scoring on the critical path."""
        lanes = self.scorer_lanes()
        return self.union_s(lanes) - self.overlap_s(lanes, under)

    def busy_fraction(self, lane: str, window: tuple[float, float] | None = None) -> float:
        """Busy seconds of the lane inside the window over the window's length
        (default window: the whole timeline, all lanes)."""
        lo, hi = window if window is not None else self.extent()
        if hi <= lo:
            return 0.0
        busy = _length(_merge((max(s.start_s, lo), min(s.end_s, hi)) for s in self.spans
                                      if s.lane == lane and s.end_s > lo and s.start_s < hi))
        return busy / (hi - lo)

    def merge(self, other: "Timeline", offset: float | None = None) -> "Timeline":
        """Add ``other``'s spans shifted by ``offset`` seconds (default: right after this
        timeline's end, so consecutive steps line up). Spans keep their step. Returns self."""
        if offset is None:
            offset = self.extent()[1] - other.extent()[0] if self.spans else 0.0
        for s in other.spans:
            self.spans.append(TimelineSpan(s.lane, s.name, s.start_s + offset, s.end_s + offset,
                                           dict(s.args), s.step))
        return self

    # ------------------------------------------------------------------ export
    def to_chrome_trace(self, path: str | os.PathLike) -> Path:
        """Chrome/Perfetto trace JSON ("X" events, microseconds); open in ui.perfetto.dev."""
        lanes = {lane: i for i, lane in enumerate(self.lanes)}
        events = []
        for step in sorted({s.step for s in self.spans}):
            events.append({"ph": "M", "name": "process_name", "pid": step, "tid": 0,
                           "args": {"name": f"step {step}"}})
            for lane, tid in lanes.items():
                events.append({"ph": "M", "name": "thread_name", "pid": step, "tid": tid,
                               "args": {"name": lane}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": step, "tid": tid,
                               "args": {"sort_index": tid}})
        for s in self.spans:
            events.append({"ph": "X", "name": s.name, "cat": s.kind, "pid": s.step, "tid": lanes[s.lane],
                           "ts": s.start_s * 1e6, "dur": s.duration_s * 1e6,
                           "args": {k: _jsonable(v) for k, v in s.args.items()}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path

    def to_png(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Gantt chart: one row per lane, colour per stage kind, time in ms, busy share per lane."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        lanes = self.lanes
        lo, hi = self.extent()
        total_ms = max((hi - lo) * 1e3, 1e-9)
        fig = Figure(figsize=(11, 1.0 + 0.55 * max(len(lanes), 1)), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ms_per_px = total_ms / 1100               # the axis is ~1100 pixels wide
        for row, lane in enumerate(lanes):
            y = len(lanes) - 1 - row              # first lane on top
            # a decode lane holds thousands of ~ms spans: drawn one by one they took seconds and,
            # each edged in white, came out as a pale band; runs of one name closer than a
            # pixel are drawn as one bar (solid colour), a white edge only between real gaps
            for run in _runs(sorted((s for s in self.spans if s.lane == lane), key=lambda s: s.start_s),
                             ms_per_px / 1e3):
                x0, w = (run.start_s - lo) * 1e3, run.duration_s * 1e3
                ax.broken_barh([(x0, max(w, ms_per_px))], (y - 0.38, 0.76),
                               facecolors=STAGE_COLOURS.get(run.kind, STAGE_COLOURS["other"]),
                               edgecolor="white", linewidth=0.4 if w > 3 * ms_per_px else 0.0)
                if len(run.name) * 6 * ms_per_px < w:     # label a bar that its name fits in
                    ax.text(x0 + w / 2, y, run.name, ha="center", va="center", fontsize=7, color="white",
                            clip_on=True)
            ax.text(1.005, (y + 0.5) / len(lanes), f"busy {100 * self.busy_fraction(lane):.0f}%\n"
                    f"{self.busy_s(lane) * 1e3:.1f} ms", transform=ax.transAxes, va="center", fontsize=7)
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels(list(reversed(lanes)), fontsize=8)
        ax.set_ylim(-0.6, len(lanes) - 0.4)
        ax.set_xlim(0, total_ms)
        ax.set_xlabel("time (ms)")
        ax.grid(axis="x", alpha=0.3)
        kinds = [k for k in STAGE_COLOURS if any(s.kind == k for s in self.spans)]
        ax.legend(handles=[Patch(color=STAGE_COLOURS[k], label=k) for k in kinds], fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(lanes) > 2 else -0.4),
                  ncol=max(len(kinds), 1), frameon=False)
        ax.set_title(f"{title or f'step {self.step}'} — total {total_ms:.1f} ms", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
        return path


class _HostSpan:
    def __init__(self, tl: Timeline, lane: str, name: str, args: dict):
        self.tl, self.lane, self.name, self.args = tl, lane, name, args

    def __enter__(self):
        self.start = self.tl.now()
        return self

    def __exit__(self, *exc):
        self.tl.add(self.lane, self.name, self.start, self.tl.now(), **self.args)


def _runs(spans: list[TimelineSpan], gap_s: float) -> list[TimelineSpan]:
    """Consecutive spans of one name and kind with gaps up to ``gap_s`` as one span per run,
    named with how many it holds ("decode x812"); spans of other names (the update's phases,
    a prefill between decodes) stay apart."""
    out: list[TimelineSpan] = []
    counts: list[int] = []
    for s in spans:
        last = out[-1] if out else None
        if last is not None and (s.name, s.kind) == (last.name, last.kind) and s.start_s - last.end_s <= gap_s:
            last.end_s = max(last.end_s, s.end_s)
            counts[-1] += 1
        else:
            out.append(TimelineSpan(s.lane, s.name, s.start_s, s.end_s, {"kind": s.kind}, s.step))
            counts.append(1)
    for run, n in zip(out, counts):
        if n > 1:
            run.name = f"{run.name} x{n}"
    return out


def _merge(intervals) -> list[list[float]]:
    """Sorted, disjoint [start, end] covering the same seconds."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(merged) -> float:
    return sum(b - a for a, b in merged)


def _overlap(x, y) -> float:
    """Seconds common to two merged interval lists (one pass over both)."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)
