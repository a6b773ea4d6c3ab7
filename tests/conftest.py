"""Test setup: without a GPU, run Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here at collection time.
On a CUDA machine the real kernels run instead (set TRITON_INTERPRET=1 yourself to force the
interpreter there).
"""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

# tests/reference.py is imported as `reference` by the test modules
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

from cpu_isas import level_builds  # noqa: E402,F401  (the fixture, for every test module)

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def reproducible_cpu():
    """Deterministic kernels, one thread for the whole module: reproducible figures (accuracies,
    losses per step) and no spin-waiting on a busy CPU."""
    from fastkd.demo import reproducible_cpu as one_thread_deterministic
    with one_thread_deterministic():
        yield


@pytest.fixture
def kernel_device():
    """Device on which backend='triton' runs: CUDA when present, else the interpreter on CPU."""
    return KERNEL_DEVICE
