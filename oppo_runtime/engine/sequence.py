"""A request's life in the engine: its tokens, their provenance, and its pages."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

__all__ = ["SamplingParams", "SeqStatus", "Sequence", "Chunk", "RequestError"]


class RequestError(ValueError):
    """A request that cannot be served (too long, empty, larger than the pool)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1.0 = off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class SeqStatus(enum.Enum):
    WAITING = "waiting"       # admitted to the engine, no pages yet (or preempted: pages dropped)
    RUNNING = "running"       # has pages, is prefilled or decoding
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    target_len: int | None = None     # benchmarks: decode exactly this many tokens, ignoring EOS
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)   # behaviour log-prob of each output token
    versions: list[int] = field(default_factory=list)     # policy version that sampled each token
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None   # "eos" | "stop" | "length" | "error: ..."
    num_cached_tokens: int = 0         # tokens whose actor K/V are in the pages
    num_emitted: int = 0               # output tokens already streamed to chunk consumers
    num_preemptions: int = 0
    admit_order: int = -1
    sample_key: int | None = None      # key of the sampling noise; stable across steps/preemption
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.sample_key is None:
            self.sample_key = self.seq_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def max_new(self) -> int:
        return self.target_len if self.target_len is not None else self.sampling.max_new_tokens


@dataclass
class Chunk:
    """Newly generated tokens of one sequence, streamed to the scorers.

    ``start``/``end`` index the sequence's output tokens; ``final`` marks the last chunk (the
    sequence has finished). The sequence object itself rides along (read-only for consumers).
    """
    seq: Sequence
    start: int
    end: int
    final: bool

    @property
    def token_ids(self) -> list[int]:
        return self.seq.output_ids[self.start:self.end]
