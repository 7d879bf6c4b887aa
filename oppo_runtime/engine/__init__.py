"""Sequences, scheduler, ActorEngine (decode) and Scorers (incremental prefill)."""
from .config import EngineConfig
from .sequence import Chunk, RequestError, SamplingParams, Sequence, SeqStatus
from .runner import ModelRunner, Span
from .scheduler import Scheduler
from .actor import ActorEngine

__all__ = ["EngineConfig", "Chunk", "RequestError", "SamplingParams", "Sequence", "SeqStatus",
           "ModelRunner", "Span", "Scheduler", "ActorEngine"]
