"""Compile every Triton kernel of rlhf_fast for sm_90 (H100) on a machine without a GPU.

Why this exists: CI has no GPU and runs the Triton kernels under TRITON_INTERPRET=1, which never
runs Triton's code generator. A kernel can pass every CPU test and still fail to compile on the
GPU (a plain "" default of a tl.constexpr helper argument broke every log-prob forward kernel on
Triton 3.6), or compile into a kernel that spills registers. This script catches both without a GPU.

How: triton's `JITFunction.run` is replaced by a hook, then the REAL launchers of kernels/*.py
(imported as rlhf_fast.kernels.*) are called with CPU tensors. The hook binds and specializes the
arguments exactly as a launch does (dtypes, constexprs, 16-divisibility, i32/i64 ints, num_warps),
then compiles for GPUTarget("cuda", 90, 32) with triton.compile and returns without launching.
Register and stack use come from the cubin, read with the cuobjdump bundled with Triton.

Usage (WITHOUT TRITON_INTERPRET: it is removed from the environment before triton is imported,
as under the interpreter @triton.jit gives InterpretedFunction objects, which cannot be compiled):

    python tests/aot_compile_sm90.py [--full] [--json OUT]

Default: a subset that still compiles every kernel, each dtype (fp32/bf16/fp16), each constexpr
mode switch, bool and float masks, and one i64 specialization per row kernel (every int argument
+ 2**32, as for N * V >= 2**31). --full: every combination (about 6 minutes on 2 cores).
Prints one line per compiled variant and a summary. Exit status: 0 all compiled without spills;
1 a variant failed to compile, a launcher raised, a variant has a nonzero stack frame, or a
kernel of kernels/*.py was not compiled; 3 this Triton lacks the internals or the NVIDIA tools
the hook needs (tests/test_triton_sm90_compile.py then skips).

The kernels compiled are those of the checkout this file is in (kernels/ is mapped onto
rlhf_fast.kernels here, as setup.py does), whatever rlhf_fast the interpreter has installed.
By the project's layering all @triton.jit code lives in kernels/ (rlhf_fast/*.py has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

EXIT_UNSUPPORTED = 3
REPO_ROOT = Path(__file__).resolve().parent.parent
ARCH = 90
I64_SHIFT = 2**32  # added to every int argument of an "i64" case: forces Triton's i64 specialization
SCHEDULES = ("split", "pdl", "fused")  # kernels/ppo.py's launch schedules
MANY_REGISTERS = 128  # more than this per thread: fewer than 2 blocks of 256 threads per SM

try:
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit as triton_jit
except ImportError as exc:  # pragma: no cover - depends on the installed triton
    print(f"aot_compile_sm90: cannot import the triton internals it needs: {exc}")
    sys.exit(EXIT_UNSUPPORTED)

# Triton 3.9 warns once that its fp-fusion default will change; a real launch compiles with the
# same default, so the warning is only noise here.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def nvidia_tools_dir() -> Path:
    """Where Triton bundles ptxas and cuobjdump (tests/test_triton_sm90_compile.py checks the same)."""
    return Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"


# ------------------------------------------------------------------------------------------------
# The compile hook


@dataclasses.dataclass
class Case:
    """One call of a real launcher, with the tensors it is given."""

    label: str
    call: Callable[[], object]
    i64: bool = False  # every int argument + 2**32 (the int64-offset specialization)


@dataclasses.dataclass
class Variant:
    """One compiled specialization of one kernel."""

    kernel: str
    config: str  # constexprs and num_warps
    signature: str  # runtime argument types (see compile_launch)
    case: str  # the launcher call that produced it
    ok: bool
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    error: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) per thread of the (single) kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        dump = subprocess.run(
            [str(nvidia_tools_dir() / "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    registers = stack = None
    for token in dump.replace(",", " ").split():
        if token.startswith("REG:"):
            registers = max(registers or 0, int(token[4:]))
        elif token.startswith("STACK:"):
            stack = max(stack or 0, int(token[6:]))
    if registers is None or stack is None:
        raise RuntimeError(f"no REG:/STACK: in the output of cuobjdump --dump-resource-usage: {dump[:300]!r}")
    return registers, stack


def compile_error_summary(exc: Exception) -> str:
    """The error's last line, then the kernel source line Triton points at (the line above its ^)."""
    lines = [line for line in "".join(traceback.format_exception_only(type(exc), exc)).splitlines() if line.strip()]
    cause = lines[-1].strip()
    carets = [i for i, line in enumerate(lines) if line.strip() == "^" and i > 0]
    where = f"  (at: {lines[carets[-1] - 1].strip()})" if carets else ""
    return (cause + where)[:800]


def _type_name(kind: str, specialization) -> str:
    """A runtime argument's type as compiled: ints get "/16" when specialized as divisible by 16;
    pointers are 16-byte aligned in every case here, one that is not is marked "/unaligned"."""
    divisible = specialization[1] == "D"
    if kind.startswith("*"):
        return kind if divisible else kind + "/unaligned"
    return kind + "/16" if divisible else kind


class Sm90Compiler:
    """Replaces JITFunction.run: bind + specialize as a launch would, compile for sm_90, no launch."""

    def __init__(self):
        self.target = GPUTarget("cuda", ARCH, 32)
        self.backend = make_backend(self.target)
        self.variants: dict[str, Variant] = {}
        self.launcher_errors: list[tuple[str, str]] = []
        self.case = ""
        self.widen_ints = False
        self._binders = {}

    def install(self) -> None:
        compiler = self

        def run(jit_fn, *args, grid, warmup, **kwargs):  # returns None: nothing was launched
            compiler.compile_launch(jit_fn, args, kwargs)

        triton_jit.JITFunction.run = run

    def compile_launch(self, jit_fn, args, kwargs) -> None:
        kwargs["debug"] = kwargs.get("debug", getattr(jit_fn, "debug", None)) or False
        if self.widen_ints:
            args = tuple(a + I64_SHIFT if type(a) is int else a for a in args)
        binder = self._binders.get(id(jit_fn))
        if binder is None:
            binder = triton_jit.create_function_from_signature(jit_fn.signature, jit_fn.params, self.backend)
            self._binders[id(jit_fn)] = binder
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit_fn._pack_args(
            self.backend, kwargs, bound_args, specialization, options
        )
        config = ",".join(
            [f"{jit_fn.arg_names[path[0]]}={value}" for path, value in constexprs.items()]
            + [f"warps={options.num_warps}"]
        )
        runtime_types = [
            _type_name(kind, spec) for kind, spec in zip(signature.values(), specialization) if kind != "constexpr"
        ]
        key = f"{jit_fn.__name__}[{config}]({','.join(runtime_types)})"
        if key in self.variants:
            return
        variant = Variant(jit_fn.__name__, config, " ".join(runtime_types), self.case, ok=False)
        self.variants[key] = variant
        if self.widen_ints and "i64" not in signature.values():
            variant.error = "an i64 case compiled no i64 argument (the int widening did not take)"
            return
        try:
            kernel = triton.compile(
                ASTSource(jit_fn, signature, constexprs, attrs), target=self.target, options=options.__dict__
            )
            variant.registers, variant.stack_bytes = resource_usage(kernel.asm["cubin"])
            variant.shared_bytes = kernel.metadata.shared
            variant.ok = True
        except Exception as exc:  # noqa: BLE001 - any compiler error is a finding to report
            variant.error = compile_error_summary(exc)

    def run_case(self, case: Case) -> None:
        self.case, self.widen_ints = case.label, case.i64
        try:
            case.call()
        except Exception as exc:  # noqa: BLE001
            self.launcher_errors.append((case.label, repr(exc)[:800]))
        finally:
            self.widen_ints = False


@triton.jit
def _hook_probe_kernel(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs.to(tl.float32), mask=offs < n)


def unsupported_reason() -> str | None:
    """Why the hook cannot work with this triton (missing internals or NVIDIA tools), or None."""
    for name in ("create_function_from_signature", "JITFunction"):
        if not hasattr(triton_jit, name):
            return f"triton.runtime.jit.{name} is missing"
    for name in ("_pack_args", "signature", "params", "arg_names"):
        if not hasattr(_hook_probe_kernel, name):
            return f"triton.runtime.jit.JITFunction.{name} is missing"
    for tool in ("ptxas", "cuobjdump"):
        if not (nvidia_tools_dir() / tool).is_file():
            return f"no bundled {tool} in {nvidia_tools_dir()} (triton without its CUDA backend?)"
    try:
        probe = Sm90Compiler()
    except Exception as exc:  # noqa: BLE001
        return f"no sm_{ARCH} backend in this triton: {exc!r}"
    # The private API must still mean what the hook assumes: a trivial kernel has to go through.
    saved_run = triton_jit.JITFunction.run
    probe.install()
    try:
        probe.run_case(Case("hook probe", lambda: _hook_probe_kernel[(1,)](torch.empty(4), 4, BLOCK=16)))
    finally:
        triton_jit.JITFunction.run = saved_run
    if probe.launcher_errors:
        return f"the compile hook does not fit this triton's internals: {probe.launcher_errors[0][1]}"
    broken = [v for v in probe.variants.values() if not v.ok]
    if broken or not probe.variants:
        return f"a trivial probe kernel does not compile: {broken[0].error if broken else 'not reached'}"
    return None


# ------------------------------------------------------------------------------------------------
# The launcher calls


def import_checkout_kernels():
    """rlhf_fast from this checkout with kernels/ mapped onto rlhf_fast.kernels (as setup.py does);
    the installed rlhf_fast.kernels when tests/ runs away from a checkout (next to an installed
    wheel, as bench/gpu_session.sh does)."""
    if not (REPO_ROOT / "kernels").is_dir() or not (REPO_ROOT / "rlhf_fast").is_dir():
        import rlhf_fast.kernels as installed

        kernels_dir = Path(installed.__file__).resolve().parent
        return {
            info.name: importlib.import_module(f"rlhf_fast.kernels.{info.name}")
            for info in pkgutil.iter_modules([str(kernels_dir)])
        }
    sys.path.insert(0, str(REPO_ROOT))
    import rlhf_fast

    if Path(rlhf_fast.__file__).resolve().parent != REPO_ROOT / "rlhf_fast":
        raise RuntimeError(f"rlhf_fast resolves to {rlhf_fast.__file__}, not to this checkout {REPO_ROOT}")
    kernels_dir = REPO_ROOT / "kernels"
    spec = importlib.util.spec_from_file_location(
        "rlhf_fast.kernels", kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["rlhf_fast.kernels"] = package
    spec.loader.exec_module(package)
    rlhf_fast.kernels = package
    modules = {}
    for info in pkgutil.iter_modules([str(kernels_dir)]):
        modules[info.name] = importlib.import_module(f"rlhf_fast.kernels.{info.name}")
    return modules


def defined_kernels(modules) -> set[str]:
    """Names of the @triton.jit kernels (by convention `_<name>_kernel`) defined in kernels/*.py."""
    return {
        name
        for module in modules.values()
        for name, obj in vars(module).items()
        if isinstance(obj, triton_jit.JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__
    }


FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (FP32, BF16, FP16)
DTYPE_NAMES = {FP32: "fp32", BF16: "bf16", FP16: "fp16"}
ROWS = 4  # tokens per row-kernel call (B = 1, T = 4)
KL_KINDS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
BIG_V = 32000  # BLOCK_V 2048, 8 warps: the production row config
ODD_V = 1271  # also BLOCK_V 2048, but V and the row strides are not multiples of 16
SMALL_V = (100, 600)  # the 2- and 4-warp rows of _rows.WARPS_BY_BLOCK


class Cases:
    """Builders of launcher calls, one per launcher; each returns a Case to run later."""

    def __init__(self, modules):
        self.kernels = modules

    # -- vocabulary-row kernels: log-probs, PPO from logits, in-place grad scale ---------------------
    # logprobs_forward modes: which of the constexpr switches HAS_LABELS / HAS_WEIGHT / WITH_ENTROPY.
    LOGPROB_MODES = ("logp", "logp+entropy", "entropy", "weighted-logp")
    # logprobs_backward modes: which gradients arrive (HAS_LABELS / HAS_GRAD_ENTROPY).
    LOGPROB_GRAD_MODES = ("d_logp", "d_logp+d_entropy", "d_entropy")

    def logprobs_forward(self, dtype, V, mode, i64=False, label_dtype=torch.int64) -> Case:
        logits = torch.zeros(1, ROWS, V, dtype=dtype)
        labels = None if mode == "entropy" else torch.zeros(ROWS, dtype=label_dtype)
        weight = torch.ones(ROWS) if mode == "weighted-logp" else None
        with_entropy = "entropy" in mode
        call = functools.partial(
            self.kernels["logprobs"].logprobs_forward, logits, labels, weight, 1.0, -100, with_entropy
        )
        return Case(_label("logprobs_forward", dtype, f"V={V}", mode, label_dtype, i64=i64), call, i64)

    def logprobs_backward(self, dtype, V, mode, i64=False) -> Case:
        logits = torch.zeros(1, ROWS, V, dtype=dtype)
        per_row = torch.zeros(ROWS)
        labels = torch.zeros(ROWS, dtype=torch.int64) if "d_logp" in mode else None
        grad_logp = per_row if "d_logp" in mode else None
        grad_entropy = per_row if "d_entropy" in mode else None
        call = functools.partial(
            self.kernels["logprobs"].logprobs_backward,
            logits,
            labels,
            grad_logp,
            grad_entropy,
            per_row,
            per_row,
            1.0,
            -100,
        )
        return Case(_label("logprobs_backward", dtype, f"V={V}", mode, i64=i64), call, i64)

    def ppo_from_logits(self, dtype, V, kl_kind, dual_clip, write_grad, i64=False, kl_clamp=None) -> Case:
        """kl_kind None: no reference log-probs (KL_NONE)."""
        logits = torch.zeros(1, ROWS, V, dtype=dtype)
        per_token = torch.zeros(1, ROWS)
        call = functools.partial(
            self.kernels["ppo_from_logits"].ppo_from_logits_fwd,
            logits,
            torch.zeros(1, ROWS, dtype=torch.int64),
            per_token,
            per_token,
            per_token + 1,
            per_token + 1,
            per_token if kl_kind is not None else None,
            torch.empty_like(logits) if write_grad else None,
            temperature=1.0,
            eps_low=0.2,
            eps_high=0.2,
            dual_clip=dual_clip,
            kl_coef=0.1,
            kl_kind=kl_kind or "k1",
            entropy_coef=0.01,
            ignore_index=-100,
            kl_clamp=kl_clamp,
        )
        flags = (f"kl={kl_kind or 'none'}", f"kl_clamp={kl_clamp}", f"dual_clip={dual_clip}")
        flags += ("write_grad" if write_grad else "no_grad",)
        return Case(_label("ppo_from_logits_fwd", dtype, f"V={V}", *flags, i64=i64), call, i64)

    def scale_rows(self, dtype, V, i64=False) -> Case:
        call = functools.partial(
            self.kernels["ppo_from_logits"].scale_grad_, torch.zeros(1, ROWS, V, dtype=dtype), torch.tensor(2.0)
        )
        return Case(_label("ppo_from_logits.scale_grad_", dtype, f"V={V}", i64=i64), call, i64)

    # -- [B, T] PPO losses ---------------------------------------------------------------------------
    def _with_schedule(self, call, schedule: str):
        """The launcher call with kernels/ppo.py's launch schedule forced (CPU tensors always run
        split; an sm_90 GPU runs fused by default, or pdl): a fused launch is sized for a 132-SM
        device at one program per SM (the hook returns no compiled kernel to learn more from)."""
        if schedule == "split":
            return call
        ppo = self.kernels["ppo"]
        patches = {
            "launch_schedule": lambda device: schedule,
            "_device_index": lambda device: 0,
            "_sm_count": lambda index: 132,
        }

        def forced():
            saved = {name: getattr(ppo, name) for name in patches}
            for name, value in patches.items():
                setattr(ppo, name, value)
            try:
                call()
            finally:
                for name, value in saved.items():
                    setattr(ppo, name, value)

        return forced

    def ppo_policy(self, dtype, shape, mask_dtype, agg, dual_clip, write_grad, schedule="split") -> Case:
        x = torch.zeros(*shape, dtype=dtype)
        mask = torch.ones(*shape, dtype=mask_dtype)
        call = functools.partial(
            self.kernels["ppo"].ppo_policy_forward, x, x, x, mask, 0.2, 0.2, dual_clip, agg, 16.0, write_grad
        )
        flags = (f"dual_clip={dual_clip}", "write_grad" if write_grad else "no_grad", schedule)
        label = _label("ppo_policy_forward", dtype, f"{shape}", f"mask={mask_dtype}", agg, *flags)
        return Case(label, self._with_schedule(call, schedule))

    def ppo_value(self, dtype, shape, mask_dtype, agg, write_grad, schedule="split") -> Case:
        x = torch.zeros(*shape, dtype=dtype)
        mask = torch.ones(*shape, dtype=mask_dtype)
        call = functools.partial(self.kernels["ppo"].ppo_value_forward, x, x, x, mask, 0.2, agg, 16.0, write_grad)
        flags = ("write_grad" if write_grad else "no_grad", schedule)
        label = _label("ppo_value_forward", dtype, f"{shape}", f"mask={mask_dtype}", agg, *flags)
        return Case(label, self._with_schedule(call, schedule))

    def ppo_scale(self, dtype, shape) -> Case:
        call = functools.partial(self.kernels["ppo"].scale_grad_, torch.zeros(*shape, dtype=dtype), torch.tensor(2.0))
        return Case(_label("ppo.scale_grad_", dtype, f"{shape}"), call)

    # -- KL ------------------------------------------------------------------------------------------
    def kl_forward(self, dtype, n, kind, clamp) -> Case:
        x = torch.zeros(n, dtype=dtype)
        call = functools.partial(self.kernels["kl"].kl_forward, x, x, kind, clamp)
        return Case(_label("kl_forward", dtype, f"n={n}", kind, f"clamp={clamp}"), call)

    def kl_backward(self, dtype, n, kind, clamp, need_logp, need_ref) -> Case:
        x = torch.zeros(n, dtype=dtype)
        call = functools.partial(self.kernels["kl"].kl_backward, torch.zeros(n), x, x, kind, clamp, need_logp, need_ref)
        wanted = "+".join(name for name, on in (("d_logp", need_logp), ("d_ref", need_ref)) if on)
        return Case(_label("kl_backward", dtype, f"n={n}", kind, f"clamp={clamp}", wanted), call)

    def shape_rewards(self, dtype, T, mask_dtype, kind, coef_tensor=False) -> Case:
        x = torch.zeros(3, T, dtype=dtype)
        mask = torch.ones(3, T, dtype=mask_dtype)
        coef = torch.tensor(0.1) if coef_tensor else None  # the torch.compile form of kl_coef
        call = functools.partial(
            self.kernels["kl"].shape_rewards_forward, torch.zeros(3), x, x, mask, 0.1, kind, coef
        )
        label = _label("shape_rewards_forward", dtype, f"T={T}", f"mask={mask_dtype}", kind)
        return Case(label + (" coef=tensor" if coef_tensor else ""), call)

    # -- DPO -----------------------------------------------------------------------------------------
    def dpo(self, direction, dtype, loss_type, with_ref) -> Case:
        logps = torch.zeros(8, dtype=dtype)
        ref = logps if with_ref else None
        scalars = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.1, "gamma": 0.5, "discopop_tau": 0.05}
        dpo = self.kernels["dpo"]
        if direction == "forward":
            call = functools.partial(dpo.dpo_pair_forward, logps, logps, ref, ref, **scalars)
        else:
            call = functools.partial(dpo.dpo_pair_backward, torch.ones(8), logps, logps, ref, ref, **scalars)
        return Case(_label(f"dpo_pair_{direction}", dtype, loss_type, "ref" if with_ref else "ref-free"), call)


def _label(launcher, dtype, *details, i64=False) -> str:
    parts = [launcher, DTYPE_NAMES[dtype], *(_short(d) for d in details if d != torch.int64)]
    return " ".join(parts + (["i64"] if i64 else []))


def _short(detail) -> str:
    return {torch.bool: "bool", torch.float32: "fp32", torch.int32: "i32-labels"}.get(detail, str(detail))


def default_cases(c: Cases, modules) -> list[Case]:
    """Every kernel, dtype and constexpr mode switch at least once, and one i64 case per row kernel."""
    cases = []
    # Row kernels at the production config: every log-prob mode for every dtype, the PPO modes
    # on bf16; then a vocabulary that is no multiple of 16 (e.g. GPT-2's 50257: no divisibility
    # specialization), and the 2- and 4-warp configs once each.
    for dtype in DTYPES:
        cases += [c.logprobs_forward(dtype, BIG_V, mode) for mode in Cases.LOGPROB_MODES]
        cases += [c.logprobs_backward(dtype, BIG_V, mode) for mode in Cases.LOGPROB_GRAD_MODES]
        cases.append(c.ppo_from_logits(dtype, BIG_V, "k3", None, True))
        cases.append(c.scale_rows(dtype, BIG_V))
    cases.append(c.logprobs_forward(BF16, BIG_V, "logp", label_dtype=torch.int32))
    cases += [
        c.ppo_from_logits(BF16, BIG_V, "k1", 3.0, False),
        c.ppo_from_logits(BF16, BIG_V, "k2", 3.0, True),
        c.ppo_from_logits(BF16, BIG_V, "abs", None, False),
        c.ppo_from_logits(BF16, BIG_V, None, 3.0, True),
        c.ppo_from_logits(BF16, BIG_V, "k3", 3.0, True, kl_clamp=10.0),
        c.ppo_from_logits(BF16, BIG_V, "k3+", None, True, kl_clamp=10.0),
    ]
    cases += [
        c.logprobs_forward(BF16, ODD_V, "logp+entropy"),
        c.logprobs_backward(BF16, ODD_V, "d_logp+d_entropy"),
        c.ppo_from_logits(BF16, ODD_V, "k3", None, True),
        c.scale_rows(BF16, ODD_V),
    ]
    for V, dtype in zip(SMALL_V, (FP32, FP16)):
        cases.append(c.logprobs_forward(dtype, V, "logp"))
        cases.append(c.logprobs_backward(dtype, V, "d_logp"))
        cases.append(c.ppo_from_logits(dtype, V, "k1", None, True))
    # The int64-offset specialization (N * V >= 2**31 on the GPU) of every row kernel.
    cases += [
        c.logprobs_forward(BF16, BIG_V, "logp+entropy", i64=True),
        c.logprobs_backward(BF16, BIG_V, "d_logp+d_entropy", i64=True),
        c.ppo_from_logits(BF16, BIG_V, "k3", 3.0, True, i64=True),
        c.scale_rows(BF16, BIG_V, i64=True),
    ]

    # [B, T] PPO: every dtype, both losses, both mask kinds, every aggregation, dual clip and
    # write_grad on and off; the big-tile shape plus one tiny one (other tile / reduce configs).
    aggs = list(modules["ppo"].AGG_CODES)
    big, tiny = (1024, 8192), (4, 7)
    cases += [
        c.ppo_policy(FP32, big, torch.bool, aggs[0], None, True),
        c.ppo_policy(BF16, big, torch.float32, aggs[1], 3.0, True),
        c.ppo_policy(FP16, big, torch.bool, aggs[2], 3.0, False),
        c.ppo_policy(FP32, tiny, torch.float32, aggs[3], None, False),
        c.ppo_value(BF16, big, torch.bool, aggs[3], True),
        c.ppo_value(FP16, big, torch.float32, aggs[0], False),
        c.ppo_scale(BF16, big),
        # what a GPU runs: one cooperative launch (fused, the default), or programmatic dependent
        # launch (griddepcontrol, sm_90+)
        c.ppo_policy(FP32, big, torch.float32, aggs[0], None, True, "fused"),
        c.ppo_policy(FP32, big, torch.bool, aggs[0], None, True, "fused"),
        c.ppo_policy(FP16, big, torch.bool, aggs[0], None, False, "fused"),
        c.ppo_policy(BF16, big, torch.bool, aggs[2], 3.0, True, "fused"),
        c.ppo_value(FP32, big, torch.float32, aggs[1], True, "fused"),
        c.ppo_policy(FP32, tiny, torch.bool, aggs[3], 3.0, False, "fused"),
        c.ppo_policy(FP32, big, torch.float32, aggs[0], None, True, "pdl"),
        c.ppo_policy(BF16, big, torch.bool, aggs[2], 3.0, True, "pdl"),
        c.ppo_value(FP32, big, torch.float32, aggs[1], True, "pdl"),
    ]

    # KL: each kind with and without a clamp, each dtype, each gradient selection; both
    # shape_rewards block configs.
    cases += [
        c.kl_forward(FP32, 100000, "k1", None),
        c.kl_forward(BF16, 100000, "k2", 10.0),
        c.kl_forward(FP16, 100000, "k3", None),
        c.kl_forward(BF16, 100000, "abs", 10.0),
        c.kl_backward(FP32, 100000, "k1", 10.0, True, True),
        c.kl_backward(BF16, 100000, "k2", None, True, False),
        c.kl_backward(FP16, 100000, "k3", None, False, True),
        c.kl_backward(BF16, 100000, "abs", 10.0, True, True),
        c.kl_forward(BF16, 100000, "k3+", 10.0),
        c.kl_backward(BF16, 100000, "k3+", 10.0, True, True),
        c.shape_rewards(FP32, 5000, torch.bool, "k1"),
        c.shape_rewards(BF16, 5000, torch.float32, "k2"),
        c.shape_rewards(FP16, 7, torch.bool, "k3"),
        c.shape_rewards(BF16, 5000, torch.bool, "abs"),
        c.shape_rewards(FP32, 5000, torch.bool, "k3", coef_tensor=True),
    ]

    # DPO: every loss type forward and backward, dtypes in turn, with and without reference.
    for i, loss_type in enumerate(modules["dpo"].LOSS_MODES):
        dtype, with_ref = DTYPES[i % 3], loss_type != "ipo"
        cases += [c.dpo("forward", dtype, loss_type, with_ref), c.dpo("backward", dtype, loss_type, with_ref)]
    return cases


def full_cases(c: Cases, modules) -> list[Case]:
    """The whole matrix: every dtype x size config x mode combination (and i64 row cases)."""
    cases = []
    for i64 in (False, True):
        for dtype in DTYPES:
            for V in (100, 600, 1271, 32000, 128256):
                cases += [c.logprobs_forward(dtype, V, mode, i64=i64) for mode in Cases.LOGPROB_MODES]
                cases.append(c.logprobs_forward(dtype, V, "logp", i64=i64, label_dtype=torch.int32))
                cases += [c.logprobs_backward(dtype, V, mode, i64=i64) for mode in Cases.LOGPROB_GRAD_MODES]
                for kind in (None, *KL_KINDS):
                    for dual_clip in (None, 3.0):
                        for write_grad in (True, False):
                            cases.append(c.ppo_from_logits(dtype, V, kind, dual_clip, write_grad, i64=i64))
                cases.append(c.scale_rows(dtype, V, i64=i64))
    for dtype in DTYPES:
        for shape in ((4, 7), (64, 1024), (1024, 8192)):
            for mask_dtype in (torch.bool, torch.float32):
                for agg in modules["ppo"].AGG_CODES:
                    for dual_clip in (None, 3.0):
                        for write_grad in (True, False):
                            for schedule in SCHEDULES:
                                cases.append(
                                    c.ppo_policy(dtype, shape, mask_dtype, agg, dual_clip, write_grad, schedule)
                                )
                    for write_grad in (True, False):
                        for schedule in SCHEDULES:
                            cases.append(c.ppo_value(dtype, shape, mask_dtype, agg, write_grad, schedule))
            cases.append(c.ppo_scale(dtype, shape))
        for n in (10, 100000):
            for kind in KL_KINDS:
                for clamp in (None, 10.0):
                    cases.append(c.kl_forward(dtype, n, kind, clamp))
                    for need_logp, need_ref in ((True, True), (True, False), (False, True)):
                        cases.append(c.kl_backward(dtype, n, kind, clamp, need_logp, need_ref))
        for T in (7, 5000):
            for mask_dtype in (torch.bool, torch.float32):
                for kind in KL_KINDS:
                    cases.append(c.shape_rewards(dtype, T, mask_dtype, kind))
                    cases.append(c.shape_rewards(dtype, T, mask_dtype, kind, coef_tensor=True))
        for loss_type in modules["dpo"].LOSS_MODES:
            for with_ref in (True, False):
                for direction in ("forward", "backward"):
                    cases.append(c.dpo(direction, dtype, loss_type, with_ref))
    return cases


# ------------------------------------------------------------------------------------------------


def report(compiler: Sm90Compiler, uncovered: set[str], seconds: float, full: bool) -> bool:
    """Print the per-variant lines and the summary; True when everything passed."""
    variants = sorted(compiler.variants.values(), key=lambda v: (v.kernel, v.config, v.signature))
    for v in variants:
        if v.ok:
            flag = "  SPILLS" if v.spills else ("  (>128 regs)" if v.registers > MANY_REGISTERS else "")
            print(
                f"OK   regs={v.registers:3d} stack={v.stack_bytes:3d} smem={v.shared_bytes:5d}  "
                f"{v.kernel}[{v.config}] ({v.signature}){flag}"
            )
        else:
            print(f"FAIL {v.kernel}[{v.config}] ({v.signature})\n     from: {v.case}\n     {v.error}")
    failed = [v for v in variants if not v.ok]
    spilled = [v for v in variants if v.ok and v.spills]
    compiled = [v for v in variants if v.ok]
    print()
    print(
        f"triton {triton.__version__}, sm_{ARCH}, {'full' if full else 'default'} mode: {len(variants)} variants "
        f"of {len({v.kernel for v in variants})} kernels in {seconds:.0f} s: {len(compiled)} compiled, "
        f"{len(failed)} failed, {len(spilled)} with a stack frame (spills), "
        f"{len(compiler.launcher_errors)} launcher errors"
    )
    if compiled:
        most = max(compiled, key=lambda v: v.registers)
        print(f"most registers: {most.registers} ({most.kernel}[{most.config}])")
    for v in failed:
        print(f"  COMPILE FAILED: {v.kernel}[{v.config}] ({v.signature}) from '{v.case}': {v.error}")
    for v in spilled:
        print(f"  SPILLS: {v.kernel}[{v.config}] ({v.signature}): {v.stack_bytes} stack bytes, {v.registers} regs")
    for label, error in compiler.launcher_errors:
        print(f"  LAUNCHER RAISED: {label}: {error}")
    for name in sorted(uncovered):
        print(f"  NOT COMPILED: kernel {name} is defined in kernels/ but no case launches it")
    passed = not (failed or spilled or compiler.launcher_errors or uncovered)
    print("PASS" if passed else "FAIL")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="compile the whole matrix (many minutes)")
    parser.add_argument("--json", metavar="OUT", help="also write the variants as JSON to OUT")
    args = parser.parse_args()

    reason = unsupported_reason()
    if reason is not None:
        print(f"aot_compile_sm90: cannot run with triton {triton.__version__}: {reason}")
        return EXIT_UNSUPPORTED

    modules = import_checkout_kernels()
    compiler = Sm90Compiler()
    compiler.install()
    builders = Cases(modules)
    cases = full_cases(builders, modules) if args.full else default_cases(builders, modules)
    print(
        f"compiling the kernels of {Path(next(iter(modules.values())).__file__).parent} for sm_{ARCH}: "
        f"{len(cases)} launcher calls"
    )
    start = time.perf_counter()
    for case in cases:
        compiler.run_case(case)
    seconds = time.perf_counter() - start
    uncovered = defined_kernels(modules) - {v.kernel for v in compiler.variants.values()}
    passed = report(compiler, uncovered, seconds, args.full)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "triton": triton.__version__,
                    "arch": ARCH,
                    "mode": "full" if args.full else "default",
                    "passed": passed,
                    "variants": [dataclasses.asdict(v) for v in compiler.variants.values()],
                    "launcher_errors": [{"case": c, "error": e} for c, e in compiler.launcher_errors],
                    "uncovered_kernels": sorted(uncovered),
                },
                f,
                indent=1,
            )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
