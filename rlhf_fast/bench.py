"""`python -m rlhf_fast.bench`: every op of rlhf_fast side by side with what users run today.

For each case (op, shape, dtype, fwd or fwd+bwd) it
  * checks rlhf_fast (backend "auto", or --backend) against rlhf_fast.reference on the same inputs
    (outputs and gradients; fp32 reference gradients for low-precision inputs; a row subset at the
    GPU sizes, said so in the notes) with the per-dtype tolerance of the test suite;
  * times rlhf_fast and its peers: the eager PyTorch composition, torch.compile of it, and on a
    GPU Liger-Kernel / Cut-Cross-Entropy when importable (CUDA events, L2 flushed between reps;
    time.perf_counter on CPU; median of the reps);
  * reports the floor: the bytes the op must move (its bytes-moved model) / the device-to-device copy
    bandwidth measured in the same run, and the peak memory above the inputs (GPU only).

Sizes: the peers' H100 anchor sizes on a GPU, small ones on CPU (the full CPU run takes well
under a minute on two cores). Prints one Markdown table and writes
<out>/<device>-<date>.json and .md (and PNG plots when matplotlib is installed).
Exit status 1 when any check fails or rlhf_fast raises; an op whose module is not there yet is
reported as "unavailable" and does not fail the run.

    python -m rlhf_fast.bench [--ops logprobs,ppo,...] [--quick] [--dtype bf16|fp16|fp32]
                              [--out DIR] [--no-compile | --compile] [--reps N] [--threads N]
                              [--backend auto|triton|cpp|reference] [--device auto|cpu|cuda]

torch.compile is slow to compile on CPU: a CPU --quick run leaves it out unless --compile is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import types
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_fast import _bench_cases, _bench_targets
from rlhf_fast._bench_cases import DTYPE_NAMES, DTYPES, SPECS, Case, OpSpec

# Per-dtype (atol, rtol), as tests/conftest.py: values computed in fp32 from inputs of that dtype
# against the fp32 reference on the same (already rounded) inputs. atol is relative to the largest
# magnitude of the reference tensor (gradients of a token-mean loss are O(1/N)).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

# Above this many logits elements, the check vs the reference runs on a row subset (the fp32
# reference materialises several [N, V] fp32 intermediates).
CHECK_MAX_ELEMS = 2**27

# On CPU the Triton kernels are also checked against the reference under TRITON_INTERPRET=1 (the
# interpreter is slow: on a slice of at most this many elements of the largest input).
KERNEL_CHECK_MAX_ELEMS = 2**15

# Hook for testing the harness and for benchmarking an alternative implementation: public API
# name -> callable used instead of rlhf_fast.<name> (same signature, backend= included).
FAST_OVERRIDES: dict[str, Callable] = {}

# "split" and "no-pdl": the split launch's column while fused was the CUDA default (commits a96c60b to
# 9d4c6d3 named it no-pdl; no committed report has either), kept so that --merge still reads a JSON
# written then. Split is the default now, so its times are in the rlhf_fast column.
PEER_ORDER = (
    "rlhf_fast", "eager", "compile", "inplace", "triton-rows", "fused", "pdl", "split", "no-pdl", "liger", "cce"
)
PEER_TITLES = {
    "rlhf_fast": "rlhf_fast",
    "inplace": "rlhf_fast inplace_backward",
    "eager": "eager",
    "compile": "compile",
    "triton-rows": "rlhf_fast triton-rows",
    "fused": "rlhf_fast fused",
    "pdl": "rlhf_fast pdl",
    "split": "rlhf_fast split",
    "no-pdl": "rlhf_fast no-PDL",
    "liger": "Liger",
    "cce": "CCE",
}


# ----------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class PeerResult:
    status: str  # "ok" | "unavailable" | "skipped" | "error" | "oom" | "n/a"
    ms: float | None = None
    reps: int = 0
    extra_gb: float | None = None
    compile_s: float | None = None
    note: str = ""


@dataclasses.dataclass
class CheckResult:
    status: str  # "ok" | "fail" | "error" | "not run"
    max_abs_err: float | None = None
    tensors: list = dataclasses.field(default_factory=list)
    note: str = ""


@dataclasses.dataclass
class CaseResult:
    case: Case
    backend: str = "-"
    bytes_moved: int = 0
    floor_ms: float | None = None
    floor_note: str = ""
    peers: dict = dataclasses.field(default_factory=dict)  # name -> PeerResult
    check: CheckResult = dataclasses.field(default_factory=lambda: CheckResult("not run"))
    kernel_check: CheckResult | None = None  # CPU: the Triton kernel under the interpreter
    notes: list = dataclasses.field(default_factory=list)
    harness_error: str = ""  # the case itself raised (inputs, harness): no rlhf_fast result at all

    @property
    def failed(self) -> bool:
        return (
            bool(self.harness_error)
            or self.check.status in ("fail", "error")
            or (self.kernel_check is not None and self.kernel_check.status in ("fail", "error"))
            or self.peers.get("rlhf_fast", PeerResult("n/a")).status == "error"
        )


# ----------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Median time of fn() in ms. CUDA: events around each rep, L2 flushed before each by reading
    a 256 MiB buffer (a read, not a zero_: zeroing would leave ~50 MB of dirty lines in L2 whose
    write-back the timed op would then pay for, ~17 us at 3 TB/s); for a call shorter than
    QUEUE_BELOW_S the GPU is first held by a spin kernel long enough for the host to queue every
    rep, so the events time the GPU work, not the host's launch overhead (in a training step the
    host runs ahead of the GPU too). CPU: perf_counter. Reps are cut to fit budget_s per
    measurement."""

    QUEUE_BELOW_S = 2e-3

    def __init__(self, device: torch.device, reps: int, warmup: int, budget_s: float):
        self.device = device
        self.reps = reps
        self.warmup = warmup
        self.budget_s = budget_s
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable, warmup: int | None = None) -> tuple[float, int, float]:
        """Returns (median ms, reps, seconds of the first warmup call)."""
        warmup = self.warmup if warmup is None else warmup
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        first_s = time.perf_counter() - t0
        del out
        t_est = first_s
        for _ in range(max(0, warmup - 1)):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            t_est = time.perf_counter() - t0
            del out
        reps = max(2, min(self.reps, int(self.budget_s / max(t_est, 1e-6))))
        times = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            if t_est < self.QUEUE_BELOW_S:
                # t_est (one synchronised call) bounds the host time per rep; cycles at <= 2 GHz.
                torch.cuda._sleep(int(min(1.5 * reps * t_est, 0.25) * 2e9))
            for i in range(reps):
                self.flush.sum()
                starts[i].record()
                out = fn()
                ends[i].record()
                del out
            self.sync()
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
                del out
        return statistics.median(times), reps, first_s

    def peak_extra_gb(self, fn: Callable) -> float | None:
        """Peak memory allocated by fn() (outputs included) above what was allocated before."""
        if not self.cuda:
            return None
        gc.collect()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return peak / 1e9


def copy_bandwidth(device: torch.device) -> tuple[float, str]:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), measured now."""
    if device.type == "cuda":
        n = 2**30 // 4  # 1 GiB of fp32
        src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        nbytes = 2 * src.numel() * 4
        del src, dst
        return nbytes / statistics.median(times), "copy of a 1 GiB device buffer"
    n = 64 * 2**20 // 4  # 64 MiB: well past the caches
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times), f"copy of a 64 MiB tensor, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# Running one implementation: forward only, or forward + backward


def _leaves(spec: OpSpec, inputs: dict, mode: str) -> dict:
    """Inputs for one implementation: in fwd+bwd mode the grad inputs are fresh leaves."""
    if mode != "fwd+bwd":
        return inputs
    out = dict(inputs)
    for name in spec.grad_inputs:
        out[name] = inputs[name].detach().requires_grad_(True)
    return out


def _upcast_leaves(spec: OpSpec, inputs: dict, mode: str) -> dict:
    """Reference inputs: low-precision grad inputs upcast to fp32 so its gradients are fp32 (the
    forward is unchanged: the reference computes in fp32 from the same rounded values)."""
    out = dict(inputs)
    for name in spec.grad_inputs:
        t = inputs[name].detach()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        out[name] = t.requires_grad_(mode == "fwd+bwd")
    return out


def make_step(spec: OpSpec, forward: Callable, inputs: dict, mode: str) -> Callable:
    """A no-argument callable running forward (and the backward from spec.diff_outputs, with the
    upstream gradients of spec.grad_out_keys) that returns (outputs, grads)."""
    if mode == "fwd":

        def step_fwd():
            with torch.no_grad():
                return forward(inputs), ()

        return step_fwd

    leaves_fn = getattr(forward, "grad_leaves", None)

    def step():
        outs = forward(inputs)
        diff = [outs[i] for i in spec.diff_outputs]
        grad_outs = [None if k is None else inputs[k] for k in spec.grad_out_keys]
        leaves = leaves_fn(inputs) if leaves_fn is not None else [inputs[n] for n in spec.grad_inputs]
        grads = torch.autograd.grad(diff, leaves, grad_outs, allow_unused=True)
        return outs, grads

    return step


# ----------------------------------------------------------------------------------------------
# Check against the reference


def compare(name: str, got, want, dtype: torch.dtype) -> dict:
    """Max |got - want| and whether every element is within atol * max|want| + rtol * |want|.
    NaN must match NaN; equal infinities count as equal."""
    atol, rtol = TOL.get(dtype, TOL[torch.float32])
    if got is None or want is None:
        ok = got is None and want is None
        return {"name": name, "max_abs_err": 0.0 if ok else math.inf, "ok": ok, "why": "" if ok else "missing"}
    if tuple(got.shape) != tuple(want.shape):
        return {
            "name": name,
            "max_abs_err": math.inf,
            "ok": False,
            "why": f"shape {tuple(got.shape)} != reference {tuple(want.shape)}",
        }
    # float64 on the tensors' device (a GPU check subset is ~1 GB per tensor in float64)
    g = got.detach().to(want.device, torch.float64)
    w = want.detach().to(torch.float64)
    nan_g, nan_w = torch.isnan(g), torch.isnan(w)
    same_inf = torch.isinf(g) & torch.isinf(w) & (g == w)
    diff = torch.where(nan_g | nan_w | same_inf, torch.zeros_like(g), (g - w).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    finite_w = torch.where(torch.isfinite(w), w.abs(), torch.zeros_like(w))
    scale = float(finite_w.max()) if w.numel() else 0.0
    bound = atol * max(scale, 1e-30) + rtol * finite_w
    nan_mismatch = bool((nan_g != nan_w).any())
    worst = float((diff / bound).max()) if w.numel() else 0.0
    max_abs = float(diff.max()) if w.numel() else 0.0
    ok = (not nan_mismatch) and worst <= 1.0
    why = "NaN where the reference has none (or the reverse)" if nan_mismatch else ""
    return {
        "name": name,
        "max_abs_err": math.inf if nan_mismatch else max_abs,
        "err_over_tol": worst,
        "ref_max_abs": scale,
        "ok": ok,
        "why": why,
    }


def run_check(spec: OpSpec, case: Case, inputs: dict, fast_fn: Callable, ref_fn: Callable) -> CheckResult:
    sub, note = spec.subset(inputs, CHECK_MAX_ELEMS) if spec.subset is not None else (inputs, "")
    fast_inputs = _leaves(spec, sub, case.mode)
    ref_inputs = _upcast_leaves(spec, sub, case.mode)
    fast_outs, fast_grads = make_step(spec, functools.partial(spec.call, fast_fn), fast_inputs, case.mode)()
    ref_outs, ref_grads = make_step(spec, functools.partial(spec.call, ref_fn), ref_inputs, case.mode)()
    if len(fast_outs) != len(ref_outs):
        return CheckResult("fail", math.inf, note=f"{len(fast_outs)} outputs, reference has {len(ref_outs)}")
    rows = []
    for i, (g, w) in enumerate(zip(fast_outs, ref_outs)):
        name = spec.output_names[i] if i < len(spec.output_names) else f"out{i}"
        rows.append(compare(name, g, w, case.dtype))
    for name, g, w in zip(spec.grad_inputs, fast_grads, ref_grads):
        rows.append(compare(f"grad {name}", g, w, case.dtype))
    max_err = max((r["max_abs_err"] for r in rows), default=0.0)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        detail = "; ".join(
            f"{r['name']}: max err {r['max_abs_err']:.3g}" + (f" ({r['why']})" if r["why"] else "") for r in failed
        )
        note = (note + "; " if note else "") + detail
    return CheckResult("fail" if failed else "ok", max_err, rows, note)


# ----------------------------------------------------------------------------------------------
# One case


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _free_memory(device: torch.device) -> None:
    # Only worth it on a GPU (frees cached blocks between multi-GB cases); a full gc.collect()
    # costs a quarter second once torch.compile's imports are in the heap.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def public_function(api: str) -> Callable:
    """rlhf_fast.<api>; raises ImportError / AttributeError while the op is not written yet."""
    import rlhf_fast

    fn = getattr(rlhf_fast, api)
    if isinstance(fn, types.ModuleType):
        # rlhf_fast.logprobs is both a submodule and a function: once the submodule has been
        # imported the package attribute is the module; the function lives inside it.
        fn = getattr(fn, api)
    return fn


def lookup_fast(spec: OpSpec, backend: str, device: torch.device) -> tuple[Callable | None, str, str]:
    """(callable, backend used, why unavailable). Catches only what "not written yet" looks like."""
    override = FAST_OVERRIDES.get(spec.api)
    try:
        fn = override if override is not None else public_function(spec.api)
    except (ImportError, AttributeError) as exc:
        return None, "-", f"rlhf_fast.{spec.api} unavailable ({_short(exc)})"
    used = "override" if override is not None else "?"
    if override is None:
        from rlhf_fast import _backend

        if spec.registry in _backend.OPS:
            try:
                used = _backend.resolve(spec.registry, backend, device)
            except (ValueError, RuntimeError) as exc:
                return None, "-", f"rlhf_fast.{spec.api}: {_short(exc)}"
    if backend != "auto":
        fn = functools.partial(fn, backend=backend)
    return fn, used, ""


def peer_forwards(spec: OpSpec, device: torch.device, compile_enabled: bool) -> dict:
    """name -> (forward or None, reason it is not run)."""
    out = {}
    for name, fwd in spec.peers.items():
        if name == "compile":
            continue
        out[name] = (fwd, "")
    if "compile" in spec.peers:
        if not compile_enabled:
            out["compile"] = (None, "compile off")
        elif spec.compile_skip:
            out["compile"] = (None, spec.compile_skip)
        else:
            out["compile"] = ("compile", "")  # built fresh per case (see run_case)
    for name, factory in spec.gpu_peers.items():
        if device.type != "cuda":
            out[name] = (None, "GPU only")
            continue
        try:
            out[name] = (factory(), "")
        except ImportError as exc:
            out[name] = (None, f"not importable ({_short(exc, 120)})")
        except Exception as exc:  # noqa: BLE001 - a broken third-party install must not stop the run
            out[name] = (None, _short(exc, 200))
    return out


def time_impl(timer: Timer, step: Callable, warmup: int | None = None) -> PeerResult:
    ms, reps, first_s = timer.measure(step, warmup=warmup)
    res = PeerResult("ok", ms=ms, reps=reps)
    res.extra_gb = timer.peak_extra_gb(step)
    res.compile_s = first_s
    return res


def run_kernel_check(spec: OpSpec, case: Case, inputs: dict, device: torch.device) -> CheckResult | None:
    """CPU only: the op's Triton kernel (TRITON_INTERPRET=1) against the reference on a small
    slice. None when the op has no Triton kernel."""
    from rlhf_fast import _backend, reference

    info = _backend.OPS.get(spec.registry)
    if info is None or not info.triton:
        return None
    try:
        _backend.resolve(spec.registry, "triton", device)
        fn = functools.partial(public_function(spec.api), backend="triton")
    except (ValueError, RuntimeError, ImportError, AttributeError) as exc:
        return CheckResult("not run", note=_short(exc))
    sub, note = spec.subset(inputs, KERNEL_CHECK_MAX_ELEMS) if spec.subset is not None else (inputs, "")
    try:
        result = run_check(spec, case, sub, fn, getattr(reference, spec.api))
    except ImportError as exc:  # rlhf_fast.kernels not importable (package not installed)
        return CheckResult("not run", note=_short(exc))
    except Exception as exc:  # noqa: BLE001 - reported in the row, never swallowed
        return CheckResult("error", note=_short(exc))
    result.note = "; ".join(x for x in (note, result.note) if x)
    return result


def case_floor(spec, case: Case, inputs, timer: Timer, bandwidth: float) -> tuple[float, str]:
    """(floor in ms, note) of a case: bytes moved / copy bandwidth, or for a compute-bound op
    floor_work_repeats x the measured time of its floor_work (bench/profile_gpu.py uses it too)."""
    if spec.floor_work is not None:
        with torch.no_grad():
            work_ms, _, _ = timer.measure(functools.partial(spec.floor_work, inputs))
        return spec.floor_work_repeats * work_ms, f"{spec.floor_work_repeats} x measured matmul"
    return spec.bytes_moved(case.shape, case.dtype, case.mode) / bandwidth * 1e3, ""


def run_case(case: Case, args, device: torch.device, timer: Timer, bandwidth: float) -> CaseResult:
    spec = SPECS[case.op]
    result = CaseResult(case)
    result.bytes_moved = spec.bytes_moved(case.shape, case.dtype, case.mode)
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(case.label.encode()))
    inputs = spec.make_inputs(case.shape, case.dtype, device, gen)

    result.floor_ms, result.floor_note = case_floor(spec, case, inputs, timer, bandwidth)

    # rlhf_fast: look up, check against the reference, time
    fast_fn, result.backend, why = lookup_fast(spec, args.backend, device)
    if fast_fn is None:
        result.peers["rlhf_fast"] = PeerResult("unavailable", note=why)
        result.check = CheckResult("not run", note="rlhf_fast op unavailable")
        result.notes.append(why)
    else:
        from rlhf_fast import reference

        try:
            result.check = run_check(spec, case, inputs, fast_fn, getattr(reference, spec.api))
        except ImportError as exc:  # e.g. rlhf_fast.kernels missing: not written / not installed yet
            result.check = CheckResult("not run", note=_short(exc))
            result.peers["rlhf_fast"] = PeerResult("unavailable", note=_short(exc))
            result.notes.append(f"rlhf_fast.{spec.api} unavailable ({_short(exc)})")
        except Exception as exc:  # noqa: BLE001 - reported in the row, never swallowed
            if _is_oom(exc):
                result.check = CheckResult("not run", note=f"check OOM: {_short(exc, 120)}")
                result.notes.append(f"check vs reference ran out of memory ({_short(exc, 120)})")
            else:
                result.check = CheckResult("error", note=_short(exc))
                result.notes.append(f"check vs reference raised: {_short(exc)}")
        _free_memory(device)
        if result.check.note and result.check.status == "ok":
            result.notes.append(result.check.note)
        elif result.check.status == "fail":
            result.notes.append(f"check FAILED: {result.check.note}")
        if args.kernel_check and result.backend not in ("triton", "override") and args.backend == "auto":
            result.kernel_check = run_kernel_check(spec, case, inputs, device)
            kc = result.kernel_check
            if kc is not None and kc.status in ("fail", "error"):
                result.notes.append(f"Triton kernel (interpreter) check FAILED: {kc.note}")
            elif kc is not None and kc.status == "not run":
                result.notes.append(f"Triton kernel not checked: {kc.note}")
        if "rlhf_fast" not in result.peers:
            step = make_step(spec, functools.partial(spec.call, fast_fn), _leaves(spec, inputs, case.mode), case.mode)
            result.peers["rlhf_fast"] = _guarded_time(timer, step, "rlhf_fast", result)
            del step
            _free_memory(device)

    # Peers
    for name, (fwd, reason) in peer_forwards(spec, device, args.compile_enabled).items():
        if fwd is None:
            result.peers[name] = PeerResult("n/a" if reason == "GPU only" else "skipped", note=reason)
            if reason not in ("GPU only", "compile off"):
                result.notes.append(f"{name}: {reason}")
            continue
        warmup = None
        if name == "inplace" and case.mode != "fwd+bwd":
            result.peers[name] = PeerResult("n/a", note="no backward: the same run as rlhf_fast")
            continue
        if fwd == "compile" and case.sweep and device.type == "cuda":
            # Each compile is a fresh one (below), ~10-20 s on a GPU: the plots' extra sweep points
            # go without it (the anchor sizes keep it), which keeps one report call well inside
            # the device tool's 10-minute limit.
            result.peers[name] = PeerResult("skipped", note="sweep point: compile timed at the anchor sizes only")
            continue
        if fwd == "compile":
            torch._dynamo.reset()  # fresh compile per case: no cache-size limit, no dynamic-shape reuse
            fwd = torch.compile(spec.peers["compile"])
            warmup = max(timer.warmup, 2)  # first call compiles
        step = make_step(spec, fwd, _leaves(spec, inputs, case.mode), case.mode)
        result.peers[name] = _guarded_time(timer, step, name, result, warmup=warmup)
        del step, fwd
        _free_memory(device)
    del inputs
    _free_memory(device)
    return result


def _guarded_time(timer: Timer, step: Callable, name: str, result: CaseResult, warmup=None) -> PeerResult:
    try:
        res = time_impl(timer, step, warmup=warmup)
        if name != "compile":
            res.compile_s = None
        return res
    except ImportError as exc:
        if name == "rlhf_fast":
            result.notes.append(f"rlhf_fast unavailable: {_short(exc)}")
            return PeerResult("unavailable", note=_short(exc))
        result.notes.append(f"{name}: {_short(exc)}")
        return PeerResult("error", note=_short(exc))
    except Exception as exc:  # noqa: BLE001 - reported in the row, never swallowed
        if _is_oom(exc):
            result.notes.append(f"{name}: out of memory")
            return PeerResult("oom", note=_short(exc, 160))
        result.notes.append(f"{name} raised: {_short(exc)}")
        return PeerResult("error", note=_short(exc))


# ----------------------------------------------------------------------------------------------
# Environment


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, args) -> dict:
    meta = {
        "date": _dt.date.today().isoformat(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "device_slug": device_slug(device),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "backend": args.backend,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "quick": args.quick,
        "compile": args.compile_enabled,
    }
    try:
        from rlhf_fast._version import __version__

        meta["rlhf_fast"] = __version__
    except ImportError:
        meta["rlhf_fast"] = None
    try:
        info = importlib.import_module("rlhf_fast.info").collect()
        meta["rlhf_fast_info"] = {
            k: info[k] for k in ("extension_loaded", "extension_error", "ops", "import_errors") if k in info
        }
    except Exception as exc:  # noqa: BLE001 - metadata only: recorded in the JSON
        meta["rlhf_fast_info"] = {"error": _short(exc)}
    return meta


# ----------------------------------------------------------------------------------------------
# Report


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.4f}"


def _peer_cell(res: PeerResult | None) -> str:
    if res is None:
        return "-"
    if res.status == "ok":
        return _fmt_ms(res.ms)
    return {"unavailable": "unavailable", "skipped": "skip", "n/a": "-", "oom": "OOM", "error": "ERROR"}.get(
        res.status, res.status
    )


def _err_cell(check: CheckResult) -> str:
    if check.status == "ok":
        return f"{check.max_abs_err:.1e}"
    if check.status == "fail":
        return f"{check.max_abs_err:.1e} FAIL"
    if check.status == "error":
        return "ERROR FAIL"
    return "-"


def _shape_cell(case: Case) -> str:
    return SPECS[case.op].shape_label(case.shape)


def peers_present(results: list[CaseResult]) -> list[str]:
    """Peer columns worth showing: rlhf_fast, eager, compile always; the others where they ran."""
    shown = ["rlhf_fast", "eager", "compile"]
    for name in PEER_ORDER[3:]:
        if any(r.peers.get(name) is not None and r.peers[name].status not in ("n/a", "skipped") for r in results):
            shown.append(name)
    return shown


def table_rows(results: list[CaseResult]) -> tuple[list[str], list[list[str]]]:
    peers = peers_present(results)
    header = ["op", "mode", "shape", "dtype", "backend"] + [f"{PEER_TITLES[p]} ms" for p in peers]
    header += ["floor ms", "floor frac", "extra GB", "max err"]
    with_kernel = any(r.kernel_check is not None for r in results)
    if with_kernel:
        header.append("triton err")
    rows = []
    for r in results:
        c = r.case
        fast = r.peers.get("rlhf_fast")
        frac = "-"
        if fast is not None and fast.status == "ok" and r.floor_ms:
            frac = f"{r.floor_ms / fast.ms:.2f}"
        extra = "-" if fast is None or fast.extra_gb is None else f"{fast.extra_gb:.2f}"
        row = [c.op, c.mode, _shape_cell(c), DTYPE_NAMES[c.dtype], r.backend]
        row += [_peer_cell(r.peers.get(p)) for p in peers]
        row += [_fmt_ms(r.floor_ms), frac, extra, _err_cell(r.check)]
        if with_kernel:
            row.append("-" if r.kernel_check is None else _err_cell(r.kernel_check))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    numeric = {i for i, h in enumerate(header) if h.endswith(("ms", "frac", "GB", "err"))}

    def line(cells):
        return (
            "| "
            + " | ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def memory_table(results: list[CaseResult]) -> str | None:
    peers = peers_present(results)
    if not any(res.extra_gb is not None for r in results for res in r.peers.values()):
        return None
    header = ["op", "mode", "shape", "dtype"] + [f"{PEER_TITLES[p]} GB" for p in peers]
    rows = []
    for r in results:
        cells = [r.case.op, r.case.mode, _shape_cell(r.case), DTYPE_NAMES[r.case.dtype]]
        for p in peers:
            res = r.peers.get(p)
            cells.append("-" if res is None or res.extra_gb is None else f"{res.extra_gb:.2f}")
        rows.append(cells)
    return markdown_table(header, rows)


def header_lines(meta: dict, bandwidth: float, bw_how: str) -> list[str]:
    return [
        f"rlhf_fast {meta.get('rlhf_fast')} benchmark, {meta['time']}",
        f"device: {meta['device']}  |  torch {meta['torch']}  |  triton {meta['triton'] or 'not installed'}"
        + (" (TRITON_INTERPRET=1)" if meta["triton_interpret"] else "")
        + (f"  |  liger-kernel {meta['liger_kernel']}" if meta["liger_kernel"] else "")
        + (f"  |  cut-cross-entropy {meta['cut_cross_entropy']}" if meta["cut_cross_entropy"] else ""),
        (
            f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({bw_how}; bytes read + written)  |  "
            f"backend: {meta['backend']}  |  torch.compile: {'on' if meta['compile'] else 'off'}"
        ),
    ]


def notes_lines(results: list[CaseResult]) -> list[str]:
    """Each case's notes, prefixed with the case; a note repeated by later cases of the same op
    is kept once (failures are always kept)."""
    out, seen = [], set()
    for r in results:
        for n in r.notes:
            if (r.case.op, n) in seen and "FAIL" not in n:
                continue
            seen.add((r.case.op, n))
            out.append(f"{r.case.label}: {n}")
    return out


LEGEND = (
    "ms: median time (fwd+bwd = forward and backward). floor ms: bytes the op must move (the op's "
    "bytes-moved model) / the copy bandwidth above (linear_logprobs: 3 x one matmul). floor frac: floor / "
    "rlhf_fast time (1.0 = at the floor). extra GB: peak memory above the inputs (GPU only; the "
    "256 MiB L2-flush buffer is not counted). max err: max |rlhf_fast - reference| over outputs "
    "and gradients; FAIL when above the per-dtype tolerance (atol x max|ref| + rtol x |ref|). "
    "triton err (CPU runs): the same check of the op's Triton kernel under TRITON_INTERPRET=1 on a "
    "small slice, since backend auto picks the reference (or C++) for CPU tensors. On CPU the small "
    "inputs fit in cache, so a floor frac above 1 is possible there."
)


def to_json(meta: dict, bandwidth: float, bw_how: str, results: list[CaseResult]) -> dict:
    cases = []
    for r in results:
        c = r.case
        peers = {}
        for name, res in r.peers.items():
            d = dataclasses.asdict(res)
            if res.status == "ok" and r.floor_ms:
                d["floor_frac"] = r.floor_ms / res.ms
                d["GBps"] = r.bytes_moved / (res.ms * 1e-3) / 1e9
            peers[name] = d
        cases.append(
            {
                "op": c.op,
                "api": SPECS[c.op].api,
                "mode": c.mode,
                "shape": list(c.shape),
                "dtype": DTYPE_NAMES[c.dtype],
                "sweep": c.sweep,
                "backend": r.backend,
                "bytes_moved": r.bytes_moved,
                "floor_ms": r.floor_ms,
                "floor_note": r.floor_note,
                "peers": peers,
                "check": dataclasses.asdict(r.check),
                "kernel_check": None if r.kernel_check is None else dataclasses.asdict(r.kernel_check),
                "notes": r.notes,
                "harness_error": r.harness_error,
            }
        )
    return {
        "meta": meta,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "copy_bandwidth_how": bw_how,
        "tolerances": {DTYPE_NAMES[k]: list(v) for k, v in TOL.items()},
        "cases": cases,
        "failures": sum(r.failed for r in results),
    }


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _save_plot(plt, fig, ax, stem: Path, name: str) -> Path:
    """Legend, grid, layout; saved as <stem>-<name>.png and closed."""
    ax.legend()
    ax.grid(True, alpha=0.3)
    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: list[CaseResult], bandwidth: float, stem: Path) -> tuple[list[Path], str]:
    """Bandwidth vs V and time vs N for the log-prob forward, one line per peer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    fwd = [r for r in results if r.case.op == "logprobs" and r.case.mode == "fwd"]
    if not fwd:
        return [], "plots skipped: no logprobs fwd case in this run"
    written = []
    peers = [p for p in PEER_ORDER if any(r.peers.get(p) and r.peers[p].status == "ok" for r in fwd)]

    # bandwidth vs V: for each V the case with the most rows
    by_v = {}
    for r in fwd:
        N, V = r.case.shape
        if V not in by_v or by_v[V].case.shape[0] < N:
            by_v[V] = r
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in peers:
        pts = sorted(
            (V, r.bytes_moved / (r.peers[p].ms * 1e-3) / 1e9)
            for V, r in by_v.items()
            if r.peers.get(p) and r.peers[p].status == "ok"
        )
        if pts:
            ax.plot([v for v, _ in pts], [b for _, b in pts], marker="o", label=PEER_TITLES[p])
    ax.axhline(bandwidth / 1e9, color="grey", linestyle="--", label="copy bandwidth")
    ax.set_xscale("log")
    ax.set_xlabel("V (vocabulary)")
    ax.set_ylabel("GB/s (bytes moved / time)")
    ax.set_title(f"log-probs forward, {DTYPE_NAMES[fwd[0].case.dtype]}")
    written.append(_save_plot(plt, fig, ax, stem, "bandwidth"))

    # time vs N at the V with the most N points
    by_vn = {}
    for r in fwd:
        by_vn.setdefault(r.case.shape[1], []).append(r)
    V, series = max(by_vn.items(), key=lambda kv: len(kv[1]))
    if len(series) >= 2:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in peers:
            pts = sorted(
                (r.case.shape[0], r.peers[p].ms) for r in series if r.peers.get(p) and r.peers[p].status == "ok"
            )
            if pts:
                ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", label=PEER_TITLES[p])
        pts = sorted((r.case.shape[0], r.floor_ms) for r in series)
        ax.plot([n for n, _ in pts], [t for _, t in pts], linestyle="--", color="grey", label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"log-probs forward, V = {V}")
        written.append(_save_plot(plt, fig, ax, stem, "time-vs-n"))
    return written, ""


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """tqdm on stderr when installed, else one line per case on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.count = 0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def start(self, label: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.count + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def done(self):
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_fast.bench",
        description="Check every rlhf_fast op against the reference and time it against its peers.",
    )
    p.add_argument(
        "--ops",
        default=None,
        help="comma-separated ops or groups (default: all): " + ", ".join(_bench_cases.OP_NAMES),
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer cases (no sweeps), fewer repetitions; on CPU no torch.compile"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="logits dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--out", default="bench/results", help="directory for the JSON / Markdown / PNG files")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--compile", action="store_true", help="time the torch.compile peer even in a CPU --quick run")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per measurement (default: 20 GPU, 5 CPU; quick 10 / 3)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "cpp", "reference"],
        help="rlhf_fast backend= for every op",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--no-kernel-check",
        dest="kernel_check",
        action="store_false",
        help="on CPU, skip checking the Triton kernels under TRITON_INTERPRET=1 (done by default)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice); restored on exit"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar / counter on stderr")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        default=None,
        help="run nothing: merge the JSON files of earlier runs (e.g. one per --ops call on a GPU) into "
        "one report <device>-<date>.json / .md / .png in --out, targets judged over all their cases",
    )
    args = p.parse_args(argv)
    if args.compile and args.no_compile:
        p.error("--compile and --no-compile exclude each other")
    if args.ops:
        args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = [o for o in args.ops if o not in _bench_cases.OP_NAMES]
        if unknown:
            p.error(f"unknown --ops {unknown}; choose from {', '.join(_bench_cases.OP_NAMES)}")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _merge(args) if args.merge else _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    args.kernel_check = args.kernel_check and device.type == "cpu"
    interpreter_note = ""
    if device.type == "cpu" and (args.backend == "triton" or args.kernel_check) and not _interpreting():
        # Triton kernels on CPU tensors run under the interpreter, which must be switched on
        # before triton is imported (importing rlhf_fast does not import it, so from the CLI this
        # always works); never on a machine with a GPU (its kernels stay compiled ones).
        if "triton" not in sys.modules and not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            args.kernel_check = False
            interpreter_note = (
                "Triton kernels not checked on CPU: set TRITON_INTERPRET=1 before triton is imported "
                "(`TRITON_INTERPRET=1 python -m rlhf_fast.bench`)"
            )

    args.compile_enabled = not args.no_compile and (args.compile or device.type == "cuda" or not args.quick)
    logits_dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cases_fn = _bench_cases.gpu_cases if device.type == "cuda" else _bench_cases.cpu_cases
    cases = _bench_cases.select(cases_fn(logits_dtype, args.quick), args.ops)
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2

    cuda = device.type == "cuda"
    reps = args.reps or ((10 if args.quick else 20) if cuda else (3 if args.quick else 5))
    timer = Timer(device, reps=reps, warmup=3 if cuda else 1, budget_s=(10.0 if cuda else (1.0 if args.quick else 3.0)))
    meta = environment(device, args)
    bandwidth, bw_how = copy_bandwidth(device)
    for line in header_lines(meta, bandwidth, bw_how):
        print(line)
    if interpreter_note:
        print(interpreter_note)
    if not args.compile_enabled and not args.no_compile:
        print("torch.compile peer left out of a CPU --quick run (slow to compile); add --compile to time it")
    print(flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Two runs with different --ops on one day must not overwrite each other's files.
    ops_tag = "-" + "_".join(args.ops).replace("+", "_")[:60] if args.ops else ""
    stem = out_dir / f"{meta['device_slug']}-{meta['date']}{ops_tag}"

    results = []
    interrupted = ""
    progress = _Progress(len(cases), enabled=not args.no_progress)
    # SIGTERM (what `timeout` sends) ends the run like Ctrl-C: the cases done so far are still
    # printed and written. The JSON and Markdown are also rewritten after every case, so even a
    # SIGKILL leaves the finished cases on disk.
    previous_term = _raise_interrupt_on_sigterm()
    try:
        for case in cases:
            progress.start(case.label)
            try:
                results.append(run_case(case, args, device, timer, bandwidth))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - the harness or an input builder broke: report it, keep going
                r = CaseResult(case)
                r.harness_error = _short(exc)
                r.check = CheckResult("not run", note=f"harness error: {_short(exc)}")
                r.notes.append(f"case raised (a harness error, not an rlhf_fast result): {_short(exc)}")
                results.append(r)
                _free_memory(device)
            progress.done()
            _write_report(stem, meta, bandwidth, bw_how, results, cuda, partial=f"{len(results)} of {len(cases)} cases")
    except KeyboardInterrupt:
        during = cases[len(results)].label if len(results) < len(cases) else "the report's writing"
        interrupted = f"interrupted after {len(results)} of {len(cases)} cases (during {during})"
    finally:
        _restore_sigterm(previous_term)
        progress.close()

    print_summary(results, cuda, meta["device"], _lead_notes(interrupted))

    written, plot_msg, failures = _write_report(
        stem, meta, bandwidth, bw_how, results, cuda, partial=interrupted, with_plots=True
    )
    print()
    if plot_msg:
        print(plot_msg)
    print("wrote " + ", ".join(str(p) for p in written))
    # Exit status: 1 when a case failed (also in an interrupted run), else 130 when interrupted.
    if failures:
        print(f"{failures} case(s) FAILED the check against the reference (or raised)")
        return 1
    if interrupted:
        print(interrupted)
        return 130
    return 0


def _json_float(x):
    # _json_safe wrote non-finite floats as strings.
    return float(x) if isinstance(x, str) and x in ("inf", "-inf", "nan") else x


def _check_from_json(d: dict) -> CheckResult:
    return CheckResult(d["status"], _json_float(d.get("max_abs_err")), d.get("tensors", []), d.get("note", ""))


def case_from_json(c: dict) -> CaseResult:
    """A CaseResult back from its entry in a report's JSON (to_json's "cases")."""
    case = Case(c["op"], tuple(c["shape"]), DTYPES[c["dtype"]], c["mode"], c.get("sweep", ""))
    r = CaseResult(case, c["backend"], c["bytes_moved"], _json_float(c["floor_ms"]), c.get("floor_note", ""))
    fields = {f.name for f in dataclasses.fields(PeerResult)}
    r.peers = {
        name: PeerResult(**{k: _json_float(v) for k, v in d.items() if k in fields}) for name, d in c["peers"].items()
    }
    r.check = _check_from_json(c["check"])
    r.kernel_check = None if c.get("kernel_check") is None else _check_from_json(c["kernel_check"])
    r.notes = list(c.get("notes", []))
    r.harness_error = c.get("harness_error", "")
    return r


def _merge(args) -> int:
    """One report from the JSON files of several runs (a GPU session runs the ops in several
    device calls, each under its time limit). A case present in several files is taken from the
    last. Each case keeps the floor of its own run (its copy bandwidth); the header lists them."""
    runs = []
    for name in args.merge:
        path = Path(name)
        try:
            runs.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            print(f"--merge: skipping {path}: {_short(exc)}", file=sys.stderr)
    if not runs:
        print("--merge: no readable report", file=sys.stderr)
        return 2
    devices = {data["meta"]["device"] for _, data in runs}
    if len(devices) > 1:
        print(f"--merge: the runs are from different devices {sorted(devices)}", file=sys.stderr)
        return 2
    by_label = {}
    for _, data in runs:
        for c in data["cases"]:
            r = case_from_json(c)
            by_label[r.case.label] = r
    results = list(by_label.values())
    meta = dict(runs[0][1]["meta"])
    meta["merged_from"] = [path.name for path, _ in runs]
    partial = [f"{path.name}: {data['partial']}" for path, data in runs if data.get("partial")]
    differ = []
    for key in ("torch", "triton", "liger_kernel", "cut_cross_entropy", "backend", "compile", "quick", "rlhf_fast"):
        values = {path.name: data["meta"].get(key) for path, data in runs}
        if len(set(map(str, values.values()))) > 1:
            differ.append(f"the merged runs differ in {key}: {values}")
    cuda = not meta["device"].startswith("CPU")
    # Headline bandwidth: the run holding the log-prob forward cases (the plots' y-axis), else the first.
    lead = next(
        (d for _, d in runs if any(c["op"] == "logprobs" and c["mode"] == "fwd" for c in d["cases"])), runs[0][1]
    )
    bandwidth = lead["copy_bandwidth_GBps"] * 1e9
    per_run = ", ".join(f"{path.name}: {data['copy_bandwidth_GBps']:.0f} GB/s" for path, data in runs)
    bw_how = f"{lead['copy_bandwidth_how']}; merged from {len(runs)} runs, each case's floor from its own ({per_run})"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{meta['device_slug']}-{meta['date']}"
    print_summary(results, cuda, meta["device"], _lead_notes("; ".join(partial), differ))
    written, plot_msg, failures = _write_report(
        stem, meta, bandwidth, bw_how, results, cuda, partial="; ".join(partial), with_plots=True, extra_notes=differ
    )
    if plot_msg:
        print(plot_msg)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if failures else 0


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename: a run killed mid-write leaves the previous complete file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _raise_interrupt_on_sigterm():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _lead_notes(partial: str = "", extra_notes=()) -> list[str]:
    """The notes printed and written before the cases' own: why the run is partial, then extra_notes."""
    return ([f"partial run: {partial}"] if partial else []) + list(extra_notes)


def print_summary(results: list, cuda: bool, device_name: str, lead_notes: list[str]) -> None:
    """The table, the notes (lead_notes first) and, on a GPU, the issue targets, on stdout."""
    table, notes, targets_md, _ = _summaries(results, cuda)
    print(table)
    notes = list(lead_notes) + notes
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"- {n}")
    if cuda:
        print(f"\nissue targets (bounds for an H100; this run: {device_name}):")
        print(targets_md)


def _summaries(results: list, cuda: bool):
    """(markdown table, notes, targets markdown or None, target rows) of the results so far."""
    header, rows = table_rows(results)
    table = markdown_table(header, rows)
    notes = notes_lines(results)
    # The issues' H100 targets, judged on this run (GPU runs only: CPU sizes are not theirs).
    target_rows = _bench_targets.targets_rows(results) if cuda else []
    targets_md = markdown_table(_bench_targets.TARGETS_HEADER, target_rows) if cuda else None
    return table, notes, targets_md, target_rows


def _write_report(stem: Path, meta, bandwidth, bw_how, results, cuda, partial="", with_plots=False, extra_notes=()):
    """Writes <stem>.json and .md (and the PNG plots with with_plots); returns (paths written,
    plot message, number of failed cases). partial: why the run is incomplete, "" when it is not;
    extra_notes: lines put first in the Notes (and in the JSON's "notes")."""
    table, notes, targets_md, target_rows = _summaries(results, cuda)
    notes = _lead_notes(partial, extra_notes) + notes
    data = to_json(meta, bandwidth, bw_how, results)
    if partial:
        data["partial"] = partial
    if extra_notes:
        data["notes"] = list(extra_notes)
    if cuda:
        data["targets"] = [dict(zip(("issue", "target", "case", "measured", "verdict"), row)) for row in target_rows]
    plots, plot_msg = write_plots(results, bandwidth, stem) if with_plots else ([], "")
    data["plots"] = [p.name for p in plots]
    _write_atomic(stem.with_suffix(".json"), json.dumps(_json_safe(data), indent=2) + "\n")
    md = [
        "# rlhf_fast benchmark",
        "",
        *[f"{line}  " for line in header_lines(meta, bandwidth, bw_how)],
        "",
        table,
        "",
        LEGEND,
    ]
    if targets_md:
        md += ["", "## Issue targets (bounds for an H100)", "", targets_md]
    mem = memory_table(results)
    if mem:
        md += ["", "## Peak extra memory (GB) per implementation", "", mem]
    spec_notes = [
        f"- {spec.key}: {spec.notes}"
        for spec in {SPECS[r.case.op].key: SPECS[r.case.op] for r in results}.values()
        if spec.notes
    ]
    if notes or spec_notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes], *spec_notes]
    if plots:
        md += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    _write_atomic(stem.with_suffix(".md"), "\n".join(md) + "\n")
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), *plots], plot_msg, data["failures"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if __name__ == "__main__":
    sys.exit(main())
