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


def copy_step(total_bytes: int):
    """A timed step copying total_bytes / 2 bytes on DEVICE (read + written = total_bytes): the
    bandwidth bar beside a kernel that moves total_bytes. (A same-dtype contiguous copy_ is one
    device-to-device memcpy whatever the dtype.) Synchronises."""
    src = torch.empty(total_bytes // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)
        sync()

    return step
