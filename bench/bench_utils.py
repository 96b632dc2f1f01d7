"""What every pytest-benchmark suite here shares: the device, dtype labels, and the sync that
makes a GPU timing cover the kernels and not just their launch. (Imported by name: pytest puts
bench/ on sys.path, as it does tests/ for tests/conftest.py.)"""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU); call it inside every timed function."""
    if HAS_CUDA:
        torch.cuda.synchronize()
