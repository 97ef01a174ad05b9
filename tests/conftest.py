"""Shared test setup.

* Without a CUDA device, Triton kernels run in its CPU interpreter: TRITON_INTERPRET must be set
  before triton is first imported, so it is set here, before any test module loads.
* One CPU thread per process (see below).
* ``shared_reference`` points at ``../shared/reference`` beside the repository (golden files written
  by the reference SpikeGPT); tests that need it skip when it is absent, as in a user's clone.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tensors are tiny, and several tests start training subprocesses: one thread each keeps
# them from oversubscribing the cores (subprocesses inherit OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture
def shared_reference() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present (a user's clone): golden files unavailable")
    return SHARED_REFERENCE
