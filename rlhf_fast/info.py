"""`python -m rlhf_fast.info`: version, toolchain, extension status and the backend each op uses.

Reports what "auto" picks for a CPU tensor and for a CUDA tensor on this machine. It asks the
driver whether a GPU exists but never initialises CUDA.
"""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from rlhf_fast import _backend
from rlhf_fast._version import __version__

# Importing these registers every public op with the dispatcher (see rlhf_fast/__init__.py).
_OP_MODULES = sorted(set(importlib.import_module("rlhf_fast")._EXPORTS.values()) - {"rlhf_fast.modules"})


def collect() -> dict:
    """Everything `info` prints, as a dict (also used by the benchmark report)."""
    import_errors = {}
    for name in _OP_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken op module must show up here, not hide the others
            import_errors[name] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    C = _backend.load_C()
    with_cuda = bool(C.with_cuda()) if C is not None else False
    cuda_archs = C.cuda_archs() if C is not None else ""
    # The sm_90 cluster kernel of ppo_loss_from_logits (rows of 128256 bf16 as the probe); asking
    # initialises CUDA, so only where a GPU exists and the extension has CUDA code.
    ppo_cluster = None
    if with_cuda and torch.cuda.is_available():
        try:
            from rlhf_fast.kernels.ppo_from_logits import cluster_blocks_on_device

            ppo_cluster = cluster_blocks_on_device()
        except Exception:  # noqa: BLE001 - informational only (e.g. triton missing)
            ppo_cluster = 0
    ops = {}
    for name in sorted(_backend.OPS):
        row = {"available": _backend.available_backends(name)}
        for dev in ("cpu", "cuda"):
            row[dev] = _backend.resolve(name, "auto", torch.device(dev))
        ops[name] = row
    return {
        "rlhf_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_interpret": _backend.triton_interpreting(),
        "default_backend": _backend.default_backend(),
        "extension_loaded": C is not None,
        "extension_error": _backend.C_error(),
        "extension_with_cuda": with_cuda,
        "extension_cuda_archs": cuda_archs,
        "ppo_cluster_blocks": ppo_cluster,
        "ops": ops,
        "import_errors": import_errors,
    }


def main(argv=None) -> int:
    info = collect()
    print(f"rlhf_fast {info['rlhf_fast']}  (python {info['python']}, torch {info['torch']}, "
          f"torch CUDA {info['torch_cuda'] or 'none'}, triton {info['triton'] or 'not installed'})")
    print(f"GPU: {info['cuda_device'] or 'none'}   TRITON_INTERPRET={int(info['triton_interpret'])}   "
          f"RLHF_FAST_BACKEND default: {info['default_backend']}")
    if info["extension_loaded"]:
        cuda = f"with CUDA (archs {info['extension_cuda_archs']})" if info["extension_with_cuda"] else "CPU only"
        print(f"extension rlhf_fast._C: loaded, {cuda}")
        if info["ppo_cluster_blocks"] is not None:
            blocks = info["ppo_cluster_blocks"]
            state = f"on ({blocks} blocks per 128256-wide bf16 row)" if blocks else "off (needs sm_90 and compute_90 code)"
            print(f"ppo_loss_from_logits sm_90 cluster kernel: {state}")
    else:
        print(f"extension rlhf_fast._C: NOT loaded ({info['extension_error']})")
    print()
    width = max(len(n) for n in info["ops"]) if info["ops"] else 10
    print(f"{'op':<{width}}  {'CPU tensor':<10}  {'CUDA tensor':<11}  implementations")
    for name, row in info["ops"].items():
        print(f"{name:<{width}}  {row['cpu']:<10}  {row['cuda']:<11}  {', '.join(row['available'])}")
    for mod, err in info["import_errors"].items():
        print(f"! {mod} failed to import: {err}")
    return 1 if info["import_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
