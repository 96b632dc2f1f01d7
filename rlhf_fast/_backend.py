"""Backend choice and argument validation shared by every public op.

Backends:
  "auto"      CUDA tensor -> the op's Triton or CUDA kernel; CPU tensor -> its C++ kernel
              where one exists, else the reference.
  "triton"    the Triton kernel (on CPU tensors only under TRITON_INTERPRET=1).
  "cpp"       the compiled extension rlhf_fast._C (C++ on CPU, CUDA on GPU).
  "reference" pure PyTorch (rlhf_fast.reference).
The environment variable RLHF_FAST_BACKEND sets the default used for backend=None/"auto"; an op
that has no kernel of that kind (e.g. gae under RLHF_FAST_BACKEND=triton) falls back to "auto"
instead of raising, so one setting can cover a whole training loop.
Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import numbers
import os
import sys
import threading
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

BACKENDS = ("auto", "triton", "cpp", "reference")


@dataclass(frozen=True)
class OpInfo:
    name: str
    triton: bool  # has a Triton kernel (CUDA tensors; CPU under TRITON_INTERPRET=1)
    cpp: bool  # has a kernel in rlhf_fast._C (registered as rlhf_fast::<cpp_name>)
    cpp_name: str | None = None


OPS: dict[str, OpInfo] = {}


def register_op(name: str, *, triton: bool = False, cpp: bool = False, cpp_name: str | None = None) -> OpInfo:
    """Record which fast implementations a public op has (used by dispatch and `rlhf_fast.info`)."""
    info = OpInfo(name, triton, cpp, cpp_name or name)
    OPS[name] = info
    return info


# ----------------------------------------------------------------------------------------------
# Extension and Triton availability (lazy, cached)

_C_state: dict = {}


def load_C():
    """Import rlhf_fast._C once; returns the module or None (the error is kept for `info`)."""
    if "module" not in _C_state:
        try:
            from rlhf_fast import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

            _C_state["module"] = _C
            _C_state["error"] = None
            # Which rlhf_fast ops have a kernel per dispatch key, read once: a plain set lookup
            # afterwards, which torch.compile can trace (the dispatcher query itself it cannot).
            _C_state["kernels"] = {
                key: frozenset(
                    name.split("::", 1)[1]
                    for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                    if name.startswith("rlhf_fast::")
                )
                for key in ("CPU", "CUDA")
            }
        except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
            _C_state["module"] = None
            _C_state["error"] = f"{type(exc).__name__}: {exc}"
    return _C_state["module"]


def C_error() -> str | None:
    load_C()
    return _C_state["error"]


def cpp_has_kernel(cpp_name: str, device_type: str) -> bool:
    """Whether rlhf_fast._C registered a kernel for rlhf_fast::<cpp_name> on this device type."""
    if load_C() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return cpp_name in _C_state["kernels"][key]


# Looked up once, at import (finding the spec does not import triton): torch.compile traces
# resolve(), and Dynamo in torch <= 2.11 refuses to trace importlib.util.find_spec (a graph break,
# so fullgraph=True failed there).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device_type: str) -> bool:
    if not triton_importable():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and triton_interpreting()


def custom_ops_untransformable() -> bool:
    """Whether this call runs where a custom op cannot be differentiated or batched: inside
    torch.func.grad / vmap / jacrev / jvp / ... (eager, or under torch.compile, where Dynamo
    evaluates the check while tracing the transform), or inside a forward-mode AD
    `torch.autograd.forward_ad.dual_level()`. torch.func.functionalize alone does not count: it
    passes custom ops through."""
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():  # (Dynamo cannot trace the interpreter stack below)
        return True
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(layer.key() != TransformType.Functionalize for layer in retrieve_all_functorch_interpreters())


def holds_dtensor(tensors) -> bool:
    """Whether any of `tensors` is a DTensor (torch.distributed.tensor, e.g. tensor-parallel logits
    under loss_parallel). The kernels are custom ops with no sharding rule. DTensors exist only
    once their module is imported, so the module (0.8 s to import) is looked up, never imported."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    return any(isinstance(t, module.DTensor) for t in tensors)


def saveable(*tensors):
    """`tensors` as ctx.save_for_backward takes them. An inference tensor (made under
    torch.inference_mode(): reference log-probs, labels or masks from a rollout) cannot be saved
    for backward, where eager PyTorch's formulas never save it; such a tensor is cloned into a
    normal one (None and other tensors pass through, no copy). For inputs whose eager formula
    never saves them only: a matmul operand (hidden, weight) is saved as it is, as eager saves it."""
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def checks_enabled() -> bool:
    """RLHF_FAST_CHECK=1 turns silent NaN outputs (bad labels) into errors (costs a host sync)."""
    return os.environ.get("RLHF_FAST_CHECK", "0") == "1"


def default_backend() -> str:
    value = os.environ.get("RLHF_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND={value!r} is not one of {BACKENDS}")
    return value


def resolve(op: str, backend: str | None, device: torch.device, *inputs: torch.Tensor | None) -> str:
    """Pick the implementation for `op` on `device`: returns "triton", "cpp" or "reference".
    `inputs`: the op's tensor arguments (None allowed), looked at for DTensors only.

    An explicit backend that the op or the machine does not have raises, naming both;
    "auto" never raises. A backend that comes from RLHF_FAST_BACKEND (backend None or "auto")
    and that this op has no kernel for falls back to "auto"; one the op has but the machine
    cannot run (triton on a CPU tensor without the interpreter, a _C that failed to load) still
    raises, since the setting then asks for something this machine does not do. Under torch.func
    transforms and forward-mode AD, and for DTensor inputs, the default is the reference and an
    explicit kernel backend raises.
    """
    from_env = backend is None or backend == "auto"
    impl = _pick(op, backend, device, from_env)
    if impl == "reference":
        return impl
    if custom_ops_untransformable():
        # torch.func cannot transform a torch.library custom op's autograd (nor batch a kernel),
        # and its own error asks for a setup_context the user cannot add.
        why = (
            "does not run under torch.func transforms (grad, vmap, jacrev, jvp, ...) or forward-mode AD: "
            "the kernels are custom ops, which these cannot differentiate or batch"
        )
    elif holds_dtensor(inputs):
        # DTensor would raise "does not have a sharding strategy registered" for the custom op; the
        # reference is plain torch ops, which DTensor shards (or redistributes) itself.
        why = "does not take DTensor inputs: the kernels are custom ops with no sharding rule"
    else:
        return impl
    if from_env:
        return "reference"
    raise RuntimeError(f"{op}: backend={impl!r} {why}. Use backend='reference' (or the default, which picks it there).")


def _pick(op: str, backend: str | None, device: torch.device, from_env: bool) -> str:
    """resolve() without the torch.func and DTensor rules."""
    info = OPS[op]
    if from_env:
        requested = default_backend()
        if requested in ("triton", "cpp") and requested not in available_backends(op):
            requested = "auto"
    else:
        requested = check_backend(op, backend)
    dev = device.type
    if requested == "auto":
        if dev == "cuda":
            if info.triton and triton_usable(dev):
                return "triton"
            if info.cpp and cpp_has_kernel(info.cpp_name, dev):
                return "cpp"
            return "reference"
        if info.cpp and cpp_has_kernel(info.cpp_name, dev):
            return "cpp"
        return "reference"
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not triton_importable():
            raise RuntimeError(f"{op}: backend='triton' but triton is not installed")
        if not triton_usable(dev):
            raise RuntimeError(
                f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {dev}"
            )
        return "triton"
    # requested == "cpp"
    if load_C() is None:
        raise RuntimeError(f"{op}: backend='cpp' but rlhf_fast._C failed to load ({C_error()})")
    if not cpp_has_kernel(info.cpp_name, dev):
        raise RuntimeError(f"{op}: rlhf_fast._C has no {dev} kernel for this op (built without CUDA?)")
    return "cpp"


def check_backend(op: str, backend: str | None) -> str | None:
    """The machine-independent checks on an explicit backend: one of BACKENDS (or None), and a
    kernel `op` has. resolve() runs them on every call, the nn.Modules at construction as well.
    Returns it unchanged."""
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" and not OPS[op].triton:
        raise ValueError(f"{op}: has no Triton kernel (available: {available_backends(op)})")
    if backend == "cpp" and not OPS[op].cpp:
        raise ValueError(f"{op}: has no C++/CUDA kernel (available: {available_backends(op)})")
    return backend


def available_backends(op: str) -> list[str]:
    info = OPS[op]
    out = ["reference"]
    if info.triton:
        out.append("triton")
    if info.cpp:
        out.append("cpp")
    return out


# ----------------------------------------------------------------------------------------------
# Validation helpers: every message names the argument.

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-token / per-sequence log-prob (and value, advantage) inputs: the logits dtypes plus fp64
# (small [B, T] / [B] tensors often come from fp64 bookkeeping); math is fp32 on kernel paths.
LOGP_DTYPES = (*FLOAT_DTYPES, torch.float64)


def check_tensor(name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} shape {tuple(b.shape)} does not match {name_a} shape {tuple(a.shape)}")


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None skipped) on one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    return device


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """The first tensor among the arguments."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def foreign_cuda_index(t: torch.Tensor | None) -> int | None:
    """The CUDA device index of `t` where it is not the current device, else None (CPU tensors,
    None, tensors on the current device). Asks CUDA nothing for a CPU tensor."""
    if t is None:
        return None
    index = t.get_device()  # -1 off CUDA; cheaper than t.device
    if index < 0 or not t.is_cuda or index == torch.cuda.current_device():
        return None
    return index


_launch_scope = threading.local()


def launch_scope_depth() -> int:
    """How many `on_input_device` launchers this thread is inside (the tests check every Triton
    launch happens inside one)."""
    return getattr(_launch_scope, "depth", 0)


def on_input_device(launcher):
    """Decorator for a kernel launcher: runs it with the CUDA device of its first tensor argument
    as the current device. Triton launches on the *current* device and its current stream, not
    on the device of the tensors it is given, so a tensor on cuda:1 while cuda:0 is current (a
    model spread over GPUs with device_map="auto", a second model on another GPU) would be read by
    a kernel running on the wrong GPU: wrong results or an illegal address. (ATen ops and the
    extension's CUDA ops guard themselves.) A no-op for CPU tensors and where the device already
    matches, which is the usual case; the callers have checked that all tensors share a device."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        depth = launch_scope_depth()
        _launch_scope.depth = depth + 1
        try:
            index = foreign_cuda_index(_first_tensor(args, kwargs))
            if index is None:
                return launcher(*args, **kwargs)
            with torch.cuda.device(index):
                return launcher(*args, **kwargs)
        finally:
            _launch_scope.depth = depth

    return wrapper


def fused_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the [B, T] gradient buffer the fused PPO losses write in the forward for inputs of
    `dtype`: the input's own, except fp32 for fp16. The buffer holds the gradient for
    grad_output = 1 and is scaled afterwards; at 1/n_tokens-sized values fp16 would already have
    rounded it into its subnormals, which torch.amp.GradScaler's scale, applied after, cannot
    undo. Autograd casts it to fp16 after the scale. (bf16 has fp32's exponent range.)"""
    return torch.float32 if dtype == torch.float16 else dtype


@contextlib.contextmanager
def env_set(name: str, value: str):
    """Environment variable `name` = value inside the block, restored (or removed) after: the
    benchmarks time a kernel switch's sides in one run (RLHF_FAST_PPO_CLUSTER, _PPO_LAUNCH)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def traced_backward(saved: torch.Tensor) -> bool:
    """Whether a custom op's backward is being traced (torch.compile's AOTAutograd, opcheck)
    rather than run. AOTAutograd traces the backward outside Dynamo, where torch <= 2.11's
    torch.compiler.is_compiling() is False; the saved tensors are fake then (FunctionalTensors
    over FakeTensors), which no eager backward sees."""
    return torch.compiler.is_compiling() or is_fake(saved)


SECOND_ORDER_ERROR = (
    b"rlhf_fast: this op's gradient is computed by its kernels and is not differentiable itself "
    b"(no double backward / create_graph=True higher-order gradients)"
)


def refuse_second_order(grad):
    """For an eager backward whose result is a kernel's buffer, not differentiable itself: under
    create_graph=True (grad mode on inside backward) the returned gradient gets a grad_fn that
    raises when differentiated again, where it would otherwise count silently as a constant and
    drop the second-order terms. Unlike @once_differentiable this does not look at whether
    grad_output requires grad: the true gradient depends on the saved inputs either way (d/dx of
    sum(kl(x))'s gradient is not 0). A no-op for None and outside create_graph."""
    if grad is None or not torch.is_grad_enabled():
        return grad
    alias = grad.detach()
    alias.requires_grad_(True)
    return torch._C._functions.DelayedError(SECOND_ORDER_ERROR, 1)(alias)


def kernel_backward(backward):
    """Decorator for an eager autograd.Function backward computed by kernels: runs it without
    building a graph and passes every tensor it returns through refuse_second_order."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        return tuple(refuse_second_order(g) if isinstance(g, torch.Tensor) else g for g in out)

    return wrapper


def overlaps_itself(t: torch.Tensor) -> bool:
    """True where two elements of `t` may share memory (an expanded / stride-0 tensor): such a
    tensor cannot take a gradient written over it in place (rows would overwrite the inputs of
    other rows), so inplace_backward falls back to a new buffer. Sliced views ([..., :V],
    [:, :-1]) do not overlap. Sufficient test, sorted by stride: each dim's stride must exceed
    the farthest offset the smaller dims reach (a nested layout); anything else counts as
    overlapping, which only costs the in-place saving."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def fp32_outputs(out):
    """The public contract returns fp32 log-probs, KLs, losses and stats; rlhf_fast.reference keeps
    fp64 inputs in fp64 (for its float64 oracle tests), so an op's reference path passes its
    result through here. Tensors, tuples and dicts of tensors; the cast is differentiable (an
    fp64 input still gets an fp64 gradient)."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == torch.float64 else out
    if isinstance(out, tuple):
        return tuple(fp32_outputs(o) for o in out)
    if isinstance(out, dict):
        return {k: fp32_outputs(v) for k, v in out.items()}
    return out


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A [B, T] mask as a Triton kernel argument: bool becomes a zero-copy uint8 view (Triton
    loads bool pointers as int1); every other dtype is passed as it is (kernels upcast to fp32)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def as_float_mask(name: str, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Validate a [B, T] mask (bool/int/float) against `like` and return it as fp32."""
    check_tensor(name, mask)
    check_same_shape("the data", like, name, mask)
    if mask.dtype == torch.float32:
        return mask
    return mask.to(torch.float32)


def check_loss_scale(value) -> float:
    """loss_scale of the fused losses: a positive float in [1e-30, 1e30]. The kernels take it as
    fp32 (and multiply it into fp32 weights): outside that range it would overflow to inf or
    underflow to 0, which the kernels would read as an uncounted token."""
    return check_float("loss_scale", value, low=1e-30, high=1e30)


def check_float(
    name: str,
    value,
    *,
    low=None,
    high=None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """Validate a hyper-parameter that must be a finite real number; returns it as a float.

    bool and non-numbers raise TypeError, NaN/inf and values outside the bounds raise ValueError;
    every message names the argument. `low`/`high` are optional bounds (inclusive by default).
    With allow_none=True, None is accepted and returned as is. Python ints and numpy scalars
    become floats; a symbolic float (torch.compile with dynamic floats) is checked by comparison
    and returned unchanged.
    """
    if value is None and allow_none:
        return None
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, int):
        value = float(value)
    # Comparisons rather than math.isfinite: they also work on symbolic floats.
    if value != value or value == math.inf or value == -math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def python_number(value):
    """A numpy scalar (numpy.float32, numpy.int64, a sweep's np.linspace, ...: any numbers.Integral
    or numbers.Real that is no Python number) as the Python int / float it stands for; anything
    else unchanged, for the caller's check to refuse (numpy.bool_ is neither; a tensor stays a
    tensor: as a hyper-parameter a 0-d CUDA tensor would cost a host sync per call)."""
    if value is None or isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):  # no ABC check
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_int(name: str, value, *, low=None, high=None) -> int:
    """Validate an integer argument (bool and non-integers raise TypeError; optional inclusive
    bounds raise ValueError); every message names the argument. Returns it, a numpy integer
    (numpy.int64 and the like) as a Python int."""
    if not isinstance(value, (int, torch.SymInt)) and isinstance(value, numbers.Integral):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value
