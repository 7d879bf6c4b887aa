"""What users watch: per-step metrics to JSONL, TensorBoard and the console; stage timers; the
reward curve. Metric names are listed and defined in docs/metrics.md."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["MetricsLogger", "StageTimer", "plot_reward_curve", "read_metrics", "CONSOLE_KEYS"]

log = logging.getLogger(__name__)

# key -> short label on the console line
CONSOLE_KEYS = {
    "objective/scores": "score",
    "objective/kl": "kl",
    "objective/entropy": "ent",
    "policy/clipfrac_avg": "clip",
    "loss/policy_avg": "pg",
    "loss/value_avg": "vf",
    "val/explained_variance": "ev",
    "response_length/mean": "len",
    "oppo/chunk_size": "C",
    "oppo/delta": "Δ",
    "timing_s/step": "t",
    "perf/throughput": "tok/s",
}


def _to_floats(metrics: dict) -> dict[str, float]:
    """Scalars (numbers, 0-dim or 1-element tensors) to floats, one device transfer per device."""
    out, tensors = {}, defaultdict(list)
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise TypeError(f"metric {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
            tensors[v.device].append((k, v.detach().reshape(()).float()))
        elif isinstance(v, (int, float, bool)):
            out[k] = float(v)
        else:
            raise TypeError(f"metric {k!r} must be a number or a scalar tensor, got {type(v).__name__}")
    for pairs in tensors.values():
        for (k, _), x in zip(pairs, torch.stack([v for _, v in pairs]).tolist()):
            out[k] = x
    return out


class MetricsLogger:
    """``log(step, metrics)`` appends one JSON line to ``out_dir/metrics.jsonl`` (flushed), writes
    scalars to TensorBoard under ``out_dir/tb`` and prints a compact console line.

    JSON lines carry ``step`` and ``wall_time`` (unix seconds); NaN/inf are written as null (strict
    JSON). ``truncate_after`` (when resuming from a checkpoint at that step) drops lines and
    TensorBoard events of later steps that a killed run left behind, so the curve has no duplicates.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, console: bool = True,
                 console_keys: dict[str, str] | None = None, truncate_after: int | None = None,
                 print_fn=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if truncate_after is not None and self.path.exists():
            _truncate_jsonl(self.path, truncate_after)
        self._file = open(self.path, "a", encoding="utf-8")
        self.console = console
        self.console_keys = CONSOLE_KEYS if console_keys is None else console_keys
        self._print = print_fn or _default_print()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if truncate_after is None else truncate_after + 1
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)
            except ImportError as e:   # tensorboard not installed
                log.warning("TensorBoard logging disabled: %s", e)

    def log(self, step: int, metrics: dict) -> dict[str, float]:
        values = _to_floats(metrics)
        record = {"step": int(step), "wall_time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self.console:
            self._print(self.console_line(step, values))
        return values

    def console_line(self, step: int, values: dict[str, float]) -> str:
        parts = [f"step {step}"]
        parts += [f"{label} {_fmt(values[k])}" for k, label in self.console_keys.items() if k in values]
        return " | ".join(parts)

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StageTimer:
    """Accumulates seconds per named stage: ``with timer("gen"): ...`` then ``timer.metrics()``
    gives ``{"timing_s/gen": ...}``; a stage entered twice adds up.

    Host clock by default: it measures when the host leaves the block, so asynchronous CUDA work
    still queued is not counted. With ``cuda_events=True`` (and CUDA present) each block records a
    start/end ``torch.cuda.Event`` on ``stream`` (default: the current one) and nothing syncs until
    ``metrics()``, which waits on the end events only (no device-wide sync).
    """

    def __init__(self, cuda_events: bool = False):
        self.cuda_events = bool(cuda_events) and torch.cuda.is_available()
        self._seconds: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str, stream=None):
        with torch.profiler.record_function(f"stage/{name}"):     # labels the stage in profiles
            yield from self._timed(name, stream)

    def _timed(self, name: str, stream):
        if self.cuda_events:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        for name, start, end in self._pending:
            end.synchronize()
            self._seconds[name] += start.elapsed_time(end) / 1e3
        self._pending.clear()
        return dict(self._seconds)

    def metrics(self, prefix: str = "timing_s/") -> dict[str, float]:
        return {prefix + k: v for k, v in self.seconds().items()}

    def reset(self):
        self._seconds.clear()
        self._pending.clear()


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (killed run) is skipped."""
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_reward_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                      keys=("objective/scores",), x: str = "step", title: str | None = None,
                      smooth: int = 0) -> Path:
    """PNG of the given metrics against ``x`` ("step", or "time": seconds since the first line).
    A key ``k`` with a ``k_std`` companion gets a ±std band; ``smooth`` > 1 adds a moving mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    records = read_metrics(jsonl_path)
    t0 = records[0]["wall_time"] if records else 0.0
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in keys:
        rows = [r for r in records if r.get(key) is not None]
        xs = [r["step"] if x == "step" else r["wall_time"] - t0 for r in rows]
        ys = [r[key] for r in rows]
        line, = ax.plot(xs, ys, lw=1.2, label=key, alpha=0.5 if smooth > 1 else 1.0)
        std = [r.get(key + "_std") for r in rows]
        if ys and all(s is not None for s in std):
            ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                            color=line.get_color(), alpha=0.15, lw=0)
        if smooth > 1 and len(ys) >= smooth:
            sm = [sum(ys[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(ys))]
            ax.plot(xs[smooth - 1:], sm, color=line.get_color(), lw=2, label=f"{key} (mean of {smooth})")
    ax.set_xlabel("step" if x == "step" else "wall time (s)")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    ax.set_title(title or f"{', '.join(keys)} — {Path(jsonl_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path


def _truncate_jsonl(path: Path, last_step: int):
    keep = [r for r in read_metrics(path) if r.get("step", -1) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}"


def _default_print():
    try:
        from tqdm import tqdm
        return tqdm.write          # does not break a running progress bar
    except ImportError:
        return print
