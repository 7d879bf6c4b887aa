"""The shape of a decoder-only transformer, read from (and written back to) a HF ``config.json``.

One dataclass for the four supported families (Llama, Qwen2/Qwen2.5, Qwen3, Mistral), each as a
causal LM (``*ForCausalLM``) or a scalar-head model (``*ForSequenceClassification``, ``score``
head with one output: reward model or critic). Family differences are derived properties
(``qkv_bias``, ``o_proj_bias``, ``qk_norm``), so the module code has no per-family branches.

Both spellings of the rotary settings are read: transformers 5 (``rope_parameters`` holding
``rope_theta`` and ``rope_type``) and transformers 4 (``rope_theta`` + ``rope_scaling``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]

_FAMILIES = {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3", "Mistral": "mistral"}
_KINDS = {"ForCausalLM": "causal_lm", "ForSequenceClassification": "score"}
SUPPORTED_ARCHITECTURES = tuple(f + k for f in _FAMILIES for k in _KINDS)
_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _split_architecture(arch: str) -> tuple[str, str]:
    for prefix, family in _FAMILIES.items():
        for suffix, kind in _KINDS.items():
            if arch == prefix + suffix:
                return family, kind
    raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


@dataclass
class ModelConfig:
    architecture: str                      # e.g. "Qwen2ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: = num_attention_heads
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # Llama/Qwen3: bias on q/k/v/o (Qwen2: q/k/v always)
    mlp_bias: bool = False                  # Llama only
    sliding_window: int | None = None       # the window in effect (None: full attention)
    max_model_len: int | None = None        # longest sequence this runtime runs; None: max_position_embeddings
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_labels: int = 1                     # score head outputs (must be 1)
    torch_dtype: torch.dtype | None = None  # the checkpoint's dtype
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    source: str | None = field(default=None, compare=False)   # where it was read from (for errors)

    def __post_init__(self):
        where = f" ({self.source})" if self.source else ""
        self.family, self.kind = _split_architecture(self.architecture)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"config{where}: hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads} and head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config{where}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config{where}: num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config{where}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"config{where}: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.kind == "score" and self.num_labels != 1:
            raise ValueError(f"config{where}: {self.architecture} has num_labels={self.num_labels}; a reward "
                             f"model or critic needs a score head with exactly 1 output")
        self._check_rope(where)
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"config{where}: max_model_len must be positive, got {self.max_model_len}")
        if self.sliding_window is not None and self.sliding_window < self.context_len:
            raise ValueError(
                f"config{where}: sliding-window attention (window {self.sliding_window}) is not supported and "
                f"the window is smaller than the context used ({self.context_len} tokens); pass "
                f"max_model_len <= {self.sliding_window} to run this model with full attention")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES.values():
            raise ValueError(f"config{where}: dtype {self.torch_dtype} not supported (float32/float16/bfloat16)")

    def _check_rope(self, where: str) -> None:
        if not self.rope_theta or self.rope_theta <= 0:
            raise ValueError(f"config{where}: rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is None:
            return
        rope_type = self.rope_scaling.get("rope_type")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"config{where}: rope scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(_ROPE_TYPES)})")
        if rope_type == "default":
            self.rope_scaling = None
            return
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}[rope_type]
        missing = [k for k in required if self.rope_scaling.get(k) is None]
        if missing:
            raise ValueError(f"config{where}: rope scaling {rope_type!r} needs {', '.join(missing)}")
        if rope_type == "llama3" and self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
            raise ValueError(f"config{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor")

    # ----------------------------------------------------------------------------- derived
    @property
    def context_len(self) -> int:
        return self.max_model_len or self.max_position_embeddings

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" or (self.family in ("llama", "qwen3") and self.attention_bias)

    @property
    def o_proj_bias(self) -> bool:
        return self.family in ("llama", "qwen3") and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def as_kind(self, kind: str) -> "ModelConfig":
        """The same decoder with another head: kind "causal_lm" or "score" (num_labels 1)."""
        if kind not in _KINDS.values():
            raise ValueError(f"kind must be 'causal_lm' or 'score', got {kind!r}")
        prefix = next(p for p, f in _FAMILIES.items() if f == self.family)
        suffix = next(s for s, k in _KINDS.items() if k == kind)
        return dataclasses.replace(self, architecture=prefix + suffix, num_labels=1)

    # ----------------------------------------------------------------------------- HF dicts
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, max_model_len: int | None = None) -> "ModelConfig":
        config_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {os.fspath(path)!r} does not exist")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: no config.json in the model directory {os.fspath(path)!r}")
        try:
            with open(config_path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        return cls.from_dict(d, max_model_len=max_model_len, source=config_path)

    @classmethod
    def from_dict(cls, d: dict, max_model_len: int | None = None, source: str | None = None) -> "ModelConfig":
        where = f" ({source})" if source else ""
        archs = d.get("architectures") or []
        if len(archs) != 1:
            raise ValueError(f"config{where}: expected one entry in 'architectures', got {archs!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"config{where}: unsupported architecture {arch!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        family, _ = _split_architecture(arch)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"config{where}: missing {', '.join(missing)}")

        rope_theta, rope_scaling = _read_rope(d, where)
        dtype_name = d.get("dtype", d.get("torch_dtype"))
        if dtype_name is not None and dtype_name not in _DTYPES:
            raise ValueError(f"config{where}: dtype {dtype_name!r} not supported (float32/float16/bfloat16)")
        if "num_labels" in d:
            num_labels = d["num_labels"]
        elif d.get("id2label"):
            num_labels = len(d["id2label"])
        else:
            num_labels = 1
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) if family in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
            sliding_window=_read_sliding_window(d, family),
            max_model_len=max_model_len,
            hidden_act=d.get("hidden_act", "silu"),
            initializer_range=d.get("initializer_range", 0.02),
            num_labels=num_labels if arch.endswith("ForSequenceClassification") else 1,
            torch_dtype=_DTYPES[dtype_name] if dtype_name else None,
            pad_token_id=d.get("pad_token_id"), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), source=source)

    def to_hf_dict(self) -> dict:
        """A config.json that transformers 5 (rope_parameters) and 4 (rope_theta/rope_scaling) both read."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        d = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope, "rope_theta": self.rope_theta,
            "rope_scaling": dict(rope) if self.rope_scaling is not None else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.family in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if self.family == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.family in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if self.family != "llama":
            d["sliding_window"] = self.sliding_window
        if self.kind == "score":
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if self.torch_dtype is not None:
            d["dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return d


def _read_rope(d: dict, where: str) -> tuple[float, dict | None]:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ValueError(f"config{where}: rope_parameters / rope_scaling must be objects")
    merged = {**params, **scaling}                    # transformers 5 gives rope_scaling priority too
    if set(merged) & {"full_attention", "sliding_attention"}:
        raise ValueError(f"config{where}: per-layer-type rope_parameters are not supported")
    rope_theta = merged.pop("rope_theta", None)
    if rope_theta is None:
        rope_theta = d.get("rope_theta", 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if merged.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config{where}: partial_rotary_factor != 1 is not supported")
    merged.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return float(rope_theta), None
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return float(rope_theta), {"rope_type": rope_type, **merged}


def _read_sliding_window(d: dict, family: str) -> int | None:
    """The window in effect on some layer, or None when every layer attends to the full context."""
    window = d.get("sliding_window")
    if window is None or family == "llama":
        return None
    if family == "mistral":
        return window
    layer_types = d.get("layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if not d.get("use_sliding_window", False):
        return None
    n_layers = d["num_hidden_layers"]
    return window if d.get("max_window_layers", n_layers) < n_layers else None
