"""The installed build: rlhf_fast._C's build information agrees with the kernels it registered, the
Triton kernels are importable as rlhf_fast.kernels, and the version is the one setup.py used."""

import importlib.metadata

import pytest
import torch

import rlhf_fast
from rlhf_fast._backend import C_error, load_C


def test_extension_build_info_matches_registered_kernels():
    C = load_C()
    assert C is not None, f"rlhf_fast._C did not load: {C_error()}"
    with_cuda = C.with_cuda()
    assert isinstance(with_cuda, bool)
    archs = C.cuda_archs()
    assert isinstance(archs, str)
    for op in ("rlhf_fast::gae", "rlhf_fast::discounted_returns"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == with_cuda
    if with_cuda:
        assert archs, "a CUDA build must report the archs it was compiled for"
    else:
        assert archs == ""


def test_kernels_package_is_mapped():
    import rlhf_fast.kernels

    assert rlhf_fast.kernels.__name__ == "rlhf_fast.kernels"
    assert rlhf_fast.kernels.__file__.replace("\\", "/").endswith(("kernels/__init__.py",))


def test_version_matches_metadata():
    try:
        installed = importlib.metadata.version("rlhf_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rlhf_fast is not installed (run from a source tree)")
    assert rlhf_fast.__version__ == installed


@pytest.mark.gpu
def test_cuda_torch_builds_cuda_kernels():
    """On a GPU machine with a CUDA torch the extension must have been built with CUDA (setup.py
    compiles csrc/cuda whenever a toolkit is found; RLHF_FAST_SKIP_CUDA=1 is the only opt-out)."""
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    assert load_C().with_cuda(), "rlhf_fast._C was built without CUDA (no toolkit at build time?)"
