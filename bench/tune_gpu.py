"""Launch-config sweep for the kernels whose tuning the first GPU run owes, in one device call.

    python bench/tune_gpu.py [--out DIR] [--small] [--sections rows,cluster,ppo_tile,ppo_count]

On a GPU (the sizes of ../shared/ANCHORS.md, bf16 logits):
  rows      log-prob forward and forward + backward at 16384 x 128256 and 16384 x 32000, for each
            (BLOCK_V, num_warps) of ROW_CONFIGS (kernels/_rows.py: MAX_BLOCK_V / WARPS_BY_BLOCK);
  cluster   ppo_loss_from_logits forward + backward at 8 x 2048 x 128256 with
            RLHF_FAST_PPO_CLUSTER = auto, 0 (Triton rows), 1, 2, 4, 8 (sizes whose slice fits);
  ppo_tile  the per-token PPO loss forward + backward at [1024, 8192] fp32 for each launch
            schedule (fused, pdl, split: kernels/ppo.py's RLHF_FAST_PPO_LAUNCH) and each
            (_TILE, _WARPS) of PPO_TILES;
  ppo_count the same step at the best ppo_tile schedule and tile (or the defaults) for each
            (_COUNT_TILE, _COUNT_WARPS) of PPO_COUNT_TILES: the mask row-sum pass's config
            (_COUNT_WARPS only matters to pdl and split: a fused launch has one num_warps).
--sections runs a subset (all by default).
Each line gives the median time (CUDA events, L2 flushed, rlhf_fast.bench.Timer) and the
fraction of the copy bandwidth measured in the same run (floor bytes / time / copy bandwidth),
and the result is checked against the default config's output. Results go to DIR/tune.json
(default $OUT or ./gpu_out). The winners are to be written into kernels/_rows.py,
kernels/ppo.py and the cluster heuristic by hand: this script changes no defaults.

--small: tiny sizes, for a dry run on CPU under TRITON_INTERPRET=1 (what CI runs): it proves
the sweep works, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from rlhf_fast.kernels import _rows
from rlhf_fast.kernels import ppo as ppo_kernels
from rlhf_fast.kernels import ppo_from_logits as pfl_kernels

import rlhf_fast
from rlhf_fast.bench import Timer, copy_bandwidth

ROW_CONFIGS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
PPO_TILES = ((1024, 4), (2048, 4), (2048, 8), (2048, 16), (4096, 8), (4096, 16))
# (_COUNT_TILE, _COUNT_WARPS) of the per-token PPO mask row-sum pass, timed inside the whole step
PPO_COUNT_TILES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
SECTIONS = ("rows", "cluster", "ppo_tile", "ppo_count")
CLUSTER_MODES = ("auto", "0", "1", "2", "4", "8")


@contextlib.contextmanager
def row_config_override(block: int, warps: int):
    """Every row kernel launches with (block, warps) while inside (the row_config cache is
    cleared on entry and exit so the override and the default each take effect)."""
    saved = (dict(_rows.MAX_BLOCK_V), _rows.WARPS_BY_BLOCK)
    _rows.MAX_BLOCK_V.update(dict.fromkeys(_rows.MAX_BLOCK_V, block))
    _rows.WARPS_BY_BLOCK = ((block, warps), (512, 4), (0, 2))
    _rows.row_config.cache_clear()
    try:
        yield
    finally:
        _rows.MAX_BLOCK_V.update(saved[0])
        _rows.WARPS_BY_BLOCK = saved[1]
        _rows.row_config.cache_clear()


@contextlib.contextmanager
def ppo_tile_override(tile: int, warps: int, count_tile: int | None = None, count_warps: int | None = None):
    """The per-token PPO kernels launch with these tiles while inside (None: the current one)."""
    names = ("_TILE", "_WARPS", "_COUNT_TILE", "_COUNT_WARPS")
    saved = [getattr(ppo_kernels, n) for n in names]
    for name, value in zip(names, (tile, warps, count_tile, count_warps)):
        if value is not None:
            setattr(ppo_kernels, name, value)
    ppo_kernels._tile_config.cache_clear()
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(ppo_kernels, name, value)
        ppo_kernels._tile_config.cache_clear()


def _logprob_inputs(N, V, device, gen):
    logits = torch.randn(N, V, generator=gen, device=device, dtype=torch.bfloat16).mul_(2.0)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    return logits, labels


def _logprob_steps(logits, labels):
    def fwd():
        return rlhf_fast.logprobs(logits, labels, backend="triton")

    x = logits.detach().requires_grad_(True)

    def fwd_bwd():
        out = rlhf_fast.logprobs(x, labels, backend="triton")
        (g,) = torch.autograd.grad(out.sum(), x)
        return g

    return fwd, fwd_bwd


def _ppo_from_logits_step(B, T, V, device, gen):
    logits = torch.randn(B, T, V, generator=gen, device=device, dtype=torch.bfloat16).mul_(2.0)
    labels = torch.randint(0, V, (B, T), generator=gen, device=device)
    logp = torch.randn(B, T, generator=gen, device=device) * 0.1 - 3.0
    old, ref = logp + 0.05, logp - 0.05
    adv = torch.randn(B, T, generator=gen, device=device)
    mask = torch.ones(B, T, device=device)
    x = logits.detach().requires_grad_(True)

    def step():
        loss, _ = rlhf_fast.ppo_loss_from_logits(
            x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.01, entropy_coef=0.001, backend="triton"
        )
        (g,) = torch.autograd.grad(loss, x)
        return g

    return step, 2 * logits.numel() * logits.element_size(), logits  # floor: 1 read + 1 write


def _ppo_policy_step(B, T, device, gen):
    logp = -torch.rand(B, T, generator=gen, device=device) * 2.0
    old = logp + torch.randn(B, T, generator=gen, device=device) * 0.3
    adv = torch.randn(B, T, generator=gen, device=device)
    mask = (torch.rand(B, T, generator=gen, device=device) > 0.1).float()
    x = logp.detach().requires_grad_(True)

    def step():
        loss, _ = rlhf_fast.ppo_policy_loss(x, old, adv, mask, backend="triton")
        (g,) = torch.autograd.grad(loss, x)
        return g

    return step, 5 * 4 * B * T  # ANCHORS.md's floor: read 4 fp32 inputs, write the gradient


def _max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU dry run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    small = args.small or not HAS_CUDA
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    # Inputs are drawn on the device: ~5e9 values drawn on the host would cost about a minute.
    gen = torch.Generator(device=device).manual_seed(0)
    timer = Timer(device, reps=2 if small else 30, warmup=1 if small else 3, budget_s=0.2 if small else 1.5)
    bandwidth, _ = copy_bandwidth(device)
    results = {
        "device": torch.cuda.get_device_name(0) if HAS_CUDA else "cpu (dry run)",
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_Bps": bandwidth,
        "rows": [],
        "cluster": [],
        "ppo_tile": [],
        "ppo_count": [],
    }

    def record(section, label, fn, floor_bytes, reference):
        try:
            out = fn()
            err = _max_err(out, reference) if reference is not None else 0.0
            ms, reps, _ = timer.measure(fn)
            entry = {
                "config": label,
                "ms": ms,
                "bw_frac": floor_bytes / (ms * 1e-3) / bandwidth,
                "max_err_vs_default": err,
                "reps": reps,
            }
        except Exception as exc:  # noqa: BLE001 (a config that does not compile or launch is a result too)
            entry = {"config": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        results[section].append(entry)
        shown = (
            f"{entry['ms']:8.3f} ms  {entry['bw_frac']:5.2f} of copy bw  err {entry['max_err_vs_default']:.1e}"
            if "ms" in entry
            else entry["error"]
        )
        print(f"{section:9s} {label:44s} {shown}", flush=True)
        return out if "ms" in entry else None

    # 1. log-prob rows
    row_shapes = ((8, 1271),) if small else ((16384, 128256), (16384, 32000))
    for N, V in row_shapes if "rows" in sections else ():
        logits, labels = _logprob_inputs(N, V, device, gen)
        fwd, fwd_bwd = _logprob_steps(logits, labels)
        bytes_fwd, bytes_fwd_bwd = logits.numel() * 2, 3 * logits.numel() * 2
        ref_fwd, ref_bwd = fwd(), fwd_bwd()
        for block, warps in ROW_CONFIGS:
            with row_config_override(block, warps):
                record("rows", f"logprobs fwd {N}x{V} block={block} warps={warps}", fwd, bytes_fwd, ref_fwd)
                record("rows", f"logprobs fwd+bwd {N}x{V} block={block} warps={warps}", fwd_bwd, bytes_fwd_bwd, ref_bwd)
        del logits, labels, fwd, fwd_bwd, ref_fwd, ref_bwd

    # 2. cluster size of ppo_loss_from_logits (CUDA only: off a GPU every mode is the Triton rows)
    if "cluster" in sections:
        B, T, V = (2, 8, 1271) if small else (8, 2048, 128256)
        step, floor, probe = _ppo_from_logits_step(B, T, V, device, gen)
        with pfl_kernels.cluster_mode("0"):
            ref_grad = step()
        for mode in CLUSTER_MODES:
            with pfl_kernels.cluster_mode(mode):
                runs = pfl_kernels.cluster_size(probe, probe)  # a forced size that cannot run falls back
                label = f"ppo_loss_from_logits {B}x{T}x{V} cluster={mode} (runs {runs})"
                record("cluster", label, step, floor, ref_grad)
        del step, ref_grad

    # 3. per-token PPO: each launch schedule x forward tile, then (at the best of those) the mask
    # row-sum pass's tile
    if "ppo_tile" in sections or "ppo_count" in sections:
        B, T = (16, 300) if small else (1024, 8192)
        step, floor = _ppo_policy_step(B, T, device, gen)
        ref_grad = step()
        configs = [(s, t, w) for s in ppo_kernels.SCHEDULES for t, w in PPO_TILES] if "ppo_tile" in sections else []
        for schedule, tile, warps in configs:
            # on CPU / under the interpreter every schedule runs split (launch_schedule says so)
            with ppo_kernels.launch_mode(schedule), ppo_tile_override(tile, warps):
                runs = ppo_kernels.launch_schedule(device)
                label = f"ppo_policy_loss {B}x{T} launch={schedule} (runs {runs}) tile={tile} warps={warps}"
                record("ppo_tile", label, step, floor, ref_grad)
        # entries follow configs (one per config); none ran: keep the default schedule and tile
        timed = [(e["ms"], config) for e, config in zip(results["ppo_tile"], configs) if "ms" in e]
        schedule, tile, warps = min(timed)[1] if timed else ("auto", None, None)
        for count_tile, count_warps in PPO_COUNT_TILES if "ppo_count" in sections else ():
            with ppo_kernels.launch_mode(schedule), ppo_tile_override(tile, warps, count_tile, count_warps):
                label = f"ppo_policy_loss {B}x{T} launch={schedule} tile={ppo_kernels._TILE} count={count_tile}/{count_warps}w"
                record("ppo_count", label, step, floor, ref_grad)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out_dir / 'tune.json'}")
    errors = [e for sec in SECTIONS for e in results[sec] if "error" in e]
    return 1 if errors and small else 0


if __name__ == "__main__":
    sys.exit(main())
