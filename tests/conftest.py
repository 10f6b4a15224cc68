"""Shared test setup: Triton interpreter on GPU-less machines, per-test seeding, gpu marker."""
import os
import random
import shutil

# Triton reads TRITON_INTERPRET when it is imported, so this must happen before anything
# imports torch/triton. On a machine without an NVIDIA device the Triton kernels can only run
# in the interpreter (fp32).
_HAS_NVIDIA = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
if not _HAS_NVIDIA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: two workers with 2 OpenMP threads each oversubscribe the CPU
    # (measured: the digits TRADES test went from 28 s to > 400 s).
    torch.set_num_threads(1)

try:
    from hypothesis import settings

    # The interpreter and CPU autograd are slow and timing-noisy: no deadlines.
    settings.register_profile("cdp", deadline=None, max_examples=25, derandomize=True)
    settings.load_profile("cdp")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
