"""Build rlhf_fast: the Python package, the Triton kernels (kernels/ shipped as rlhf_fast.kernels)
and the compiled extension rlhf_fast._C.

rlhf_fast._C always has the C++ (CPU) kernels from csrc/*.cpp. The CUDA kernels in csrc/cuda/*.cu
are added whenever a CUDA toolkit (CUDA_HOME / nvcc) and a CUDA build of torch are both found;
no GPU needs to be visible, so cluster wheels can be built on GPU-less nodes.

Environment:
  TORCH_CUDA_ARCH_LIST   archs to compile for (default "8.0;9.0+PTX": A100, H100 + PTX for newer)
  RLHF_FAST_SKIP_CUDA=1  build the CPU-only extension even when CUDA is available
  MAX_JOBS               parallel compile jobs (ninja), as in torch.utils.cpp_extension

  pip install --no-build-isolation -e .
  pip wheel --no-build-isolation . -w dist
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def read_text(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def read_version() -> str:
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', read_text("rlhf_fast", "_version.py"), re.MULTILINE)
    if match is None:
        raise RuntimeError("rlhf_fast/_version.py has no __version__")
    return match.group(1)


def packages() -> list[str]:
    # rlhf_fast and its subpackages from the source tree, plus kernels/ mapped to rlhf_fast.kernels.
    found = ["rlhf_fast"] + ["rlhf_fast." + p for p in find_packages(where=os.path.join(ROOT, "rlhf_fast"))]
    found += ["rlhf_fast.kernels"] + [
        "rlhf_fast.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))
    ]
    return found


def extension_modules() -> tuple[list, dict]:
    """The rlhf_fast._C extension and the cmdclass that builds it (empty if torch is missing,
    which only happens for metadata-only invocations such as `setup.py --version`)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("rlhf_fast: torch not importable, building without rlhf_fast._C", file=sys.stderr)
        return [], {}

    skip_cuda = os.environ.get("RLHF_FAST_SKIP_CUDA", "0") == "1"
    # CUDA_HOME is None in torch.utils.cpp_extension unless torch itself was built with CUDA.
    with_cuda = (not skip_cuda) and torch.version.cuda is not None and CUDA_HOME is not None

    # Relative paths: setuptools requires sources relative to setup.py for wheels and editable installs.
    sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std here: torch.utils.cpp_extension adds the standard its headers need (C++17 up to
    # torch 2.9, C++20 since); the sources are plain C++17 and build either way.
    cxx_flags = ["-O3"]
    macros = []
    # _C links against torch's libc10/libtorch. Once `import torch` has run they are loaded already;
    # the rpaths let `import rlhf_fast._C` work on its own too: torch beside the package in
    # site-packages (wheels), else the torch this was built against (editable installs).
    torch_lib = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    link_flags = (
        ["-Wl,-rpath,$ORIGIN/../torch/lib", "-Wl,-rpath," + torch_lib] if sys.platform.startswith("linux") else []
    )
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
        # BuildExtension turns TORCH_CUDA_ARCH_LIST into -gencode flags; without it, it would look
        # at the visible GPUs, and there may be none on a build node.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        if not re.fullmatch(r"[0-9A-Za-z.;+ ]+", arch_list):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} has unexpected characters")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # The macro names must not contain "arch": torch drops its own -gencode flags when any nvcc
        # flag does (it assumes the user chose archs), so macros go through define_macros.
        macros += [("RLHF_FAST_WITH_CUDA", "1"), ("RLHF_FAST_CUDA_TARGETS", '"' + arch_list + '"')]
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            name="rlhf_fast._C",
            sources=sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
        # The toolkit is torch's guess (CUDA_HOME, else nvcc on PATH, else /usr/local/cuda): say which,
        # since a wrapper nvcc outside the toolkit (e.g. /usr/local/bin/nvcc) only fails at the link.
        print(f"rlhf_fast: building rlhf_fast._C with CUDA (archs {arch_list}, toolkit {CUDA_HOME})", file=sys.stderr)
    else:
        why = "RLHF_FAST_SKIP_CUDA=1" if skip_cuda else "no CUDA toolkit or CPU-only torch"
        ext = CppExtension(
            name="rlhf_fast._C",
            sources=sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        print(f"rlhf_fast: building rlhf_fast._C for CPU only ({why})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class CleanBuildPy(build_py):
    """build_py that first empties build/lib*/rlhf_fast: setuptools only ever adds files there, so a
    module renamed or deleted in the tree would otherwise still ship in the next wheel."""

    def run(self):
        if not getattr(self, "editable_mode", False):
            shutil.rmtree(os.path.join(self.build_lib, "rlhf_fast"), ignore_errors=True)
        super().run()


ext_modules, cmdclass = extension_modules()
cmdclass["build_py"] = CleanBuildPy

setup(
    name="rlhf_fast",
    version=read_version(),
    description="Fused Triton/CUDA kernels for the loss-side math of PPO, GRPO and DPO (LLM RLHF)",
    long_description=read_text("README.md") if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages(),
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "numpy",
        'triton; platform_system=="Linux"',
    ],
    extras_require={
        "examples": ["transformers"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        # python -m rlhf_fast.bench: plots and a progress bar (it runs without them too)
        "bench": ["matplotlib", "tqdm"],
        # peers compared against on GPU machines (imported only when present)
        "peers": ["liger-kernel", "cut-cross-entropy"],
    },
    zip_safe=False,
)
