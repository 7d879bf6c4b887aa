import logging
import os

import pytest
import torch

logging.getLogger("oppo_runtime").setLevel(logging.INFO)
# Triton kernels run one fixed config in tests (autotuning compiles every config for every shape
# key: minutes); tests/test_prefill_triton_gpu.py runs the autotuner itself once.
os.environ.setdefault("OPPO_TRITON_AUTOTUNE", "0")


def _shard(config, items):
    """OPPO_TEST_SHARD=i/n keeps every n-th test from the i-th (bench/pytest_shards.sh runs n such
    processes side by side on the GPU machine, whose 16 cores would otherwise idle)."""
    spec = os.environ.get("OPPO_TEST_SHARD")
    if not spec:
        return
    try:
        i, n = (int(x) for x in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"OPPO_TEST_SHARD={spec!r}: expected i/n with 0 <= i < n") from None
    keep = [it for k, it in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
