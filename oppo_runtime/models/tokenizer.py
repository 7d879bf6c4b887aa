"""A model directory's tokenizer (``tokenizer.json``) through the ``tokenizers`` library.

Special tokens come from ``tokenizer_config.json`` (``eos_token``, ``pad_token``, ``bos_token``:
a string or ``{"content": ...}``), falling back to the ids in ``generation_config.json`` and
``config.json``.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, eos_token_id: int | None, pad_token_id: int | None,
                 bos_token_id: int | None = None):
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.bos_token_id = bos_token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no tokenizer.json in {path!r} (only fast-tokenizer files are read)")
    backend = _HFTokenizer.from_file(file)
    tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    gen_cfg = _read_json(os.path.join(path, "generation_config.json"))
    model_cfg = _read_json(os.path.join(path, "config.json"))

    def special(key: str):
        token = tok_cfg.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            tid = backend.token_to_id(token)
            if tid is None:
                raise ValueError(f"{file}: {key}_token {token!r} from tokenizer_config.json is not in the vocabulary")
            return tid
        return _first_id(gen_cfg.get(f"{key}_token_id", model_cfg.get(f"{key}_token_id")))

    return Tokenizer(backend, eos_token_id=special("eos"), pad_token_id=special("pad"),
                     bos_token_id=special("bos"))
