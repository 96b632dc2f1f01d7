"""The CUDA sources (csrc/cuda/*.cu) compile for sm_90 without register spills; no GPU needed.

CI has no GPU and a CPU build of torch, so setup.py builds the extension without its CUDA kernels
there: without this test a compile error in a .cu file would first show on a GPU machine. Each
source is compiled with nvcc against torch's headers the way setup.py's CUDAExtension does (C++20
like torch >= 2.10's extensions, -O3, RLHF_FAST_WITH_CUDA) for sm_90 only (the sm_80 pass compiles
the cluster kernel's body out), with `-Xptxas -v` to read each kernel's registers and spills.
Skipped where no nvcc is found (CUDA_HOME, PATH or /usr/local/cuda).
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
TIMEOUT_S = 600


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def include_flags(stub_dir: Path) -> list[str]:
    dirs = list(cpp_extension.include_paths())
    # A CPU build of torch ships c10/cuda headers but not the CMake-generated macros header they
    # include; a CUDA build has it. The stub holds what that header defines for a shared build.
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for d in dirs):
        header = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, str(stub_dir))
    dirs.append(sysconfig.get_paths()["include"])
    return [f"-I{d}" for d in dirs]


def ptxas_report(output: str) -> list[tuple[str, int, int]]:
    """(kernel, registers, spill store bytes) per sm_90 entry function in `-Xptxas -v` output."""
    kernels = []
    name = None
    spills = 0
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_90", line)
        if m:
            name, spills = m.group(1), 0
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name:
            spills = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            kernels.append((name, int(m.group(1)), spills))
            name = None
    return kernels


@pytest.mark.skipif(not SOURCES, reason="no CUDA sources")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine builds the CUDA extension itself")
def test_cuda_sources_compile_for_sm90_without_spills(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    flags = [
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-DRLHF_FAST_WITH_CUDA=1",
        "-Xptxas",
        "-v",
        *include_flags(tmp_path / "stub"),
    ]
    # Both sources at once: ~1 minute each on 2 cores.
    procs = {
        src: subprocess.Popen(
            [nvcc, *flags, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in SOURCES
    }
    failures = []
    for src, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        if proc.returncode != 0:
            failures.append(f"{src.name}: nvcc exited with {proc.returncode}\n" + "\n".join(errors[:20] or [output[-3000:]]))
            continue
        kernels = ptxas_report(output)
        if not kernels:
            failures.append(f"{src.name}: no sm_90 kernel in the ptxas report\n{output[-2000:]}")
        failures += [f"{src.name}: {name} spills {spill} bytes ({regs} registers)" for name, regs, spill in kernels if spill]
    assert not failures, "\n".join(failures)
