"""Where the time goes, per issue-target case: the kernels of one rlhf_fast step, from torch.profiler.

The issues ask that a run falling short of a target say so "with the profile of where the time
goes". For each case an issue target reads (rlhf_fast._bench_targets.TARGETS, at the ANCHORS.md
sizes), this runs rlhf_fast's step as the report times it (rlhf_fast.bench.make_step: forward, or
forward + backward with the case's upstream gradients), then profiles 3 more steps and writes, per
case: the floor (bytes moved / copy bandwidth measured now), the step's median time (CUDA events,
L2 flushed) and the profiler's kernel table (self device time, calls, average), into one file,
profile.txt (the device tool brings back at most 8 files).

    python bench/profile_gpu.py [--ops ppo_from_logits,logprobs] [--out DIR] [--small]

--small (and any run without a GPU): the CPU case list at its quick sizes, CPU activities only (a
dry run of the script, in the test suite).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from rlhf_fast import _bench_cases, _bench_targets, bench

HAS_CUDA = torch.cuda.is_available()
STEPS = 3


def target_cases(small: bool, ops: list[str] | None) -> list[_bench_cases.Case]:
    """The cases the issue targets read (GPU), or the CPU quick list (small), limited to ops. Named
    ops without a target case (linear_logprobs) get their report cases instead (no sweep points)."""
    if small:
        cases = _bench_cases.cpu_cases(torch.float32, True)
        return _bench_cases.select(cases, ops) if ops else cases
    every = [c for c in _bench_cases.gpu_cases(torch.bfloat16, True) if not c.sweep]
    keys = {(t.op, t.shape, t.mode, t.dtype) for t in _bench_targets.TARGETS}
    keys |= {(t.versus, t.shape, t.mode, t.dtype) for t in _bench_targets.TARGETS if t.versus}
    cases = [c for c in every if (c.op, c.shape, c.mode, c.dtype) in keys]
    if not ops:
        return cases
    chosen = _bench_cases.select(cases, ops)
    covered = {c.op for c in chosen}
    return chosen + [c for c in _bench_cases.select(every, ops) if c.op not in covered]


def kernel_table(prof, cuda: bool, rows: int = 15) -> str:
    events = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for key in keys:  # the device-time key's name changed across torch releases
        try:
            return events.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return events.table(row_limit=rows)


def profile_case(case, device, timer, bandwidth) -> str:
    spec = _bench_cases.SPECS[case.op]
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = spec.make_inputs(case.shape, case.dtype, device, gen)
    fast_fn, backend, why = bench.lookup_fast(spec, "auto", device)
    if fast_fn is None:
        return f"## {case.label}\nrlhf_fast unavailable: {why}\n"
    step = bench.make_step(
        spec, functools.partial(spec.call, fast_fn), bench._leaves(spec, inputs, case.mode), case.mode
    )
    floor_ms, floor_note = bench.case_floor(spec, case, inputs, timer, bandwidth)
    ms, reps, _ = timer.measure(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            out = step()
            del out
        timer.sync()
    lines = [
        f"## {case.label}  (backend {backend})",
        (
            f"floor {floor_ms:.4g} ms ({floor_note or 'bytes moved / copy bandwidth'}), step median {ms:.4g} ms "
            f"over {reps} reps = {floor_ms / ms:.2f} of the floor; the table covers {STEPS} steps"
        ),
        kernel_table(prof, device.type == "cuda"),
        "",
    ]
    del step, inputs
    bench._free_memory(device)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--ops", default=None, help="comma-separated ops or tags (as python -m rlhf_fast.bench --ops)")
    ap.add_argument("--small", action="store_true", help="the CPU quick cases (a dry run)")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    small = args.small or not HAS_CUDA
    device = torch.device("cuda" if HAS_CUDA and not args.small else "cpu")
    cases = target_cases(small, ops)
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    timer = bench.Timer(device, reps=2 if small else 10, warmup=1 if small else 3, budget_s=0.5 if small else 3.0)
    bandwidth, how = bench.copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    parts = [
        f"# rlhf_fast profile, {name}, {time.strftime('%Y-%m-%d %H:%M')}, copy bandwidth {bandwidth / 1e9:.0f} GB/s ({how})\n"
    ]
    for case in cases:
        print(f"profiling {case.label}", flush=True)
        try:
            parts.append(profile_case(case, device, timer, bandwidth))
        except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others' profiles
            parts.append(f"## {case.label}\nraised: {type(exc).__name__}: {exc}\n")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.txt").write_text("\n".join(parts))  # after each case: a cut run keeps what it has
    print(f"wrote {Path(args.out) / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
