import logging
import os

import pytest
import torch

logging.getLogger("oppo_runtime").setLevel(logging.INFO)
# Triton kernels run one fixed config in tests (autotuning compiles every config for every shape
# key: minutes); tests/test_prefill_triton_gpu.py runs the autotuner itself once.
os.environ.setdefault("OPPO_TRITON_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
