"""The embedded default: a small model, a prompt set and a rule reward shipped in the package.

Task ("case game"): a prompt is a short word; the response should be written in the *same case*
as the prompt's first letter (lowercase word -> lowercase letters, uppercase -> uppercase). The
rule reward is the fraction of response tokens that are letters of that case. A randomly
initialised model scores about 0.4; PPO teaches it the rule within a few hundred steps on a CPU.

Response lengths are long-tailed on purpose (lognormal, per prompt; the engine is told each
sequence's length), so that a few long generations hold the step back and deferral matters.

The models are real HF directories (config.json + model.safetensors + tokenizer.json), written
once from a fixed seed under the cache directory and then loaded like any other checkpoint: the
actor (and reference) is a small Qwen2, the reward model and the critic are Qwen2 score models.
"""
from __future__ import annotations

import json
import math
import os
import random
import string
from pathlib import Path

__all__ = ["DEFAULT_MODEL_CONFIG", "ensure_default_models", "default_prompts", "case_reward", "VOCAB"]

SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(" .,:!?0123456789")
PAD, EOS, BOS = 0, 1, 2

DEFAULT_MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": len(VOCAB),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.05,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "torch_dtype": "float32",
}


def _tokenizer_json() -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(VOCAB)}, "unk_token": "<pad>"},
    }


def ensure_default_models(cache_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write (once) and return the HF directories of the default actor, reward model and critic."""
    from ..models import ModelConfig, build_model, save_model

    root = Path(cache_dir) / f"default-models-seed{seed}"
    paths = {"actor": root / "actor", "reward": root / "reward", "critic": root / "critic"}
    if all((p / "model.safetensors").exists() and (p / "tokenizer.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    cfg = ModelConfig.from_dict(DEFAULT_MODEL_CONFIG)
    for i, (role, kind) in enumerate([("actor", "causal_lm"), ("reward", "score"), ("critic", "score")]):
        model = build_model(cfg, kind, seed=seed * 100 + i)
        save_model(model, paths[role])
        tmp = paths[role] / "tokenizer.json.tmp"
        tmp.write_text(json.dumps(_tokenizer_json()))
        os.replace(tmp, paths[role] / "tokenizer.json")
        (paths[role] / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>"}))
    return {k: str(v) for k, v in paths.items()}


def default_prompts(n: int, seed: int = 0, median_len: float = 12.0, sigma: float = 0.8,
                    max_len: int = 96) -> list[dict]:
    """``n`` prompts: {"prompt_ids", "text", "target_len"}; target lengths lognormal, capped."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.5:
            word = word.upper()
        text = word + ":"
        ids = [BOS] + [VOCAB.index(c) for c in text]
        length = int(min(max_len, max(1, round(math.exp(math.log(median_len) + sigma * rng.gauss(0, 1))))))
        out.append({"prompt_ids": ids, "text": text, "target_len": length})
    return out


def case_reward(prompt_ids: list[int], response_ids: list[int], text: str | None = None) -> float:
    """Fraction of response tokens that are letters of the case of the prompt's first letter."""
    first = next((VOCAB[t] for t in prompt_ids if VOCAB[t].isalpha()), "a")
    want = string.ascii_uppercase if first.isupper() else string.ascii_lowercase
    if not response_ids:
        return 0.0
    return sum(1 for t in response_ids if 0 <= t < len(VOCAB) and VOCAB[t] in want) / len(response_ids)
