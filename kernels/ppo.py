"""PPO per-token policy loss and clipped value loss on [B, T] tensors: Triton kernels + launchers.

Policy, per counted token (fp32; eps_low / eps_high; A = advantage):
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

Every `aggregate` mode is a weighted sum  loss = sum_bt w_bt L_bt  with w_bt = m_bt * s_b, a
per-row scale s_b that needs the global mask totals (token count, non-empty rows). So:

  1. forward kernel (one pass, grid over [BLOCK_B, BLOCK_T] tiles): reads logp, old, A, mask
     once; writes g = m * dL/dlogp (fp32, unscaled) and, per (row, tile), the partial sums
     sum m L, sum m and the stat numerators (+ a per-(row, tile) max for ratio_max);
  2. finalize kernel (one program, a few KB): reduces the partials in a fixed order (no atomics,
     deterministic) into the loss, the stats and the row scales s_b;
  3. backward kernel: grad = g * s_b * grad_output, cast to the input dtype.

Why save g rather than recompute in the backward: saving costs forward 4 reads + 1 write and
backward 1 read + 1 write (7 [B, T] passes); recomputing costs forward 4 reads and backward
4 reads + 1 write (9 passes). grad_output is only known in the backward, so one read + write of
a [B, T] buffer there is unavoidable either way. Uncounted tokens go through tl.where (never a
multiply by 0), so inf/NaN from huge log-prob differences there never reach the loss or gradient.
Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}

# Partial-sum rows written by the forward kernels (row 0 and 1 are shared by both losses).
POLICY_NSTAT = 6  # sum mL, sum m, clipped, old - logp, ratio, dual-clipped
VALUE_NSTAT = 4  # sum mL, sum m, vf-clipped, v
# Finalize output layout: [loss, means of partial rows 2.., (max)]; rlhf_fast/ppo.py's _POLICY_OUT
# and _VALUE_OUT name the same entries (kept there too so the package imports without triton).
POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max")
VALUE_STATS = ("vf_clipfrac", "vpred_mean")

# 2048 elements per program, 8 warps: 8 elements of each of the 4 inputs per thread in flight
# (128-bit loads for fp32) with room in registers for the ~10 live fp32 temporaries.
_TILE = 2048
_WARPS = 8


def _tile_config(B: int, T: int) -> tuple[int, int]:
    block_t = min(triton.next_power_of_2(max(T, 1)), _TILE)
    block_b = min(max(_TILE // block_t, 1), triton.next_power_of_2(max(B, 1)))
    return block_b, block_t


@triton.jit
def _tile_offsets(B, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    return rows, cols, rows < B, cols < T


@triton.jit
def _ppo_policy_fwd_kernel(
    logp_ptr,
    logp_sb,
    logp_st,
    old_ptr,
    old_sb,
    old_st,
    adv_ptr,
    adv_sb,
    adv_st,
    mask_ptr,
    mask_sb,
    mask_st,
    grad_ptr,  # [B, T] fp32: m * dL/dlogp (before the aggregation scale)
    part_ptr,  # [NSTAT, B, NB] fp32 per-(row, tile) sums
    max_ptr,  # [B, NB] fp32 per-(row, tile) max ratio over counted tokens (-inf if none)
    B,
    T,
    NB,
    clip_low,
    clip_high,
    dual_clip,
    HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _tile_offsets(B, T, BLOCK_B, BLOCK_T)
    valid = row_ok[:, None] & col_ok[None, :]
    r2 = rows[:, None]
    c2 = cols[None, :]
    # Loads are predicated on `valid` only (not on the data-dependent mask) so they vectorise.
    m = tl.load(mask_ptr + r2 * mask_sb + c2 * mask_st, mask=valid, other=0).to(tl.float32)
    logp = tl.load(logp_ptr + r2 * logp_sb + c2 * logp_st, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + r2 * old_sb + c2 * old_st, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + r2 * adv_sb + c2 * adv_st, mask=valid, other=0.0).to(tl.float32)
    counted = m != 0.0

    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    ratio_clipped = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    loss_plain = -adv * ratio
    loss_clipped = -adv * ratio_clipped
    clipped = loss_clipped > loss_plain
    loss = tl.maximum(loss_plain, loss_clipped)
    dloss = tl.where(clipped, 0.0, loss_plain)  # d(-A r)/dlogp = -A r
    if HAS_DUAL:
        bound = -dual_clip * adv
        dual = (adv < 0.0) & (loss > bound)
        loss = tl.where(dual, bound, loss)
        dloss = tl.where(dual, 0.0, dloss)

    if WRITE_GRAD:
        tl.store(grad_ptr + r2 * T + c2, tl.where(counted, dloss * m, 0.0), mask=valid)

    stat_offs = rows * NB + tl.program_id(1)
    plane = B * NB
    tl.store(part_ptr + stat_offs, tl.sum(tl.where(counted, loss * m, 0.0), axis=1), mask=row_ok)
    tl.store(part_ptr + plane + stat_offs, tl.sum(m, axis=1), mask=row_ok)
    tl.store(part_ptr + 2 * plane + stat_offs, tl.sum(tl.where(counted & clipped, m, 0.0), axis=1), mask=row_ok)
    tl.store(part_ptr + 3 * plane + stat_offs, tl.sum(tl.where(counted, -log_ratio * m, 0.0), axis=1), mask=row_ok)
    tl.store(part_ptr + 4 * plane + stat_offs, tl.sum(tl.where(counted, ratio * m, 0.0), axis=1), mask=row_ok)
    if HAS_DUAL:
        tl.store(part_ptr + 5 * plane + stat_offs, tl.sum(tl.where(counted & dual, m, 0.0), axis=1), mask=row_ok)
    else:
        tl.store(part_ptr + 5 * plane + stat_offs, tl.zeros((BLOCK_B,), tl.float32), mask=row_ok)
    tl.store(max_ptr + stat_offs, tl.max(tl.where(counted, ratio, -float("inf")), axis=1), mask=row_ok)


@triton.jit
def _ppo_value_fwd_kernel(
    v_ptr,
    v_sb,
    v_st,
    vold_ptr,
    vold_sb,
    vold_st,
    ret_ptr,
    ret_sb,
    ret_st,
    mask_ptr,
    mask_sb,
    mask_st,
    grad_ptr,
    part_ptr,  # [NSTAT, B, NB]
    B,
    T,
    NB,
    clip_eps,
    WRITE_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _tile_offsets(B, T, BLOCK_B, BLOCK_T)
    valid = row_ok[:, None] & col_ok[None, :]
    r2 = rows[:, None]
    c2 = cols[None, :]
    m = tl.load(mask_ptr + r2 * mask_sb + c2 * mask_st, mask=valid, other=0).to(tl.float32)
    v = tl.load(v_ptr + r2 * v_sb + c2 * v_st, mask=valid, other=0.0).to(tl.float32)
    v_old = tl.load(vold_ptr + r2 * vold_sb + c2 * vold_st, mask=valid, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + r2 * ret_sb + c2 * ret_st, mask=valid, other=0.0).to(tl.float32)
    counted = m != 0.0

    v_clipped = tl.maximum(tl.minimum(v, v_old + clip_eps), v_old - clip_eps)
    err = v - ret
    err_clipped = v_clipped - ret
    sq = err * err
    sq_clipped = err_clipped * err_clipped
    clipped = sq_clipped > sq
    loss = 0.5 * tl.maximum(sq, sq_clipped)
    dloss = tl.where(clipped, 0.0, err)

    if WRITE_GRAD:
        tl.store(grad_ptr + r2 * T + c2, tl.where(counted, dloss * m, 0.0), mask=valid)

    stat_offs = rows * NB + tl.program_id(1)
    plane = B * NB
    tl.store(part_ptr + stat_offs, tl.sum(tl.where(counted, loss * m, 0.0), axis=1), mask=row_ok)
    tl.store(part_ptr + plane + stat_offs, tl.sum(m, axis=1), mask=row_ok)
    tl.store(part_ptr + 2 * plane + stat_offs, tl.sum(tl.where(counted & clipped, m, 0.0), axis=1), mask=row_ok)
    tl.store(part_ptr + 3 * plane + stat_offs, tl.sum(tl.where(counted, v * m, 0.0), axis=1), mask=row_ok)


@triton.jit
def _finalize_kernel(
    part_ptr,  # [NSTAT, B, NB]
    max_ptr,  # [B, NB] (HAS_MAX)
    scale_ptr,  # [B] out: per-row aggregation scale s_b (w_bt = m_bt * s_b)
    out_ptr,  # [NSTAT - 1 + HAS_MAX] out: loss, masked means of partial rows 2.., max
    B,
    NB,
    horizon,
    NSTAT: tl.constexpr,
    NSTAT_P2: tl.constexpr,
    HAS_MAX: tl.constexpr,
    AGG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    # One program; every sum runs in a fixed order, so the result is deterministic.
    R = B * NB
    k = tl.arange(0, NSTAT_P2)
    r_lane = tl.arange(0, BLOCK_R)
    acc = tl.zeros((NSTAT_P2,), tl.float32)
    ratio_max = -float("inf")
    for start in range(0, R, BLOCK_R):
        r = start + r_lane
        ok = (k[:, None] < NSTAT) & (r[None, :] < R)
        acc += tl.sum(tl.load(part_ptr + k[:, None] * R + r[None, :], mask=ok, other=0.0), axis=1)
        if HAS_MAX:
            tile_max = tl.load(max_ptr + r, mask=r < R, other=-float("inf"))
            ratio_max = tl.maximum(ratio_max, tl.max(tile_max, axis=0))
    total_loss = tl.sum(tl.where(k == 0, acc, 0.0), axis=0)
    total_m = tl.sum(tl.where(k == 1, acc, 0.0), axis=0)
    token_denom = tl.maximum(total_m, 1.0)

    b_lane = tl.arange(0, BLOCK_B)
    nb_lane = tl.arange(0, BLOCK_NB)
    if AGG == 0:
        loss = total_loss / token_denom
        row_scale = 1.0 / token_denom
    else:
        # Sequences with at least one counted token, and (seq-mean-token-mean) the sum of their
        # per-sequence token means.
        n_seqs = 0.0
        seq_means = 0.0
        for start in range(0, B, BLOCK_B):
            rows = start + b_lane
            ok = (rows[:, None] < B) & (nb_lane[None, :] < NB)
            offs = rows[:, None] * NB + nb_lane[None, :]
            tokens = tl.sum(tl.load(part_ptr + R + offs, mask=ok, other=0.0), axis=1)
            n_seqs += tl.sum(tl.where(tokens > 0.0, 1.0, 0.0), axis=0)
            if AGG == 2:
                seq_loss = tl.sum(tl.load(part_ptr + offs, mask=ok, other=0.0), axis=1)
                seq_means += tl.sum(tl.where(tokens > 0.0, seq_loss / tl.maximum(tokens, 1.0), 0.0), axis=0)
        n_seqs = tl.maximum(n_seqs, 1.0)
        if AGG == 1:
            loss = total_loss / n_seqs
            row_scale = 1.0 / n_seqs
        elif AGG == 2:
            loss = seq_means / n_seqs
            row_scale = 1.0 / n_seqs  # times 1 / tokens_b below
        else:
            loss = total_loss / (n_seqs * horizon)
            row_scale = 1.0 / (n_seqs * horizon)

    for start in range(0, B, BLOCK_B):
        rows = start + b_lane
        if AGG == 2:
            ok = (rows[:, None] < B) & (nb_lane[None, :] < NB)
            offs = rows[:, None] * NB + nb_lane[None, :]
            tokens = tl.sum(tl.load(part_ptr + R + offs, mask=ok, other=0.0), axis=1)
            scale = row_scale / tl.maximum(tokens, 1.0)
        else:
            scale = tl.zeros((BLOCK_B,), tl.float32) + row_scale
        tl.store(scale_ptr + rows, scale, mask=rows < B)

    # out[0] = loss, out[k - 1] = acc[k] / max(sum m, 1) for k >= 2 (masked means, 0 when empty).
    values = tl.where(k == 0, loss, acc / token_denom)
    out_idx = tl.where(k == 0, 0, k - 1)
    tl.store(out_ptr + out_idx, values, mask=(k != 1) & (k < NSTAT))
    if HAS_MAX:
        tl.store(out_ptr + NSTAT - 1, tl.where(ratio_max == -float("inf"), 0.0, ratio_max))


@triton.jit
def _scale_grad_kernel(
    g_ptr,  # [B, T] fp32
    scale_ptr,  # [B] fp32
    grad_out_ptr,  # 0-d
    out_ptr,  # [B, T] input dtype
    B,
    T,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _tile_offsets(B, T, BLOCK_B, BLOCK_T)
    valid = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * T + cols[None, :]
    go = tl.load(grad_out_ptr).to(tl.float32)
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0) * go
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, (g * s[:, None]).to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers. Callers (rlhf_fast/ppo.py) validate arguments; inputs are [B, T] with any strides.


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    # bool tensors go to Triton as uint8 (same bytes, zero-copy view).
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _finalize(part, ratio_max_part, B, NB, agg, horizon, nstat, device):
    has_max = ratio_max_part is not None
    scale = torch.empty((B,), dtype=torch.float32, device=device)
    out = torch.empty((nstat - 1 + int(has_max),), dtype=torch.float32, device=device)
    block_nb = triton.next_power_of_2(max(NB, 1))
    block_b = max(1, min(1024 // block_nb, triton.next_power_of_2(max(B, 1))))
    _finalize_kernel[(1,)](
        part,
        ratio_max_part if has_max else part,
        scale,
        out,
        B,
        NB,
        float(horizon),
        NSTAT=nstat,
        NSTAT_P2=triton.next_power_of_2(nstat),
        HAS_MAX=has_max,
        AGG=AGG_CODES[agg],
        BLOCK_R=min(1024, triton.next_power_of_2(max(B * NB, 1))),
        BLOCK_B=block_b,
        BLOCK_NB=block_nb,
        num_warps=8,
    )
    return out, scale


def ppo_policy_forward(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    horizon: float,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [6] fp32 = loss then the POLICY_STATS, g [B, T] fp32 or (0,), scale [B] fp32).

    clip_low/clip_high are the ratio bounds 1 - eps_low, 1 + eps_high. The gradient of the loss
    w.r.t. logprobs is g * scale[:, None] (times grad_output).
    """
    B, T = logprobs.shape
    dev = logprobs.device
    block_b, block_t = _tile_config(B, T)
    NB = triton.cdiv(T, block_t) if T > 0 else 0
    part = torch.empty((POLICY_NSTAT, B, NB), dtype=torch.float32, device=dev)
    ratio_max = torch.empty((B, NB), dtype=torch.float32, device=dev)
    g = torch.empty((B, T) if write_grad else (0,), dtype=torch.float32, device=dev)
    if B > 0 and T > 0:
        m = _mask_for_kernel(mask)
        _ppo_policy_fwd_kernel[(triton.cdiv(B, block_b), NB)](
            logprobs,
            logprobs.stride(0),
            logprobs.stride(1),
            old_logprobs,
            old_logprobs.stride(0),
            old_logprobs.stride(1),
            advantages,
            advantages.stride(0),
            advantages.stride(1),
            m,
            m.stride(0),
            m.stride(1),
            g,
            part,
            ratio_max,
            B,
            T,
            NB,
            float(clip_low),
            float(clip_high),
            0.0 if dual_clip is None else float(dual_clip),
            HAS_DUAL=dual_clip is not None,
            WRITE_GRAD=write_grad,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=_WARPS,
        )
    out, scale = _finalize(part, ratio_max, B, NB, agg, horizon, POLICY_NSTAT, dev)
    return out, g, scale


def ppo_value_forward(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
    horizon: float,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [3] fp32 = loss then the VALUE_STATS, g [B, T] fp32 or (0,), scale [B] fp32).
    The gradient of the loss w.r.t. values is g * scale[:, None] (times grad_output)."""
    B, T = values.shape
    dev = values.device
    block_b, block_t = _tile_config(B, T)
    NB = triton.cdiv(T, block_t) if T > 0 else 0
    part = torch.empty((VALUE_NSTAT, B, NB), dtype=torch.float32, device=dev)
    g = torch.empty((B, T) if write_grad else (0,), dtype=torch.float32, device=dev)
    if B > 0 and T > 0:
        m = _mask_for_kernel(mask)
        _ppo_value_fwd_kernel[(triton.cdiv(B, block_b), NB)](
            values,
            values.stride(0),
            values.stride(1),
            old_values,
            old_values.stride(0),
            old_values.stride(1),
            returns,
            returns.stride(0),
            returns.stride(1),
            m,
            m.stride(0),
            m.stride(1),
            g,
            part,
            B,
            T,
            NB,
            float(clip_eps),
            WRITE_GRAD=write_grad,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=_WARPS,
        )
    out, scale = _finalize(part, None, B, NB, agg, horizon, VALUE_NSTAT, dev)
    return out, g, scale


def scale_grad(g: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad [B, T] in `dtype` = g * scale[:, None] * grad_out (grad_out 0-d, read on device)."""
    B, T = g.shape
    out = torch.empty((B, T), dtype=dtype, device=g.device)
    if B == 0 or T == 0:
        return out
    block_b, block_t = _tile_config(B, T)
    _scale_grad_kernel[(triton.cdiv(B, block_b), triton.cdiv(T, block_t))](
        g,
        scale,
        grad_out.reshape(()).to(torch.float32).contiguous(),
        out,
        B,
        T,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        num_warps=_WARPS,
    )
    return out
