"""Local inputs for ``examples/trl_ppo.py`` on the embedded default task (no Hub access needed).

    python examples/trl_default_task.py /tmp/oppo-trl      # writes models + dataset, prints the flags

Writes an SFT policy (Qwen2ForCausalLM) and a reward/value model (Qwen2ForSequenceClassification)
of the default task's size, with its tokenizer, and a JSON-lines prompt set. The vocabulary is
padded to 80 rows, as real checkpoints pad theirs, so that the ``[PAD]`` token TRL's script adds
(and the Qwen2 tokenizer's own specials) have embeddings.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from oppo_runtime.models import ModelConfig, build_model, save_model
from oppo_runtime.ppo.default_task import DEFAULT_MODEL_CONFIG, default_prompts, ensure_default_models

PADDED_VOCAB = 80


def prepare(out_dir: str, num_prompts: int = 400, seed: int = 0) -> list[str]:
    """Write (once) the models and dataset under ``out_dir``; return trl_ppo.py's path flags."""
    out = Path(out_dir)
    src = Path(ensure_default_models(out / "cache", seed=seed)["actor"])
    cfg = ModelConfig.from_dict({**DEFAULT_MODEL_CONFIG, "vocab_size": PADDED_VOCAB})
    for name, kind, model_seed in (("sft", "causal_lm", 1), ("reward", "score", 2)):
        path = out / name
        if not (path / "model.safetensors").exists():
            save_model(build_model(cfg, kind, seed=seed * 100 + model_seed), path)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(src / f, path / f)
    data = out / "data"
    if not (data / "train.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"prompt": p["text"]}) for p in default_prompts(num_prompts, seed=seed)]
        (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    return ["--dataset_name", str(data), "--dataset_train_split", "train",
            "--model_name_or_path", str(out / "sft"), "--sft_model_path", str(out / "sft"),
            "--reward_model_path", str(out / "reward")]


if __name__ == "__main__":
    print(" ".join(prepare(sys.argv[1] if len(sys.argv) > 1 else "/tmp/oppo-trl")))
