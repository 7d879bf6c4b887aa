"""Loading of the compiled extension and the record of which backend each op runs.

Every op in ``ops/`` has a pure-torch reference and, where one exists, a CUDA kernel in
``oppo_runtime._C``. Dispatch is explicit: an op runs the CUDA kernel when its inputs live on a
CUDA device and the extension was built with CUDA kernels; otherwise the reference. Each op logs,
once, which backend it runs, and ``backends()`` lists them for ``oppo doctor``. Asking for a CUDA
kernel that is not there (``OPPO_REQUIRE_KERNELS=1`` or ``backend="cuda"``) raises instead of
falling back silently.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

__all__ = ["extension", "extension_error", "has_cuda_kernels", "record_backend", "backends",
           "choose_backend", "MissingKernelError"]

log = logging.getLogger("oppo_runtime.ops")

_lock = threading.Lock()
_ext = None
_ext_error: str | None = None
_loaded = False
_seen: dict[str, str] = {}


class MissingKernelError(RuntimeError):
    pass


def extension():
    """The compiled module ``oppo_runtime._C`` or None (the reason is in ``extension_error()``)."""
    global _ext, _ext_error, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                from oppo_runtime import _C  # noqa: F401  (registers torch.ops.oppo.*)
                _ext = _C
            except ImportError as e:  # not built, or built against another torch
                _ext, _ext_error = None, f"{type(e).__name__}: {e}"
        return _ext


def extension_error() -> str | None:
    extension()
    return _ext_error


def has_cuda_kernels() -> bool:
    ext = extension()
    return bool(ext is not None and ext.cuda_kernels_compiled())


def record_backend(op: str, backend: str) -> None:
    """Log once per (op, backend) which implementation runs."""
    if _seen.get(op) != backend:
        _seen[op] = backend
        log.info("op %s runs on backend %s", op, backend)


def backends() -> dict[str, str]:
    return dict(_seen)


_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device: kernels size grids by it)."""
    n = _sm_counts.get(device)
    if n is None:
        n = _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def sm90a_kernels(device: torch.device | None = None) -> bool:
    """Whether the extension's sm_90a kernels (wgmma) can run on ``device``: built with 9.0a code
    (TORCH_CUDA_ARCH_LIST with 9.0a) and an sm_90 device."""
    if not (torch.cuda.is_available() and has_cuda_kernels()):
        return False
    if "sm_90a" not in extension().cuda_arch_list().split():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def choose_backend(op: str, device: torch.device, requested: str | None = None) -> str:
    """'cuda' or 'reference' for an op whose tensors live on ``device``.

    ``requested`` (or env ``OPPO_OP_BACKEND``) may force 'reference' or 'cuda'; 'cuda' without
    the kernel raises. ``OPPO_REQUIRE_KERNELS=1`` makes a missing kernel on a CUDA device an error.
    """
    requested = requested or os.environ.get("OPPO_OP_BACKEND") or "auto"
    if requested not in ("auto", "cuda", "reference"):
        raise ValueError(f"op {op}: unknown backend {requested!r} (auto|cuda|reference)")
    on_cuda = device.type == "cuda"
    if requested == "reference":
        backend = "reference"
    elif on_cuda and has_cuda_kernels() and hasattr(torch.ops.oppo, op):
        backend = "cuda"
    elif requested == "cuda" or (on_cuda and os.environ.get("OPPO_REQUIRE_KERNELS") == "1"):
        why = extension_error() or ("the extension was built without CUDA kernels"
                                    if extension() is not None else "no extension")
        if not on_cuda:
            why = f"its inputs are on {device}, not on a CUDA device"
        raise MissingKernelError(f"op {op}: CUDA kernel requested but not available ({why})")
    else:
        backend = "reference"
    record_backend(op, backend)
    return backend
