"""Online controllers of the overlap: Δ (overcommit) and the chunk size C."""
from __future__ import annotations

import math
from collections import deque

__all__ = ["DeltaController", "ChunkSizeController"]


class DeltaController:
    """Δ extra prompts in flight (the paper's rule): grow Δ by one while the windowed trend of the
    mean reward rises, shrink it toward Δmin when the trend flattens or falls.

    The trend is the least-squares slope of the last ``window`` mean rewards, compared with
    ``tolerance`` times their standard deviation per step (a scale-free "is it still rising").
    """

    def __init__(self, delta_init: int, delta_min: int, delta_max: int, window: int = 5, tolerance: float = 0.05):
        self.delta, self.delta_min, self.delta_max = delta_init, delta_min, delta_max
        self.window, self.tolerance = window, tolerance
        self.history: deque[float] = deque(maxlen=window)

    def update(self, mean_reward: float) -> int:
        self.history.append(float(mean_reward))
        if len(self.history) >= max(3, self.window):
            ys = list(self.history)
            n = len(ys)
            xm, ym = (n - 1) / 2, sum(ys) / n
            slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))
            spread = math.sqrt(sum((y - ym) ** 2 for y in ys) / n) + 1e-8
            if slope > self.tolerance * spread:
                self.delta = min(self.delta + 1, self.delta_max)
            else:
                self.delta = max(self.delta - 1, self.delta_min)
        return self.delta

    def state_dict(self) -> dict:
        return {"delta": self.delta, "history": list(self.history)}

    def load_state_dict(self, d: dict) -> None:
        self.delta = d["delta"]
        self.history = deque(d["history"], maxlen=self.window)


class ChunkSizeController:
    """Picks C from a cost model of the last step's measured timings, without trial steps.

    Each scorer call costs ``o + p * tokens`` (a fixed launch/host overhead ``o`` plus ``p`` per
    token); the actor's decode step takes ``d`` with ``b`` sequences decoding. Streaming every C
    steps hands the scorers ``b * C`` tokens per C decode steps; they keep up (and stay hidden)
    while ``o + p*b*C <= C*d``, i.e. ``C >= o / (d - p*b)``. Anything larger only lengthens the
    tail left when the last sequence ends (``o + p*C`` per scorer), so the smallest such C wins.
    When ``d <= p*b`` the scorers cannot keep up at any C (prefill slower than decode): the
    largest C is used, i.e. sequential. Candidates are powers of two within [c_min, c_max].

    The fixed cost ``o`` of a call also slows the actor on the same GPU and host (the scorer thread
    holds the GIL while it launches; its kernels share the SMs): ``n`` scorers calling every C
    steps cost the decode about ``n*o / (C*d)`` of its time. So C is also at least
    ``n*o / (max_interference * d)``. Without this term the model fed on itself on an H100: the
    interference lengthened ``d``, which lowered the C that keeps up, which added calls, down to
    C=4-8 and a rollout 2-3x slower than with C=256-1024 (bench/RESULTS.md, 2026-11-25).
    """

    def __init__(self, initial: int, c_min: int = 1, c_max: int = 1024, adaptive: bool = True,
                 max_interference: float = 0.05):
        self.chunk_size, self.c_min, self.c_max, self.adaptive = initial, c_min, c_max, adaptive
        self.max_interference = max_interference
        self.last_model: dict = {}

    @staticmethod
    def fit(calls: list[tuple[int, float]]) -> tuple[float, float]:
        """Least-squares ``seconds = o + p * tokens`` over (tokens, seconds) of scorer calls."""
        n = len(calls)
        xm = sum(t for t, _ in calls) / n
        ym = sum(s for _, s in calls) / n
        var = sum((t - xm) ** 2 for t, _ in calls)
        p = sum((t - xm) * (s - ym) for t, s in calls) / var if var > 0 else 0.0
        p = max(p, 0.0)
        o = max(ym - p * xm, 0.0)
        return o, p

    def update(self, decode_s: float, decode_steps: int, mean_batch: float,
               scorer_calls: list[tuple[int, float]], num_scorers: int = 1) -> int:
        if not self.adaptive or decode_steps == 0 or len(scorer_calls) < 2:
            return self.chunk_size
        d = decode_s / decode_steps
        o, p = self.fit(scorer_calls)
        room = d - p * mean_batch
        c = self.c_max if room <= 0 else o / room
        if d > 0:
            c = max(c, num_scorers * o / (self.max_interference * d))
        c = min(self.c_max, max(self.c_min, c))
        self.chunk_size = min(self.c_max, max(self.c_min, 1 << max(0, math.ceil(math.log2(c)))))
        self.last_model = {"decode_step_s": d, "scorer_overhead_s": o, "scorer_token_s": p,
                           "chunk_size": self.chunk_size}
        return self.chunk_size

    def state_dict(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def load_state_dict(self, d: dict) -> None:
        self.chunk_size = d["chunk_size"]
