"""Atomic checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

Layout of ``<out_dir>/checkpoints/step-000040/``:
    actor.safetensors, critic.safetensors          model weights
    optim_actor.safetensors, optim_critic.safetensors (+ .json)   optimizer state, flattened
    state.json                                     step, config, schedulers, controllers, RNG, the
                                                   rollout buffer (deferred sequences with tokens)
A checkpoint is written to ``step-N.tmp`` and renamed into place; ``latest`` names the newest
complete one (written atomically too). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_latest", "latest_checkpoint"]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
                meta["state"][str(idx)][k] = "__tensor__"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"{idx}.{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: str | os.PathLike, step: int, models: dict, optimizers: dict, state: dict,
                    keep: int = 3) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in models.items():
        # named_parameters() lists a tied weight once (safetensors refuses shared storage)
        sd = {k: v.detach().contiguous().cpu() for k, v in model.named_parameters()}
        save_file(sd, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
    for name, opt in optimizers.items():
        tensors, meta = _flatten_optimizer(opt.state_dict())
        save_file(tensors, str(tmp / f"optim_{name}.safetensors"))
        (tmp / f"optim_{name}.json").write_text(json.dumps(meta))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_text(root / "latest", final.name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if (p / "state.json").exists():
            return p
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_latest(root: str | os.PathLike, models: dict, optimizers: dict) -> dict | None:
    """Restore weights and optimizers in place; returns the saved state dict (or None)."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    for name, model in models.items():
        sd = load_file(str(path / f"{name}.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path}/{name}.safetensors does not match the model: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, opt in optimizers.items():
        tensors = load_file(str(path / f"optim_{name}.safetensors"))
        meta = json.loads((path / f"optim_{name}.json").read_text())
        opt.load_state_dict(_unflatten_optimizer(tensors, meta))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    state = json.loads((path / "state.json").read_text())
    state["_path"] = str(path)
    return state
