"""Decoder-only transformers (Llama / Qwen2 / Qwen3 / Mistral) from HF config.json + safetensors."""
from .config import ModelConfig, SUPPORTED_ARCHITECTURES
from .context import DenseContext, PagedContext
from .loading import CheckpointError, build_model, load_model, save_model
from .tokenizer import Tokenizer, load_tokenizer
from .transformer import CausalLM, ScalarHeadModel

__all__ = [
    "ModelConfig", "SUPPORTED_ARCHITECTURES", "DenseContext", "PagedContext",
    "CausalLM", "ScalarHeadModel", "load_model", "save_model", "build_model", "CheckpointError",
    "Tokenizer", "load_tokenizer",
]
