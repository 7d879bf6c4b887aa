"""Engine configuration (validated once, at construction)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig"]


@dataclass
class EngineConfig:
    max_num_seqs: int = 256              # sequences decoded together at most
    max_num_batched_tokens: int = 8192   # prefill tokens per step (long prompts are chunked)
    max_model_len: int | None = None     # default: the model's max_position_embeddings
    chunk_size: int = 16                 # C: stream every C generated tokens to the scorers
    seed: int = 0                        # sampling seed (noise is keyed by (seed, sequence, position))
    enforce_eager: bool = False          # True: no CUDA graphs for decode
    async_decode: bool | None = None     # read tokens back one step late (default: on CUDA)
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
    # the LM head and the sampler inside each decode graph (one replay per step instead of a
    # replay + ~5 launches); only for steps without top-k/top-p. None: on unless env
    # OPPO_GRAPH_SAMPLING=0 (1.38x per decode step, session 7; GPU tests passed in session 10)
    graph_sampling: bool | None = None
    # at most this many tokens of a sequence's context per CTA of the decode attention kernel
    # (paged_decode_attention's max_partition; 0: the kernel's shape-only plan). A decode batch of
    # an engine is ragged (a few long contexts among many short ones); the shape-only plan gave
    # workload G's batch 2 splits and ran it at 0.23 of copy bandwidth, the longest context's CTA
    # setting the time (bench/decode_attention.py --ragged, session 13)
    decode_max_partition: int = 512

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_max_partition < 0:
            raise ValueError(f"EngineConfig.decode_max_partition must be >= 0 (0: no cap), "
                             f"got {self.decode_max_partition}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        # every batch the scheduler can form must have a graph: keep the sizes below max_num_seqs and
        # max_num_seqs itself (dropping the sizes above it left B+Δ = 80 with graphs only up to 64,
        # so the overcommitted batch decoded eagerly, 2-3x slower per step)
        if self.graph_batch_sizes:
            self.graph_batch_sizes = tuple(sorted({b for b in self.graph_batch_sizes if 1 <= b < self.max_num_seqs}
                                                  | {self.max_num_seqs}))
