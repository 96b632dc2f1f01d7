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
    token-mean  1 / sum m                 seq-mean-token-sum       1 / n_seqs
    seq-mean-token-mean  1 / (sum_t m_bt n_seqs)           seq-mean-token-sum-norm  1 / (n_seqs H)
(n_seqs = max(#rows with sum_t m_bt > 0, 1); a mask sum of 0 divides by 1 instead, so an empty
mask or row gives 0, and a fractional mask summing to less than 1 still divides by its sum).
So the weights are known before the loss, and the forward writes the FINAL gradient w * dL/dx, in the input's dtype:

  COUNT: reads the mask once -> counts_b = sum_t m_bt; the program that finishes last turns the
     B counts into s_b and sum m (for the stat means);
  LOSS_PASS: over [BLOCK_B, BLOCK_T] tiles (shared by both losses): reads x, x_old, A or R, mask
     once; writes grad = w * dL/dx and per-tile partial sums (sum w L and the stat numerators,
     plus a per-tile max ratio); the last program reduces the partials in a fixed order into the
     loss and the stats.
"Last program": each program bumps an arrival counter (an atomic on a counter, never on a sum)
after its stores; the one that sees n_programs - 1 does the reduction. Both phases live in one
kernel, `_ppo_fwd_kernel`, as grid-stride loops, and are launched one of three ways
(`launch_schedule`; with the same tile every way gives the same bits, and each way is
deterministic):
  fused (opt-in, RLHF_FAST_PPO_LAUNCH=fused): ONE cooperative launch of as many programs as fit
     on the GPU at once; between the phases every program waits for a flag that the last
     counting program sets once the row scales are stored (each program loads its first tile
     and computes its terms before it waits). One launch (plus the memset of a small work
     buffer), no gap between the phases, and the mask's second read right after its first (L2;
     the loss phase walks the tiles in the opposite order to the count phase, so the rows
     counted last are read again first). Its own tile (_FUSED_TILE): a looping program's
     registers set how many fit on an SM.
  pdl (opt-in, sm_90+): COUNT, then LOSS_PASS launched with programmatic dependent launch: it
     starts once every COUNT program has started, loads its inputs and computes the per-token
     terms, and waits (griddepcontrol.wait) only before it reads the row scales.
  split (the default everywhere; also where fused / pdl cannot run): COUNT, then LOSS_PASS.
Why split is the default: it is the schedule that has run on a GPU (the whole suite and the
benchmark on an H100, 2026-11-23). fused and pdl have only been compiled for sm_90 and run in the
interpreter (fused with one program); a grid-wide wait that misbehaves on hardware would hang or
read row scales early, so they stay opt-in until a GPU run checks them bit for bit against split
(tests/test_ppo.py's *_gpu schedule tests) and times them (bench/gpu_session.sh).
On an H100 (2026-11-23, split, the only schedule measured so far) the mask pass took 19.9 us and
the loss pass 59.6 us of a 85 us step, the loss pass at 95 % of its traffic floor: the
serialisation, the ramp and tail of the short mask pass, and the launch gap, not the traffic,
are what the fused and pdl schedules are built to take back (the benchmark times all three side
by side; RLHF_FAST_PPO_LAUNCH picks one).
Backward scales the saved gradient in place by grad_output with the shared in-place kernel of
rlhf_fast.kernels.ppo_from_logits (`scale_grad_`): every program loads grad_output from its pointer
and returns at once when it is 1, so the common `loss.backward()` moves no [B, T] bytes and never
syncs with the host. (In place: a second backward through the same graph would scale twice; the
autograd wrappers in rlhf_fast/ppo.py detect it and raise.)

Bytes for [B, T] = [1024, 8192] fp32 inputs and gradient (32 MiB per [B, T] fp32 array):
    bool mask:  forward 8 (mask sums) + 3 * 32 + 8 (inputs) + 32 (grad) = 144 MiB; backward ~0.
    fp32 mask:  forward 32 + 4 * 32 + 32 = 192 MiB; backward ~0 (grad_output == 1).
(HBM bytes: the mask pass loads with L2 evict_last and the loss pass streams everything else
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

import ctypes
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rlhf_fast._backend import env_set, fused_grad_dtype, kernel_mask, on_input_device, triton_interpreting

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
# The fused launch's tile (both of its phases run with these warps). Its programs loop over
# tiles, and its registers decide how many programs an SM holds: for the fp32 policy loss on
# sm_90, 4096/8 warps takes 157 registers on Triton 3.6 (1 program per SM; 123 on 3.9), 2048/8
# warps 113 (2 per SM; 105 on 3.9). Not yet timed on a GPU (bench/tune_gpu.py's ppo_tile section
# times every schedule x tile). A different tile than the split launches' changes the order of
# the loss's sums (its last bits), not the gradient.
_FUSED_TILE = 2048
_FUSED_WARPS = 8
# Mask row sums: 8192 elements per loop iteration (8 KB of a bool mask, 32 KB of a float one).
_COUNT_TILE = 8192
_COUNT_WARPS = 8
# Lanes of the last-program reductions: row scales over B (in the count phase), finalize over the
# tiles (in the loss phase, whose register count it must not raise: 1024 lanes of 8 planes
# took the fp32 policy kernel from 63 to 79 registers on sm_90, 512 leaves it at 63).
_REDUCE_BLOCK = 1024
_FINALIZE_BLOCK = 512
# Work buffer of one forward call: int32, zero-initialised (one allocation, one memset). Header:
# the arrival counters of the two phases and the fused launch's row-scales-ready flag (padded to
# 16 bytes); then fp32 counts [B], row scales [B], sum m [1]; then, 16-byte aligned, the fp32
# per-tile partials [N_PLANES, n_tiles].
_WORK_HEADER = tl.constexpr(4)
_COUNTER_ROW_SCALES = tl.constexpr(0)
_COUNTER_TILES = tl.constexpr(1)
_FLAG_ROW_SCALES = tl.constexpr(2)


def _work_size(B: int, n_planes: int, n_tiles: int) -> int:
    return (int(_WORK_HEADER) + 2 * B + 1 + 3) // 4 * 4 + n_planes * n_tiles  # = _part_offset + partials


@functools.cache  # called twice per loss call: host time counts at these sizes
def _tile_config(B: int, T: int, tile: int) -> tuple[int, int]:
    block_t = min(triton.next_power_of_2(max(T, 1)), tile)
    block_b = min(max(tile // block_t, 1), triton.next_power_of_2(max(B, 1)))
    return block_b, block_t


@triton.jit
def _tile_offsets(tile, n_col_tiles, B, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows [BLOCK_B] and columns [BLOCK_T] (int64) of tile number `tile` (row-major over the
    [cdiv(B, BLOCK_B), n_col_tiles] tiles), with their in-bounds masks."""
    tile_b = tile // n_col_tiles
    tile_t = tile - tile_b * n_col_tiles
    # tile_b * BLOCK_B < B and tile_t * BLOCK_T < T fit in int32; the products with the strides do not.
    rows = (tile_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (tile_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
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
    _WORK_HEADER above): fp32 counts [B] | row scales [B] | sum m [1], then the fp32 per-tile
    partials [N_PLANES, n_tiles]."""
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
def _set_flag(flag_ptr):
    """Release: everything this program stored before is visible to a program that then sees the flag."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, 1, sem="release")


@triton.jit
def _wait_for_flag(flag_ptr):
    """Spin until another program has set the flag (acquire). Only safe when every program of the
    grid is resident at once: the fused launch is a cooperative launch, which guarantees that (or
    fails to launch); the interpreter runs programs one after another, so it never gets here."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while seen == 0:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.debug_barrier()  # the acquiring thread's view before any thread reads the row scales


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
        s = 1.0 / tl.where(total_m > 0.0, total_m, 1.0)  # a fractional mask may sum to < 1
    elif AGG == 3:
        s = 1.0 / (n_seqs * horizon)
    else:
        s = 1.0 / n_seqs
    for start in range(0, B, BLOCK):
        rows = start + lanes
        if AGG == 2:
            c = tl.load(counts_ptr + rows, mask=rows < B, other=0.0, cache_modifier=".cg")
            scale = 1.0 / (tl.where(c > 0.0, c, 1.0) * n_seqs)
        else:
            scale = tl.zeros((BLOCK,), tl.float32) + s
        tl.store(scale_ptr + rows, scale * loss_scale, mask=rows < B)


@triton.jit
def _count_rows(mask_ptr, mask_sb, mask_st, counts_ptr, row_block, B, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """counts_b = sum_t m_bt for the BLOCK_B rows of row block `row_block`, in a fixed order."""
    rows = (row_block * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    lanes = tl.arange(0, BLOCK_T).to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + lanes
        # evict_last: the loss phase reads the mask again right after; at the benchmark size
        # (a 32 MiB fp32 mask, 50 MB of L2 on an H100) that second read can come from L2.
        valid = row_ok[:, None] & (cols < T)[None, :]
        acc += _load_tile(mask_ptr, mask_sb, mask_st, rows, cols, valid, "evict_last")
    tl.store(counts_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


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
def _loss_tile(
    tile,
    n_col_tiles,
    x_ptr,
    x_sb,
    x_st,
    a_ptr,
    a_sb,
    a_st,
    b_ptr,
    b_sb,
    b_st,
    mask_ptr,
    mask_sb,
    mask_st,
    scale_ptr,
    part_ptr,
    grad_ptr,
    flag_ptr,
    first_tile,
    B,
    T,
    n_tiles,
    clip_low,
    clip_high,
    dual_clip,
    LOSS: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WAIT_GDC: tl.constexpr,
    WAIT_FLAG: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_T] tile: loss terms, the final gradient w * dL/dx and the tile's
    partial sums (column `tile` of the partial planes).
    WAIT_GDC (pdl) / WAIT_FLAG (fused; only the program's first tile, `first_tile`, waits): the
    inputs are loaded and the per-token terms computed first, then the tile waits for the row scales:
    gdc_wait() for the previous launch's mask pass, or the row-scales flag; so the loads overlap
    the mask pass's tail. Nothing before the wait reads or writes what the mask pass writes."""
    rows, cols, row_ok, col_ok = _tile_offsets(tile, n_col_tiles, B, T, BLOCK_B, BLOCK_T)
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

    if WAIT_GDC:
        gdc_wait()  # the mask pass has finished: its row scales and sum m are visible
    if WAIT_FLAG:  # noqa: SIM102 - a constexpr gate: the runtime test below is compiled only here
        if first_tile:  # later tiles of the program find the flag set
            _wait_for_flag(flag_ptr)
    w = m * tl.load(scale_ptr + rows, mask=row_ok, other=0.0, cache_modifier=".cg")[:, None]

    if WRITE_GRAD:
        grad = tl.where(counted, w * dloss, 0.0)
        grad_ptrs = grad_ptr + rows[:, None] * T + cols[None, :]
        tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=valid, eviction_policy="evict_first")

    tl.store(part_ptr + tile, _tile_sum(tl.where(counted, w * loss, 0.0)))
    tl.store(part_ptr + n_tiles + tile, _tile_sum(tl.where(counted & clipped, m, 0.0)))
    tl.store(part_ptr + 2 * n_tiles + tile, _tile_sum(tl.where(counted, m * mean_term, 0.0)))
    if LOSS == 0:
        tl.store(part_ptr + 3 * n_tiles + tile, _tile_sum(tl.where(counted, m * ratio, 0.0)))
        tl.store(part_ptr + 4 * n_tiles + tile, _tile_sum(tl.where(counted & dual_active, m, 0.0)))
        tile_max = tl.max(tl.max(tl.where(counted, ratio, -float("inf")), axis=1), axis=0)
        tl.store(part_ptr + 5 * n_tiles + tile, tile_max)


# Phases of _ppo_fwd_kernel (a bit set).
COUNT, LOSS_PASS, BOTH = 1, 2, 3


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
    work_ptr,  # int32 work buffer (zeroed per call): counters, counts, row scales, partials
    grad_ptr,  # [B, T] contiguous, fused_grad_dtype(x's dtype): w * dL/dx
    loss_ptr,  # 0-d fp32 out
    stats_ptr,  # [N_SUMS - 1 + HAS_MAX] fp32 out
    B,
    T,
    n_row_blocks,  # mask row blocks of COUNT_BLOCK_B rows
    n_col_tiles,
    n_tiles,
    horizon,
    loss_scale,
    clip_low,  # policy: eps_low; value: clip_eps
    clip_high,  # policy: eps_high
    dual_clip,
    PHASES: tl.constexpr,  # COUNT | LOSS_PASS | BOTH
    AGG: tl.constexpr,
    LOSS: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    COUNT_BLOCK_B: tl.constexpr,
    COUNT_BLOCK_T: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
    N_SUMS: tl.constexpr,
    N_SUMS_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    """The whole forward, as grid-stride loops (a program takes work items pid, pid + nprog, ...;
    the count phase in ascending order, the loss phase in descending order):

    COUNT: mask row counts over the row blocks; the program that finishes last turns them into the
        row scales s_b and sum m.
    LOSS_PASS: loss terms, the final gradient and per-tile partials over the tiles; the program
        that finishes last reduces the partials into the loss and the stats.
    BOTH (the fused launch): COUNT, then LOSS_PASS, whose first tile in each program waits for
        the row scales (a flag the last counting program sets) after its loads. Needs every
        program resident at once: launched as a cooperative grid of at most as many programs as
        fit on the GPU, and at most n_tiles.

    The split launches are COUNT over n_row_blocks programs then LOSS_PASS over n_tiles programs
    (one work item each). Every result is independent of the grid size (and, at the same tile,
    of the schedule): each count, partial and final sum is computed by one program in a fixed
    order.
    PDL (split launches on sm_90+, both launches): COUNT lets the LOSS_PASS launch start once all
    its programs have started; LOSS_PASS waits (gdc_wait) only before it reads the row scales."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    counts_ptr, scale_ptr, total_ptr, part_ptr = _work_views(work_ptr, B)
    if PHASES & 1:
        if PDL:
            gdc_launch_dependents()
        for row_block in range(pid, n_row_blocks, n_programs):
            _count_rows(mask_ptr, mask_sb, mask_st, counts_ptr, row_block, B, T, COUNT_BLOCK_B, COUNT_BLOCK_T)
        if _is_last_program(work_ptr + _COUNTER_ROW_SCALES, n_programs):
            _row_scales(counts_ptr, scale_ptr, total_ptr, B, horizon, loss_scale, AGG, REDUCE_BLOCK)
            if PHASES == 3:
                _set_flag(work_ptr + _FLAG_ROW_SCALES)
    if PHASES & 2:
        # A program's tiles pid, pid + n_programs, ... in DESCENDING order: the count phase walked
        # the rows upwards, so the mask rows it read last (the most likely still in L2) are read
        # again first. Fused: the program's first tile waits for the row scales after its loads
        # and terms (the grid has at most n_tiles programs, so every program has one and waits
        # exactly once). Split / pdl: one tile per program.
        n_own = (n_tiles - 1 - pid) // n_programs + 1
        last_own = pid + (n_own - 1) * n_programs
        for k in range(n_own):
            _loss_tile(
                last_own - k * n_programs,
                n_col_tiles,
                x_ptr,
                x_sb,
                x_st,
                a_ptr,
                a_sb,
                a_st,
                b_ptr,
                b_sb,
                b_st,
                mask_ptr,
                mask_sb,
                mask_st,
                scale_ptr,
                part_ptr,
                grad_ptr,
                work_ptr + _FLAG_ROW_SCALES,
                k == 0,
                B,
                T,
                n_tiles,
                clip_low,
                clip_high,
                dual_clip,
                LOSS,
                HAS_DUAL,
                WRITE_GRAD,
                BLOCK_B,
                BLOCK_T,
                PDL,
                PHASES == 3,
            )
        if _is_last_program(work_ptr + _COUNTER_TILES, n_programs):
            _finalize(part_ptr, total_ptr, loss_ptr, stats_ptr, n_tiles, N_SUMS, N_SUMS_P2, LOSS == 0, BLOCK_R)


@triton.jit
def _finalize(
    part_ptr,  # [N_SUMS (+1 max plane), n_tiles]
    total_ptr,  # [1] sum m
    loss_ptr,  # 0-d out
    stats_ptr,  # [N_SUMS - 1 + HAS_MAX] out: sums 1.. / sum m (1 if 0), then the max
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
    total = tl.load(total_ptr, cache_modifier=".cg")
    denom = tl.where(total > 0.0, total, 1.0)
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


LAUNCH_ENV = "RLHF_FAST_PPO_LAUNCH"
SCHEDULES = ("fused", "pdl", "split")

# Devices where the driver refused a cooperative launch of even one program per SM (a process
# limited to part of the GPU, e.g. under MPS): the forward runs split there.
_NO_FUSED: set[int] = set()
# Programs per SM of a fused launch, per kernel specialisation and device: learned from the
# compiled kernel (the driver's occupancy) after its first launch, which uses one per SM; and the
# specialisations whose learned count has launched (the only ones used under CUDA graph capture).
_FUSED_PROGRAMS_PER_SM: dict[tuple, int] = {}
_FUSED_LAUNCHED: set[tuple] = set()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _device_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_schedule(device: torch.device) -> str:
    """How the forward is launched for tensors on `device`:

    "split": the count launch, then the loss launch after it has finished (the default: the
        only schedule run on a GPU so far, see the module docstring);
    "fused": one cooperative launch; the programs wait for the row scales inside the kernel;
    "pdl": the count launch, then the loss launch with programmatic dependent launch (sm_90+).

    RLHF_FAST_PPO_LAUNCH=auto|fused|pdl|split chooses (auto, the default, is split). CPU tensors,
    TRITON_INTERPRET (the interpreter runs programs one after another: no grid-wide wait, no
    griddepcontrol) and ROCm always run split; so do pdl before sm_90 and fused where the driver
    refused the cooperative launch. The gradient is the same bits every way; the loss and stats
    too where the fused tile equals the split one (_FUSED_TILE, _TILE)."""
    choice = os.environ.get(LAUNCH_ENV) or "auto"
    if choice not in ("auto", *SCHEDULES):
        raise ValueError(f"{LAUNCH_ENV}={choice!r}: expected one of auto, fused, pdl, split")
    if device.type != "cuda" or triton_interpreting() or torch.version.hip is not None:
        return "split"  # (ROCm: Triton drops the cooperative flag silently where unsupported)
    if choice in ("auto", "split"):
        return "split"
    index = _device_index(device)
    if choice == "fused":
        return "split" if index in _NO_FUSED else "fused"
    if choice == "pdl" and _device_capability(index)[0] < 9:
        return "split"
    return choice


def launch_mode(schedule: str):
    """RLHF_FAST_PPO_LAUNCH=schedule inside the block, restored after (the benchmark times the
    schedules side by side)."""
    return env_set(LAUNCH_ENV, schedule)


@functools.cache
def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")  # already loaded by torch / Triton where a GPU is in use
    except OSError:
        return None


def _driver_occupancy(compiled) -> int | None:
    """Programs of a compiled kernel one SM holds at once, as the CUDA driver computes it
    (cuOccupancyMaxActiveBlocksPerMultiprocessor), or None where it cannot be asked."""
    lib = _libcuda()
    function = getattr(compiled, "function", None)
    if lib is None or not function:
        return None
    blocks = ctypes.c_int(0)
    status = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks),
        ctypes.c_void_p(function),
        ctypes.c_int(32 * compiled.metadata.num_warps),
        ctypes.c_size_t(compiled.metadata.shared),
    )
    return blocks.value if status == 0 and blocks.value > 0 else None


def _estimated_occupancy(compiled, device_index: int) -> int:
    """The same from the device properties, where the driver cannot be asked: registers
    (allocated per warp in units of 256), threads, shared memory (+1 KB per block reserved)."""
    props = torch.cuda.get_device_properties(device_index)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(int(compiled.n_regs), 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 1536) // (32 * warps)
    shared = int(compiled.metadata.shared)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    by_smem = smem // (shared + 1024) if shared and smem else by_threads
    return max(1, min(by_regs, by_threads, by_smem))


def _resident_programs_per_sm(compiled, device_index: int) -> int:
    return _driver_occupancy(compiled) or _estimated_occupancy(compiled, device_index)


# How Triton's launcher reports a failed cuLaunchKernelEx, and the two failures that mean "no
# cooperative launch of this size" (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE) and "no cooperative
# launch here at all" (CUDA_ERROR_NOT_SUPPORTED). Nothing ran then; any other error is re-raised.
_CUDA_LAUNCH_ERROR = "Triton Error [CUDA]: "
_TOO_LARGE = "too many blocks in cooperative launch"
_NOT_SUPPORTED = "operation not supported"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _launch_fused(args, constexprs, n_tiles: int, device: torch.device, warps: int) -> bool:
    """The forward as ONE cooperative launch of at most as many programs as fit on the GPU (the
    programs wait for each other inside the kernel; a cooperative launch guarantees they are all
    resident, or is refused by the driver instead of hanging). Programs per SM: 1 at a kernel's
    first launch, then what the driver says the compiled kernel allows (one fewer per refusal).
    Returns False, having launched nothing, when the driver refuses cooperative launches here:
    the caller then launches split. Under CUDA graph capture (where a refusal would invalidate the
    capture) only a count that already launched is used, otherwise 1 per SM, and nothing is learned."""
    index = _device_index(device)
    key = (index, warps, *constexprs.values(), *(t.dtype for t in args[:12:3]))
    capturing = _capturing()
    per_sm = _FUSED_PROGRAMS_PER_SM.get(key, 1)
    if capturing and key not in _FUSED_LAUNCHED:
        per_sm = 1
    while True:
        grid = (max(1, min(n_tiles, _sm_count(index) * per_sm)),)
        try:
            compiled = _ppo_fwd_kernel[grid](
                *args, PHASES=BOTH, PDL=False, num_warps=warps, launch_cooperative_grid=True, **constexprs
            )
        except RuntimeError as exc:
            message = str(exc)
            if capturing or not message.startswith(_CUDA_LAUNCH_ERROR):
                raise
            if _NOT_SUPPORTED in message or (_TOO_LARGE in message and per_sm == 1):
                _NO_FUSED.add(index)
                return False
            if _TOO_LARGE not in message:
                raise
            per_sm -= 1
            _FUSED_PROGRAMS_PER_SM[key] = per_sm
            _FUSED_LAUNCHED.discard(key)
            continue
        if capturing:
            return True
        if key not in _FUSED_PROGRAMS_PER_SM:
            learned = _resident_programs_per_sm(compiled, index) if compiled is not None else 1
            _FUSED_PROGRAMS_PER_SM[key] = learned
            if learned == per_sm:
                _FUSED_LAUNCHED.add(key)
        elif _FUSED_PROGRAMS_PER_SM[key] == per_sm:
            _FUSED_LAUNCHED.add(key)
        return True


@on_input_device
def _forward(loss_kind, x, a, b, mask, clip_low, clip_high, dual_clip, agg, horizon, write_grad, loss_scale):
    B, T = x.shape
    dev = x.device
    n_sums, has_max = _N_SUMS[loss_kind], _HAS_MAX[loss_kind]
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty((n_sums - 1 + int(has_max),), dtype=torch.float32, device=dev)
    grad = torch.empty((B, T) if write_grad else (0,), dtype=fused_grad_dtype(x.dtype), device=dev)
    if B == 0 or T == 0:
        loss.zero_()
        stats.zero_()
        grad.zero_()
        return loss, stats, grad
    m = kernel_mask(mask)
    launch = functools.partial(
        _launch, loss_kind, x, a, b, m, clip_low, clip_high, dual_clip, agg, horizon, write_grad, loss_scale
    )
    schedule = launch_schedule(dev)
    if schedule != "fused" or not launch("fused", loss, stats, grad):
        launch("pdl" if schedule == "pdl" else "split", loss, stats, grad)
    return loss, stats, grad


def _launch(
    loss_kind,
    x,
    a,
    b,
    m,
    clip_low,
    clip_high,
    dual_clip,
    agg,
    horizon,
    write_grad,
    loss_scale,
    schedule,
    loss,
    stats,
    grad,
) -> bool:
    """Launches the forward one way (see launch_schedule) into loss, stats and grad. False: the
    fused launch was refused and nothing ran."""
    B, T = x.shape
    n_sums, has_max = _N_SUMS[loss_kind], _HAS_MAX[loss_kind]
    tile, warps = (_FUSED_TILE, _FUSED_WARPS) if schedule == "fused" else (_TILE, _WARPS)
    block_b, block_t = _tile_config(B, T, tile)
    count_b, count_t = _tile_config(B, T, _COUNT_TILE)
    n_row_blocks = triton.cdiv(B, count_b)
    n_col_tiles = triton.cdiv(T, block_t)
    n_tiles = triton.cdiv(B, block_b) * n_col_tiles
    work = torch.zeros((_work_size(B, n_sums + int(has_max), n_tiles),), dtype=torch.int32, device=x.device)
    args = (
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
        n_row_blocks,
        n_col_tiles,
        n_tiles,
        float(horizon) if horizon > 0 else float(T),  # 0 stands for T (see rlhf_fast.ppo._horizon)
        float(loss_scale),
        float(clip_low),
        float(clip_high),
        0.0 if dual_clip is None else float(dual_clip),
    )
    constexprs = {
        "AGG": AGG_CODES[agg],
        "LOSS": loss_kind,
        "HAS_DUAL": dual_clip is not None,
        "WRITE_GRAD": write_grad,
        "BLOCK_B": block_b,
        "BLOCK_T": block_t,
        "COUNT_BLOCK_B": count_b,
        "COUNT_BLOCK_T": count_t,
        "REDUCE_BLOCK": min(_REDUCE_BLOCK, triton.next_power_of_2(B)),
        "N_SUMS": n_sums,
        "N_SUMS_P2": triton.next_power_of_2(n_sums),
        "BLOCK_R": min(_FINALIZE_BLOCK, triton.next_power_of_2(n_tiles)),
    }
    if schedule == "fused":
        return _launch_fused(args, constexprs, n_tiles, x.device, warps)
    pdl = schedule == "pdl"
    # 1: row counts of the mask, then (last program) the aggregation weights' row scales.
    _ppo_fwd_kernel[(n_row_blocks,)](*args, PHASES=COUNT, PDL=pdl, num_warps=_COUNT_WARPS, **constexprs)
    # 2: loss terms, final gradient, per-tile partials, then (last program) loss and stats.
    _ppo_fwd_kernel[(n_tiles,)](*args, PHASES=LOSS_PASS, PDL=pdl, num_warps=warps, launch_pdl=pdl, **constexprs)
    return True


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
    weights), not the stats. horizon is the seq-mean-token-sum-norm divisor; 0 stands for T.
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
