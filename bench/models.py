"""Model shapes of the benchmarks (random weights) and their construction on the GPU."""
from __future__ import annotations

import torch

from oppo_runtime.models import ModelConfig, build_model

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
}


def qwen_config(shape: str, kind: str = "causal_lm", vocab: int = 151936, max_len: int = 32768) -> ModelConfig:
    arch = "Qwen2ForCausalLM" if kind == "causal_lm" else "Qwen2ForSequenceClassification"
    return ModelConfig.from_dict(dict(architectures=[arch], model_type="qwen2", vocab_size=vocab,
                                      max_position_embeddings=max_len, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, num_labels=1, **SHAPES[shape]))


def qwen_model(shape: str, kind: str = "causal_lm", seed: int = 0, dtype=torch.bfloat16, device="cuda"):
    return build_model(qwen_config(shape, kind), kind, seed=seed, dtype=dtype, device=device).eval().requires_grad_(False)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
