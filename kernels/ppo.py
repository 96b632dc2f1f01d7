"""PPO per-token policy loss and clipped value loss on [B, T] tensors: Triton kernels + launchers.

Policy, per counted token (fp32; A = advantage; the shared helper `_terms.ppo_clip_term`):
    r     = exp(logp - old)
    L     = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dL/dlogp = -A r, or 0 where the clipped branch is strictly active (r is then outside the
            clip range, so clip(r) is constant)
    dual clip c, A < 0:  L = min(L, -c A), gradient 0 where -c A is strictly smaller.
Value, per counted token (eps = clip_eps):
    vc    = clip(v, v_old - eps, v_old + eps)
    L     = 0.5 max((v - R)^2, (vc - R)^2)
    dL/dv = v - R, or 0 where the clipped term is strictly larger (v is then outside the range).
At exact ties torch.maximum splits the gradient between the two branches; the branches' gradients
are then equal (or the tie is a measure-zero boundary case), so taking the unclipped branch matches.

Every `aggregate` mode is a weighted sum  loss = sum_bt w_bt L_bt  with w_bt = m_bt * s_b and a
per-row scale s_b that depends on the mask alone (rlhf_fast.aggregation.aggregation_weights):
    token-mean  1 / max(sum m, 1)         seq-mean-token-sum       1 / n_seqs
    seq-mean-token-mean  1 / (max(sum_t m_bt, 1) n_seqs)   seq-mean-token-sum-norm  1 / (n_seqs H)
(n_seqs = max(#rows with sum_t m_bt > 0, 1)). So the weights are known before the loss, and the
forward writes the FINAL gradient w * dL/dx, in the input's dtype:

  1. `_mask_row_scales_kernel` (grid over row blocks): reads the mask once -> counts_b =
     sum_t m_bt; the program that finishes last turns the B counts into s_b and sum m (for the
     stat means);
  2. `_ppo_fwd_kernel` (grid over [BLOCK_B, BLOCK_T] tiles, shared by both losses): reads
     x, x_old, A or R, mask once; writes grad = w * dL/dx and per-tile partial sums (sum w L and
     the stat numerators, plus a per-tile max ratio); the last program reduces the partials in a
     fixed order into the loss and the stats.
"Last program": each program bumps an arrival counter (an atomic on a counter, never on a sum)
after its stores; the one that sees n_programs - 1 does the reduction. The result is
deterministic, and the forward is 2 launches plus one memset of a small work buffer instead of 4
launches; at the benchmark size ([1024, 8192] fp32, ~50 us of memory traffic) each launch saved
is a few us of host time and a few us of GPU time (a 1-program kernel and the gap before it).
On sm_90+ the forward kernel is launched with programmatic dependent launch (PDL): the mask
kernel lets it start once all its programs have started (griddepcontrol.launch_dependents), and
the forward loads its four inputs and computes the per-token terms before it waits
(griddepcontrol.wait) for the row scales. On an H100 (2026-11-23, before PDL) the mask kernel
took 19.9 us and the forward 59.6 us of a 85 us step, the forward at 95 % of its traffic floor:
the serialisation, not the traffic, was what PDL can take back (unmeasured yet; the benchmark's
"no-PDL" column times the plain launch in the same run; RLHF_FAST_PPO_PDL=0 turns it off).
Backward scales the saved gradient in place by grad_output with the shared in-place kernel of
rlhf_fast.kernels.ppo_from_logits (`scale_grad_`): every program loads grad_output from its pointer
and returns at once when it is 1, so the common `loss.backward()` moves no [B, T] bytes and never
syncs with the host. (In place: a second backward through the same graph would scale twice; the
autograd wrappers in rlhf_fast/ppo.py detect it and raise.)

Bytes for [B, T] = [1024, 8192] fp32 inputs and gradient (32 MiB per [B, T] fp32 array):
    bool mask:  forward 8 (mask sums) + 3 * 32 + 8 (inputs) + 32 (grad) = 144 MiB; backward ~0.
    fp32 mask:  forward 32 + 4 * 32 + 32 = 192 MiB; backward ~0 (grad_output == 1).
(HBM bytes: the mask kernel loads with L2 evict_last and the forward streams everything else
with evict_first, so where the mask fits in L2 (50 MB on an H100) its second read can come
from there; unmeasured so far.)
The second read of the mask is the price of weights that depend on global mask totals; the
alternative, saving an unscaled gradient and scaling it by s_b * grad_output in the backward,
costs a read + write of a [B, T] fp32 buffer (64 MiB here) in every backward instead.

Uncounted tokens go through tl.where (never a multiply by 0) and get log-ratio 0, so inf/NaN from
huge log-prob differences or poisoned values there never reach the loss or gradient. Offsets are
int64.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rlhf_fast._backend import env_set, kernel_mask, triton_interpreting

from ._terms import clamp_nan, ppo_clip_term
from .ppo_from_logits import scale_grad_ as _scale_rows_in_place_

AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}

# LOSS mode switch of the shared forward kernel.
POLICY, VALUE = 0, 1
# Per-tile partial-sum planes: 0 = sum w L, then the numerators of the stat means (sum m * stat).
# Stats vector layout (rlhf_fast/ppo.py's _POLICY_STATS / _VALUE_STATS name the same entries; kept
# there too so that the package imports without triton).
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max")  # last: a max
VALUE_STATS = ("vf_clipfrac", "vpred_mean")
_N_SUMS = {POLICY: 5, VALUE: 3}  # loss + the mean stats
_HAS_MAX = {POLICY: True, VALUE: False}

# Forward tiles: 4096 elements per program, 8 warps: 16 elements of each of the 4 inputs per thread
# in flight (128-bit loads for fp32). Tuned on an H100 (bench/tune_gpu.py, 2026-11-23, the
# [1024, 8192] fp32 step): 1024/4w 0.109 ms, 2048/4w 0.091, 2048/8w 0.089, 4096/8w 0.086,
# 4096/16w 0.089. The mask row-sum tile (_COUNT_*) made no difference there (0.084-0.085 ms).
_TILE = 4096
_WARPS = 8
# Mask row sums: 8192 elements per loop iteration (8 KB of a bool mask, 32 KB of a float one).
_COUNT_TILE = 8192
_COUNT_WARPS = 8
# Lanes of the last-program reductions: row scales over B (in the mask kernel), finalize over the
# tiles (in the forward kernel, whose register count it must not raise: 1024 lanes of 8 planes
# took the fp32 policy kernel from 63 to 79 registers on sm_90, 512 leaves it at 63).
_REDUCE_BLOCK = 1024
_FINALIZE_BLOCK = 512
# Work buffer of one forward call: int32, zero-initialised (one allocation, one memset). Header:
# the arrival counters of the two kernels (padded to 16 bytes); then fp32 counts [B], row scales
# [B], sum m [1]; then, 16-byte aligned, the fp32 per-tile partials [N_PLANES, n_tiles].
_WORK_HEADER = tl.constexpr(4)
_COUNTER_ROW_SCALES = tl.constexpr(0)
_COUNTER_TILES = tl.constexpr(1)


def _work_size(B: int, n_planes: int, n_tiles: int) -> int:
    return (int(_WORK_HEADER) + 2 * B + 1 + 3) // 4 * 4 + n_planes * n_tiles  # = _part_offset + partials


@functools.cache  # called twice per loss call: host time counts at these sizes
def _tile_config(B: int, T: int, tile: int) -> tuple[int, int]:
    block_t = min(triton.next_power_of_2(max(T, 1)), tile)
    block_b = min(max(tile // block_t, 1), triton.next_power_of_2(max(B, 1)))
    return block_b, block_t


@triton.jit
def _tile_offsets(B, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    return rows, cols, rows < B, cols < T


@triton.jit
def _load_tile(ptr, stride_b, stride_t, rows, cols, valid, EVICTION: tl.constexpr):
    """fp32 tile ptr[rows, cols] (rows [BLOCK_B], cols [BLOCK_T] int64), 0 outside `valid`.
    Predicated on `valid` only (never on the data-dependent mask) so the loads vectorise.
    EVICTION: the load's L2 eviction priority ("evict_last" / "evict_first")."""
    ptrs = ptr + rows[:, None] * stride_b + cols[None, :] * stride_t
    return tl.load(ptrs, mask=valid, other=0, eviction_policy=EVICTION).to(tl.float32)


@triton.jit
def _tile_sum(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _work_views(work_ptr, B):
    """Pointers into the one zero-initialised int32 work buffer of a forward call (layout at
    WORK_* below): the two arrival counters, then fp32 counts [B] | row scales [B] | sum m [1],
    then the fp32 per-tile partials [N_PLANES, n_tiles]."""
    f32 = work_ptr.to(tl.pointer_type(tl.float32), bitcast=True)
    counts = f32 + _WORK_HEADER
    return counts, counts + B, counts + 2 * B, f32 + _part_offset(B)


@triton.jit
def _part_offset(B):
    # 16-byte aligned start of the partials after the header and the 2B + 1 row floats.
    return ((_WORK_HEADER + 2 * B + 1 + 3) // 4) * 4


@triton.jit
def _is_last_program(counter_ptr, n_programs):
    """True in the one program that finishes last. Everything a program stored before this call is
    visible to the last one (acq_rel atomic at GPU scope after a CTA barrier), so the last program
    can reduce all the programs' results in a fixed order: deterministic, with no second launch.
    The counter starts at 0 (the work buffer is zero-initialised per call)."""
    tl.debug_barrier()  # every thread's stores issued before the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    return arrived == n_programs - 1


@triton.jit
def _row_scales(counts_ptr, scale_ptr, total_ptr, B, horizon, loss_scale, AGG: tl.constexpr, BLOCK: tl.constexpr):
    """counts [B] -> row scales s_b (times loss_scale) and sum m, in one program with a fixed
    summation order. Loads bypass L1 (.cg): the counts were written by other programs."""
    lanes = tl.arange(0, BLOCK)
    acc_m = tl.zeros((BLOCK,), tl.float32)
    acc_rows = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, B, BLOCK):
        c = tl.load(counts_ptr + start + lanes, mask=start + lanes < B, other=0.0, cache_modifier=".cg")
        acc_m += c
        acc_rows += tl.where(c > 0.0, 1.0, 0.0)
    total_m = tl.sum(acc_m, axis=0)
    n_seqs = tl.maximum(tl.sum(acc_rows, axis=0), 1.0)
    tl.store(total_ptr, total_m)
    if AGG == 0:
        s = 1.0 / tl.maximum(total_m, 1.0)
    elif AGG == 3:
        s = 1.0 / (n_seqs * horizon)
    else:
        s = 1.0 / n_seqs
    for start in range(0, B, BLOCK):
        rows = start + lanes
        if AGG == 2:
            c = tl.load(counts_ptr + rows, mask=rows < B, other=0.0, cache_modifier=".cg")
            scale = 1.0 / (tl.maximum(c, 1.0) * n_seqs)
        else:
            scale = tl.zeros((BLOCK,), tl.float32) + s
        tl.store(scale_ptr + rows, scale * loss_scale, mask=rows < B)


@triton.jit
def _mask_row_scales_kernel(
    mask_ptr,
    mask_sb,
    mask_st,
    work_ptr,  # int32 work buffer (zeroed): writes counts, row scales and sum m
    B,
    T,
    horizon,
    loss_scale,
    AGG: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid over row blocks: counts_b = sum_t m_bt; the last program then turns all the counts
    into the row scales s_b and sum m. PDL: let the forward kernel (launched with programmatic
    dependent launch) start as soon as every program of this one has started."""
    if PDL:
        gdc_launch_dependents()
    counts_ptr, scale_ptr, total_ptr, _ = _work_views(work_ptr, B)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + lanes
        # evict_last: the forward kernel reads the mask again right after; at the benchmark size
        # (a 32 MiB fp32 mask, 50 MB of L2 on an H100) that second read can come from L2.
        valid = row_ok[:, None] & (cols < T)[None, :]
        acc += _load_tile(mask_ptr, mask_sb, mask_st, rows, cols, valid, "evict_last")
    tl.store(counts_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)
    if _is_last_program(work_ptr + _COUNTER_ROW_SCALES, tl.num_programs(0)):
        _row_scales(counts_ptr, scale_ptr, total_ptr, B, horizon, loss_scale, AGG, REDUCE_BLOCK)


@triton.jit
def _value_clip_term(v, v_old, ret, clip_eps):
    """(L, dL/dv, clipped) of the clipped value loss (fp32, any shape)."""
    # NaN-propagating (torch.clamp / torch.maximum semantics): a NaN v must give a NaN loss.
    v_clipped = clamp_nan(v, v_old - clip_eps, v_old + clip_eps)
    err = v - ret
    err_clipped = v_clipped - ret
    sq = err * err
    sq_clipped = err_clipped * err_clipped
    clipped = sq_clipped > sq
    return 0.5 * tl.maximum(sq, sq_clipped, propagate_nan=tl.PropagateNan.ALL), tl.where(clipped, 0.0, err), clipped


@triton.jit
def _ppo_fwd_kernel(
    x_ptr,  # logprobs | values: the differentiable input
    x_sb,
    x_st,
    a_ptr,  # old_logprobs | old_values
    a_sb,
    a_st,
    b_ptr,  # advantages | returns
    b_sb,
    b_st,
    mask_ptr,
    mask_sb,
    mask_st,
    work_ptr,  # int32 work buffer: reads the row scales s_b; per-tile partials; arrival counter
    grad_ptr,  # [B, T] contiguous, x's dtype: w * dL/dx
    loss_ptr,  # 0-d fp32 out
    stats_ptr,  # [N_SUMS - 1 + HAS_MAX] fp32 out
    B,
    T,
    n_tiles,
    clip_low,  # policy: eps_low; value: clip_eps
    clip_high,  # policy: eps_high
    dual_clip,
    LOSS: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    N_SUMS: tl.constexpr,
    N_SUMS_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid over [BLOCK_B, BLOCK_T] tiles: loss terms, the final gradient and per-tile partials;
    the last tile's program then reduces the partials into the loss and the stats.
    PDL (launched with programmatic dependent launch after the mask kernel): the inputs are loaded
    and the per-token terms computed while the mask kernel may still run; gdc_wait() then waits
    for it (and its stores) before the row scales are read. Nothing before the wait reads or
    writes what the mask kernel writes."""
    _, scale_ptr, total_ptr, part_ptr = _work_views(work_ptr, B)
    rows, cols, row_ok, col_ok = _tile_offsets(B, T, BLOCK_B, BLOCK_T)
    valid = row_ok[:, None] & col_ok[None, :]
    # Every input is read once here (the mask for the second and last time): evict_first, so the
    # streamed inputs do not push the not-yet-read part of the mask out of L2.
    m = _load_tile(mask_ptr, mask_sb, mask_st, rows, cols, valid, "evict_first")
    x = _load_tile(x_ptr, x_sb, x_st, rows, cols, valid, "evict_first")
    a = _load_tile(a_ptr, a_sb, a_st, rows, cols, valid, "evict_first")
    b = _load_tile(b_ptr, b_sb, b_st, rows, cols, valid, "evict_first")
    counted = m != 0.0

    if LOSS == 0:  # policy: x = logp, a = old, b = A
        # Log-ratio 0 at uncounted tokens: exp() of a garbage difference there never runs.
        log_ratio = tl.where(counted, x - a, 0.0)
        loss, dloss, ratio, clipped, dual_active = ppo_clip_term(log_ratio, b, clip_low, clip_high, dual_clip, HAS_DUAL)
        mean_term = -log_ratio  # approx_kl = masked mean of old - logp
    else:  # value: x = v, a = v_old, b = R
        loss, dloss, clipped = _value_clip_term(x, a, b, clip_low)
        mean_term = x  # vpred_mean

    if PDL:
        gdc_wait()  # the mask kernel has finished: its row scales and sum m are visible
    w = m * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]

    if WRITE_GRAD:
        grad = tl.where(counted, w * dloss, 0.0)
        grad_ptrs = grad_ptr + rows[:, None] * T + cols[None, :]
        tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=valid, eviction_policy="evict_first")

    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + tile, _tile_sum(tl.where(counted, w * loss, 0.0)))
    tl.store(part_ptr + n_tiles + tile, _tile_sum(tl.where(counted & clipped, m, 0.0)))
    tl.store(part_ptr + 2 * n_tiles + tile, _tile_sum(tl.where(counted, m * mean_term, 0.0)))
    if LOSS == 0:
        tl.store(part_ptr + 3 * n_tiles + tile, _tile_sum(tl.where(counted, m * ratio, 0.0)))
        tl.store(part_ptr + 4 * n_tiles + tile, _tile_sum(tl.where(counted & dual_active, m, 0.0)))
        tile_max = tl.max(tl.max(tl.where(counted, ratio, -float("inf")), axis=1), axis=0)
        tl.store(part_ptr + 5 * n_tiles + tile, tile_max)

    if _is_last_program(work_ptr + _COUNTER_TILES, n_tiles):
        _finalize(part_ptr, total_ptr, loss_ptr, stats_ptr, n_tiles, N_SUMS, N_SUMS_P2, LOSS == 0, BLOCK_R)


@triton.jit
def _finalize(
    part_ptr,  # [N_SUMS (+1 max plane), n_tiles]
    total_ptr,  # [1] sum m
    loss_ptr,  # 0-d out
    stats_ptr,  # [N_SUMS - 1 + HAS_MAX] out: sums 1.. / max(sum m, 1), then the max
    n_tiles,
    N_SUMS: tl.constexpr,
    N_SUMS_P2: tl.constexpr,
    HAS_MAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per-tile partials -> loss and stats, in one program: every sum runs in a fixed order, so the
    result is deterministic. Loads bypass L1 (.cg): other programs wrote the partials."""
    k = tl.arange(0, N_SUMS_P2)
    r_lane = tl.arange(0, BLOCK_R)
    acc = tl.zeros((N_SUMS_P2, BLOCK_R), tl.float32)
    run_max = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    for start in range(0, n_tiles, BLOCK_R):
        r = start + r_lane
        ok = (k[:, None] < N_SUMS) & (r[None, :] < n_tiles)
        acc += tl.load(part_ptr + k[:, None] * n_tiles + r[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_MAX:
            tile_max = tl.load(
                part_ptr + N_SUMS * n_tiles + r, mask=r < n_tiles, other=-float("inf"), cache_modifier=".cg"
            )
            run_max = tl.maximum(run_max, tile_max)
    sums = tl.sum(acc, axis=1)
    denom = tl.maximum(tl.load(total_ptr, cache_modifier=".cg"), 1.0)
    tl.store(loss_ptr, tl.sum(tl.where(k == 0, sums, 0.0), axis=0))
    # stats[k - 1] = masked mean (0 for an empty mask); k - 1 = -1 is masked off.
    tl.store(stats_ptr + k - 1, sums / denom, mask=(k >= 1) & (k < N_SUMS))
    if HAS_MAX:
        # tl.max skips NaN; a NaN ratio at a counted token shows in the ratio sum (plane 3) instead.
        ratio_sum = tl.sum(tl.where(k == 3, sums, 0.0), axis=0)
        ratio_max = tl.max(run_max, axis=0)
        ratio_max = tl.where(ratio_max == -float("inf"), 0.0, ratio_max)
        is_nan = ratio_sum != ratio_sum  # noqa: PLR0124 (the NaN test)
        tl.store(stats_ptr + N_SUMS - 1, tl.where(is_nan, float("nan"), ratio_max))


# ----------------------------------------------------------------------------------------------
# Launchers. Callers (rlhf_fast/ppo.py) validate arguments; inputs are [B, T] with any strides.


PDL_ENV = "RLHF_FAST_PPO_PDL"


@functools.cache
def _device_has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether the forward kernel is launched with programmatic dependent launch after the mask
    kernel (sm_90+; griddepcontrol does not exist before). Off under TRITON_INTERPRET (the
    interpreter has no grid dependency control) and with RLHF_FAST_PPO_PDL=0 (benchmarks time
    both in one run)."""
    if device.type != "cuda" or triton_interpreting():
        return False
    if os.environ.get(PDL_ENV, "1") == "0":
        return False
    return _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_mode(on: bool):
    """RLHF_FAST_PPO_PDL=1/0 inside the block, restored after."""
    return env_set(PDL_ENV, "1" if on else "0")


def _forward(loss_kind, x, a, b, mask, clip_low, clip_high, dual_clip, agg, horizon, write_grad, loss_scale):
    B, T = x.shape
    dev = x.device
    n_sums, has_max = _N_SUMS[loss_kind], _HAS_MAX[loss_kind]
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty((n_sums - 1 + int(has_max),), dtype=torch.float32, device=dev)
    grad = torch.empty((B, T) if write_grad else (0,), dtype=x.dtype, device=dev)
    if B == 0 or T == 0:
        loss.zero_()
        stats.zero_()
        grad.zero_()
        return loss, stats, grad
    m = kernel_mask(mask)
    block_b, block_t = _tile_config(B, T, _TILE)
    grid = (triton.cdiv(B, block_b), triton.cdiv(T, block_t))
    n_tiles = grid[0] * grid[1]
    n_planes = n_sums + int(has_max)
    work = torch.zeros((_work_size(B, n_planes, n_tiles),), dtype=torch.int32, device=dev)

    pdl = pdl_enabled(dev)
    # 1: row counts of the mask, then (last program) the aggregation weights' row scales.
    count_b, count_t = _tile_config(B, T, _COUNT_TILE)
    _mask_row_scales_kernel[(triton.cdiv(B, count_b),)](
        m,
        m.stride(0),
        m.stride(1),
        work,
        B,
        T,
        float(horizon),
        float(loss_scale),
        AGG=AGG_CODES[agg],
        BLOCK_B=count_b,
        BLOCK_T=count_t,
        REDUCE_BLOCK=min(_REDUCE_BLOCK, triton.next_power_of_2(B)),
        PDL=pdl,
        num_warps=_COUNT_WARPS,
    )

    # 2: loss terms, final gradient, per-tile partials, then (last program) loss and stats.
    _ppo_fwd_kernel[grid](
        x,
        x.stride(0),
        x.stride(1),
        a,
        a.stride(0),
        a.stride(1),
        b,
        b.stride(0),
        b.stride(1),
        m,
        m.stride(0),
        m.stride(1),
        work,
        grad if write_grad else work,  # placeholder pointer, never written
        loss,
        stats,
        B,
        T,
        n_tiles,
        float(clip_low),
        float(clip_high),
        0.0 if dual_clip is None else float(dual_clip),
        LOSS=loss_kind,
        HAS_DUAL=dual_clip is not None,
        WRITE_GRAD=write_grad,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        N_SUMS=n_sums,
        N_SUMS_P2=triton.next_power_of_2(n_sums),
        BLOCK_R=min(_FINALIZE_BLOCK, triton.next_power_of_2(n_tiles)),
        PDL=pdl,
        num_warps=_WARPS,
        launch_pdl=pdl,
    )
    return loss, stats, grad


def ppo_policy_forward(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    agg: str,
    horizon: float,
    write_grad: bool,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss 0-d fp32, stats [5] fp32 in POLICY_STATS order, grad).

    eps_low / eps_high are the clip widths (ratio bounds 1 - eps_low, 1 + eps_high). grad is
    d loss / d logprobs ([B, T] contiguous, logprobs' dtype) for grad_output = 1, or an empty (0,)
    tensor when write_grad is False. loss_scale multiplies the loss and grad (the aggregation
    weights), not the stats.
    """
    return _forward(
        POLICY,
        logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low,
        eps_high,
        dual_clip,
        agg,
        horizon,
        write_grad,
        loss_scale,
    )


def ppo_value_forward(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
    horizon: float,
    write_grad: bool,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss 0-d fp32, stats [2] fp32 in VALUE_STATS order, grad): grad is d loss / d values
    ([B, T] contiguous, values' dtype) for grad_output = 1, or an empty (0,) tensor."""
    return _forward(VALUE, values, old_values, returns, mask, clip_eps, 0.0, None, agg, horizon, write_grad, loss_scale)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad [B, T] (contiguous) *= grad_output (0-d tensor) in place, no host sync; when
    grad_output == 1 every program returns after one scalar load (no [B, T] traffic)."""
    if grad.numel() == 0:
        return
    _scale_rows_in_place_(grad.unsqueeze(1), grad_output)  # [B, 1, T]: B rows of T elements
