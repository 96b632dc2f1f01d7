"""Shared test setup.

Without a GPU every Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors; the variable
must be set before triton is imported, hence here. Nothing touches CUDA at collection:
torch.cuda.is_available() only asks the driver whether a device exists.
"""

import os

# torch.compile's on-disk caches (FX graph / AOTAutograd) key a compiled backward on its graph,
# not on rlhf_fast's Python autograd code: after a change there, a warm cache replays the old
# graph and a compile test can pass or fail for code that no longer exists (seen 2026-11-23).
# torch.compiler.config reads the variable during `import torch`, hence before it; the config
# is set again after, in case a plugin imported torch first.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch

_compiler_config = getattr(torch.compiler, "config", None)  # torch >= 2.7
if os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] == "1" and hasattr(_compiler_config, "force_disable_caches"):
    _compiler_config.force_disable_caches = True

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# On CPU the Triton interpreter is slow: tests keep sizes small there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Per-dtype (atol, rtol) for values computed in fp32 from low-precision inputs vs the fp32 reference
# on the same (already rounded) inputs.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


@pytest.fixture
def device():
    return DEVICE


def pytest_configure(config):
    # Registered here too (not only in pyproject.toml) so the suite runs cleanly from a copy of
    # tests/ next to an installed wheel.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: large sizes, run on GPU machines")


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """After a gpu-marked test, hand its cached blocks back to the driver: the suite may run on
    several pytest-xdist workers sharing one GPU, and a worker's caching allocator would otherwise
    keep its largest test's peak for the rest of the run."""
    yield
    if HAS_CUDA and "gpu" in request.keywords:
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
