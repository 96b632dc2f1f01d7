"""Row-wise softmax statistics shared by the vocabulary-row kernels (log-probs, PPO from logits).

`@triton.jit` helpers (inlined into the caller; x = logits / temperature in fp32):
    row_online_stats(row_ptr, n_cols, inv_temperature, WITH_ENTROPY, BLOCK_V, EVICTION)
        -> (m, s, t): one pass over row_ptr[0:n_cols] in BLOCK_V chunks with an online
        running max m, s = sum_j exp(x_j - m) and (WITH_ENTROPY) t = sum_j exp(x_j - m) (x_j - m),
        rescaled whenever the running max moves; kept per thread (over its 16-byte vectors) and
        merged across the block once, after the loop. -inf entries contribute exactly 0 (never NaN);
        n_cols = 0 (a row the caller skips) gives (-inf, 0, 0). EVICTION is the load's
        eviction_policy ("" default; "evict_last" when the caller reads the row again).
    row_lse_entropy(m, s, t) -> (lse, entropy): lse = m + log s and H = log s - t / s, safe where
        s == 0 (nothing read, or a row of only -inf): lse = m (= -inf) and H = 0 -- the
        reference's entropy (p > 0 guard) of such a row -- with no log(0) or 0/0 on the way.

Launcher-side:
    row_config(V, dtype) -> (BLOCK_V, num_warps), from V and the dtype only (never the number of
        rows), so a row's result is bitwise the same whatever batch it is in.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_BLOCK_V", "WARPS_BY_BLOCK", "row_config", "row_lse_entropy", "row_online_stats"]

# ---- launch-config table (the single place to tune) --------------------------------------------
# Widest chunk of a row per loop iteration, by logits dtype. ANCHORS.md measured a plain one-program-
# per-row Triton log-prob forward on an H100 with bf16 logits, 2048-wide blocks and 8 warps, at
# 90-96 % of copy bandwidth (8 elements per thread per load): that configuration is the default
# for every dtype until this project's own H100 run tunes it (compiled for sm_90 with Triton 3.9
# ptxas: no spills). A GPU session tunes these two tables (and nothing else).
MAX_BLOCK_V = {torch.float32: 2048, torch.bfloat16: 2048, torch.float16: 2048}
# (smallest BLOCK_V, num_warps), first match wins.
WARPS_BY_BLOCK = ((2048, 8), (512, 4), (0, 2))
_MIN_BLOCK_V = 16


@functools.cache  # on every launch; a pure function of (V, dtype)
def row_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V elements of `dtype` (depends on V and dtype only)."""
    block = min(triton.next_power_of_2(max(int(V), _MIN_BLOCK_V)), MAX_BLOCK_V.get(dtype, 2048))
    for min_block, warps in WARPS_BY_BLOCK:
        if block >= min_block:
            return block, warps
    return block, WARPS_BY_BLOCK[-1][1]


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of flat row `row` (token (row // T, row % T)) of a [B, T, V] view with
    strides (stride_b, stride_t); int64 when `row` is (callers cast program_id to int64)."""
    b = row // T
    return b * stride_b + (row - b * T) * stride_t


# A constexpr default must itself be a tl.constexpr: Triton 3.6 does not wrap a plain default of an
# omitted helper argument ("'str' object has no attribute 'type'" at compile time).
_DEFAULT_EVICTION = tl.constexpr("")


_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def row_online_stats(
    row_ptr,
    n_cols,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVICTION: tl.constexpr = _DEFAULT_EVICTION,
):
    """(m, s, t) of row_ptr[0:n_cols] / temperature; see the module docstring.

    Each chunk is loaded as a [BLOCK_V // VEC, VEC] tile whose rows are one thread's 16-byte
    vector, and every thread keeps its own online (m, s, t) over its vectors (log2 domain: one
    FFMA and one ex2 per element); the threads' states are merged once, after the loop. Merging
    across the block on every chunk instead (a max and a sum over all BLOCK_V lanes) cost four
    barriers and 16-24 shuffles per chunk, ~18-25 SASS instructions per element on sm_90: about
    the whole issue budget of a bf16 row at HBM speed. This form is ~8-11.
    """
    VEC: tl.constexpr = 128 // row_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    R: tl.constexpr = BLOCK_V // VEC
    tile = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    c = inv_temperature * _LOG2E  # > 0 (validated), so max(x) c == max(x c)
    m = tl.full([R], -float("inf"), tl.float32)
    s = tl.zeros([R], tl.float32)
    t = tl.zeros([R], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tile
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=-float("inf"), eviction_policy=EVICTION)
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1) * c)
        # A running max of -inf (everything so far masked) would give (-inf) - (-inf) = NaN:
        # shift by 0 instead; the sums are 0 in that case so nothing else changes.
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = x * c - m_shift[:, None]
        e = tl.exp2(d)
        alpha = tl.exp2(m - m_shift)
        if WITH_ENTROPY:
            # Re-centre the old sum of e d on the new max: alpha (t + s (m - m_new)); 0 while
            # s == 0 (m = -inf). Where e == 0 (x = -inf) the term is 0 * (-256), not 0 * -inf.
            shift = tl.where(s > 0.0, m - m_shift, 0.0)
            t = alpha * (t + s * shift) + tl.sum(e * tl.maximum(d, -256.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    # Merge the threads' states (fixed order: deterministic); a NaN s (a NaN logit) stays NaN.
    m_row = tl.max(m, axis=0)
    m_row_shift = tl.where(m_row == -float("inf"), 0.0, m_row)
    w = tl.exp2(m - m_row_shift)
    s_row = tl.sum(s * w, axis=0)
    if WITH_ENTROPY:
        t_row = tl.sum(w * (t + s * tl.where(s > 0.0, m - m_row_shift, 0.0)), axis=0) * _LN2
    else:
        t_row = 0.0
    return m_row * _LN2, s_row, t_row


@triton.jit
def row_lse_entropy(m, s, t):
    """(lse, entropy) from row_online_stats' (m, s, t); lse = -inf and entropy 0 where s == 0,
    NaN where s is NaN (a NaN logit: tl.max skips NaN, the sum does not)."""
    # log(1) where s == 0 keeps log(0) and 0/0 out of the arithmetic. "s == 0", not "s > 0": a NaN
    # s must reach lse and the entropy, as in the reference, not be read as an empty row.
    s_safe = tl.where(s == 0.0, 1.0, s)
    log_s = tl.log(s_safe)
    lse = m + log_s
    ent = tl.where(s == 0.0, 0.0, log_s - t / s_safe)
    return lse, ent
