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
    """Picks C from a cost model of the last step's measured timings, without trial steps, and
    checks the model now and then with an online trial (the paper's rule) that can overrule it.

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

    The model cannot decide with fewer than 2 scorer calls or a degenerate fit (no decode time,
    zero or non-finite costs; before the trial existed these gave c_min or c_max): C is then kept,
    and the trial rounds alone move it (the trial as the model's fallback).

    Online trial (needs ``rollout_s``, the step's rollout wall seconds; compared per actor step,
    ``rollout_s / decode_steps``, so steps of different response lengths compare fairly). After
    every ``trial_every`` measured steps outside a round (0: never) a round tries, one step each,
    the candidates ``c/2, c, 2c`` (clipped to [c_min, c_max]) around c = the model's pick, or the
    pinned or kept C while pinned or without a pick, plus the model's pick when it differs (so a
    pinned round still tests the model). The step that
    started the round counts as the measurement of the C it ran with; a step without ``rollout_s``
    runs its candidate again (without it no round starts: the model alone, as before). At the end:

    - the model's pick (as the round started) is the fastest or within ``trial_margin`` of it:
      the model stays in charge;
    - otherwise C is pinned (the model is overruled, or could not decide) to the round's centre
      while that is within ``trial_margin`` of the fastest (no walking on noise), else to the
      fastest, and the model's picks are not followed until the next round.

    Centring a pinned round on the pinned C rather than on the model's pick is a change from the
    first design: centred on a wrong model pick, [c/2, c, 2c] could only ever move C one power of
    two away from it. ``source`` says where the C in force comes from: "model", "trial" (a trial
    step), "pinned" (the last round's winner) or "fixed" (not adaptive, or nothing decided yet);
    ``metrics()`` gives it as numbers for the step log.
    """

    def __init__(self, initial: int, c_min: int = 1, c_max: int = 1024, adaptive: bool = True,
                 max_interference: float = 0.05, trial_every: int = 50, trial_margin: float = 0.05):
        self.chunk_size, self.c_min, self.c_max, self.adaptive = initial, c_min, c_max, adaptive
        self.max_interference = max_interference
        self.trial_every, self.trial_margin = trial_every, trial_margin
        self.last_model: dict = {}
        self.last_round: dict = {}          # the last finished round: seconds per actor step by C, winner
        self.source = "fixed"
        self.since_round = 0                # measured steps outside a round since the last one
        self.round: dict | None = None      # {"centre", "model", "todo": [C...], "times": [[C, s], ...]}

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

    def _clip(self, c):
        return min(self.c_max, max(self.c_min, c))

    def suggest(self, decode_s: float, decode_steps: int, mean_batch: float,
                scorer_calls: list[tuple[int, float]], num_scorers: int = 1) -> int | None:
        """The cost model's C for these timings (recorded in ``last_model``), None if it cannot decide."""
        if decode_steps == 0 or len(scorer_calls) < 2:
            return None
        d = decode_s / decode_steps
        o, p = self.fit(scorer_calls)
        if not (math.isfinite(d) and math.isfinite(o) and math.isfinite(p)) or d <= 0 or o + p == 0:
            return None
        room = d - p * mean_batch
        c = self.c_max if room <= 0 else o / room
        c = self._clip(max(c, num_scorers * o / (self.max_interference * d)))
        c = self._clip(1 << max(0, math.ceil(math.log2(max(c, 1)))))
        self.last_model = {"decode_step_s": d, "scorer_overhead_s": o, "scorer_token_s": p, "chunk_size": c}
        return c

    def update(self, decode_s: float, decode_steps: int, mean_batch: float,
               scorer_calls: list[tuple[int, float]], num_scorers: int = 1,
               rollout_s: float | None = None) -> int:
        """C for the next step, from the step that just ran with ``self.chunk_size``."""
        if not self.adaptive:
            self.source = "fixed"
            return self.chunk_size
        pick = self.suggest(decode_s, decode_steps, mean_batch, scorer_calls, num_scorers)
        measured = rollout_s is not None and decode_steps > 0
        if self.round is not None:
            if measured:        # else the candidate runs again
                self._record(rollout_s / decode_steps)
            return self.chunk_size
        if measured and self.trial_every > 0:
            self.since_round += 1
            if self.since_round >= self.trial_every:
                self._start_round(pick, rollout_s / decode_steps)
                return self.chunk_size
        if pick is not None and self.source != "pinned":
            self.chunk_size, self.source = pick, "model"
        return self.chunk_size

    def _start_round(self, pick: int | None, seconds: float) -> None:
        c = self.chunk_size if self.source == "pinned" or pick is None else pick
        candidates = [c, self._clip(c // 2), self._clip(c * 2)] + ([pick] if pick is not None else [])
        todo = list(dict.fromkeys(candidates))
        self.round = {"centre": c, "model": pick, "todo": todo, "times": []}
        self._record(seconds)

    def _record(self, seconds: float) -> None:
        """Seconds per actor step of the C that just ran; then the next candidate, or the verdict."""
        r = self.round
        if self.chunk_size in r["todo"]:
            r["todo"].remove(self.chunk_size)
            r["times"].append([self.chunk_size, seconds])
        if r["todo"]:
            self.chunk_size, self.source = r["todo"][0], "trial"
            return
        times = dict((c, s) for c, s in r["times"])
        best = min(times, key=times.get)
        within = lambda c: c is not None and times[c] <= (1 + self.trial_margin) * times[best]
        if within(r["model"]):
            self.chunk_size, self.source = r["model"], "model"
        else:
            self.chunk_size, self.source = (r["centre"] if within(r["centre"]) else best), "pinned"
        self.last_round = {"seconds_per_step": times, "winner": best, "chunk_size": self.chunk_size,
                           "source": self.source}
        self.round, self.since_round = None, 0

    def metrics(self) -> dict:
        """The C in force and where it comes from, as step-log numbers."""
        return {"oppo/chunk_size": self.chunk_size, "oppo/chunk_trial": int(self.source == "trial"),
                "oppo/chunk_pinned": int(self.source == "pinned")}

    def state_dict(self) -> dict:
        return {"chunk_size": self.chunk_size, "source": self.source, "since_round": self.since_round,
                "round": None if self.round is None else {**self.round, "todo": list(self.round["todo"]),
                                                          "times": [list(t) for t in self.round["times"]]}}

    def load_state_dict(self, d: dict) -> None:
        self.chunk_size = d["chunk_size"]
        self.source = d.get("source", "fixed")      # older checkpoints hold only the chunk size
        self.since_round = d.get("since_round", 0)
        r = d.get("round")
        self.round = None if r is None else {**r, "todo": list(r["todo"]), "times": [list(t) for t in r["times"]]}
