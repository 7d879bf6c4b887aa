"""Models from and to local Hugging Face directories: config.json + safetensors, never pickle.

    load_model(path, kind="causal_lm" | "score", dtype=None, device="cpu")
    save_model(model, path)                  config.json + model.safetensors, each written atomically
    build_model(config, kind, seed, dtype, device)     random init like transformers (normal, std
                                                       initializer_range; zero biases; unit norms)

Every problem with a checkpoint raises ``CheckpointError`` naming the file and the tensor.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .transformer import CausalLM, ScalarHeadModel

__all__ = ["load_model", "save_model", "build_model", "CheckpointError"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)   # old checkpoints saved the rotary buffer
_MAX_NAMES = 8


class CheckpointError(ValueError):
    """A model directory whose weights do not fit its config or the requested model."""


def _model_class(kind: str):
    if kind == "causal_lm":
        return CausalLM
    if kind == "score":
        return ScalarHeadModel
    raise ValueError(f"kind must be 'causal_lm' or 'score', got {kind!r}")


def _names(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
    return ", ".join(names[:_MAX_NAMES]) + more


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file holding it."""
    single, index = os.path.join(path, _SINGLE), os.path.join(path, _INDEX)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
        files = {}
        for name, shard in weight_map.items():
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index}: shard {shard!r} (holding {name}) does not exist")
            files[name] = shard_path
        return files
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {', '.join(others)}: pickled weights are never loaded; convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"{path}: no {_SINGLE} or {_INDEX}{hint}")


def _materialize(cls, config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The model with uninitialised storage of the right dtype on ``device`` (no init cost)."""
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    if isinstance(model, CausalLM):
        model.tie_weights()
    return model


def build_model(config: ModelConfig, kind: str | None = None, seed: int = 0,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A randomly initialised model (transformers' init: normal(0, initializer_range) for linear and
    embedding weights, zero biases, unit norm weights), seeded, reproducible across devices."""
    kind = kind or config.kind
    config = config if config.kind == kind else config.as_kind(kind)
    dtype = dtype or config.torch_dtype or torch.float32
    model = _materialize(_model_class(kind), config, dtype, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():     # tied lm_head appears once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, config.initializer_range, generator=gen)
                if name == "model.embed_tokens.weight" and config.pad_token_id is not None \
                        and 0 <= config.pad_token_id < config.vocab_size:
                    w[config.pad_token_id] = 0.0
                p.copy_(w)
    return model


def load_model(path: str | os.PathLike, kind: str = "causal_lm", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", allow_new_head: bool = False, seed: int = 0,
               max_model_len: int | None = None):
    """Load a HF directory as a ``CausalLM`` (kind "causal_lm") or ``ScalarHeadModel`` ("score").

    dtype None keeps the checkpoint's dtype (config.json's ``dtype``/``torch_dtype``; float32 if
    absent). Tensors are read straight onto ``device`` and cast there. A *ForCausalLM directory
    loaded as "score" needs ``allow_new_head=True``: its ``lm_head`` is dropped and a fresh
    ``score`` head is drawn from normal(0, initializer_range) with ``seed`` (a critic made from
    the actor). ``max_model_len`` is the longest sequence the caller will run (checked against a
    sliding window).
    """
    path = os.fspath(path)
    config = ModelConfig.from_hf_dir(path, max_model_len=max_model_len)
    new_head = False
    if config.kind != kind:
        _model_class(kind)
        if kind == "score" and allow_new_head:
            new_head = True
        else:
            hint = " (pass allow_new_head=True to start a fresh score head)" if kind == "score" else ""
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: the checkpoint is a "
                                  f"{config.architecture}, not loadable as kind={kind!r}{hint}")
        config = config.as_kind(kind)
    dtype = dtype or config.torch_dtype or torch.float32
    device = torch.device(device)
    files = _weight_files(path)

    model = _materialize(_model_class(kind), config, dtype, device)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(params)
    ignorable = {n for n in files if n.endswith(_IGNORABLE_SUFFIXES)}
    if config.tie_word_embeddings and kind == "causal_lm":
        expected.discard("lm_head.weight")
        ignorable.add("lm_head.weight")       # some tied checkpoints still store it; the embedding wins
    if new_head:
        expected.discard("score.weight")
        ignorable.add("lm_head.weight")
    missing = expected - set(files)
    if missing:
        raise CheckpointError(f"{path}: missing tensors for {config.architecture}: {_names(missing)}")
    unexpected = set(files) - expected - ignorable
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors for {config.architecture}: {_names(unexpected)}")

    by_file: dict[str, list[str]] = {}
    for name in sorted(expected):
        by_file.setdefault(files[name], []).append(name)
    target = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device=target) as f:
                for name in names:
                    t = f.get_tensor(name)
                    p = params[name]
                    if t.shape != p.shape:
                        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected "
                                              f"{tuple(p.shape)} for {config.architecture}")
                    if not (t.is_floating_point()):
                        raise CheckpointError(f"{file}: tensor {name} has dtype {t.dtype}, expected a float")
                    p.copy_(t)
        if new_head:
            gen = torch.Generator().manual_seed(seed)
            w = torch.empty(model.score.weight.shape).normal_(0.0, config.initializer_range, generator=gen)
            model.score.weight.copy_(w)
    return model


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    return t if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 else t.clone()


def save_model(model, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` (transformers' names; tied lm_head omitted)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config
    hf = config.to_hf_dict()
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    # fused projections make q/k/v (gate/up) views of one tensor: safetensors refuses shared storage
    tensors = {name: _own_storage(t.detach().to("cpu").contiguous()) for name, t in model.state_dict().items()}
    if isinstance(model, CausalLM) and config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(hf, f, indent=2)
            f.write("\n")

    _atomic_write(os.path.join(path, _SINGLE), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(os.path.join(path, "config.json"), write_config)
