"""Token log-probs and entropy from logits: Triton forward and backward kernels + launchers.

Math, per row (x = z / T, fp32):
    lse     = logsumexp(x)
    logp    = x[y] - lse
    H       = -sum_j p_j log p_j = log(s) - sum_j e_j (x_j - m) / s,
              with m = max(x), e_j = exp(x_j - m), s = sum_j e_j
    dlogp/dz_j = (1[j == y] - p_j) / T
    dH/dz_j    = -(1/T) p_j (log p_j + H)

Forward: one program per row, ONE pass over the row in BLOCK_V chunks with an online max,
sum-exp and (for entropy) sum e*(x - m), all rescaled when the running max moves.
Backward: one program per row, 1 read of the row + 1 write of its gradient, using the fp32
per-row lse (and H) saved by the forward.
Tokens that do not count (ignore_index; weight 0 in the forward; zero upstream gradient in the
backward) skip the read of their row: padding costs only the gradient write of zeros.

The block size and warp count depend only on V and the dtype, never on the number of rows, so a
row's result is bitwise the same whatever batch it is computed in. Offsets are int64.
Launchers take 2-D row-major-in-the-last-dim views [N, V] (last stride 1, any row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    weight_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    inv_temperature,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_V)

    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        skip = ignored
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + row).to(tl.float32)
            skip = skip | (w == 0.0)
        # Tokens that do not count (ignored, or weight 0: padding) are not read at all: the loop
        # runs over zero columns.
        n_cols = tl.where(skip, 0, V)
    else:
        n_cols = V

    # Running max m, sum of e = exp(x - m), and (entropy) sum of e * (x - m), all fp32 scalars.
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        valid = offs < n_cols
        x = tl.load(row_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A running max of -inf (everything so far masked) would give (-inf) - (-inf) = NaN:
        # shift by 0 instead; the sums are 0 in that case so nothing else changes.
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = x - m_shift
        e = tl.exp(d)
        alpha = tl.exp(m - m_shift)
        if WITH_ENTROPY:
            # Re-centre the old sum of e*(x - m) on the new max: e*alpha*(x - m_new) summed is
            # alpha * (t + s * (m - m_new)). When s == 0 (m = -inf) the correction is 0.
            shift = tl.where(s > 0.0, m - m_shift, 0.0)
            # Where e == 0 (x = -inf) the term is 0, not 0 * -inf = NaN.
            t = alpha * (t + s * shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    # s == 0 only for a row with nothing to read (ignored) or only -inf (then m = -inf and lse
    # stays -inf); log(1) there keeps 0/0 and log(0) out of the arithmetic.
    s_safe = tl.where(s > 0.0, s, 1.0)
    log_s = tl.log(s_safe)
    lse = m + log_s

    if HAS_LABELS:
        # Clamped gather: a bad label never reads out of bounds.
        safe_label = tl.where(in_range, label, 0)
        x_label = tl.load(row_ptr + safe_label).to(tl.float32) * inv_temperature
        logp = x_label - lse
        logp = tl.where(in_range, logp, float("nan"))
        logp = tl.where(ignored, 0.0, logp)
        if HAS_WEIGHT:
            # A token with weight 0 contributes exactly 0 (even with a bad label).
            logp = tl.where(w != 0.0, logp, 0.0) * w
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, tl.where(skip, 0.0, lse))
    else:
        tl.store(lse_ptr + row, lse)

    if WITH_ENTROPY:
        # A row of only -inf has no distribution: entropy 0 (as the reference's p > 0 guard gives).
        ent = tl.where(s > 0.0, log_s - t / s_safe, 0.0)
        if HAS_LABELS:
            ent = tl.where(ignored, 0.0, ent)
        tl.store(entropy_ptr + row, ent)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    inv_temperature,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    out_ptr = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    # A row of only -inf: every p is taken as 0 instead of exp(-inf - (-inf)) = NaN.
    lse = tl.where(lse == -float("inf"), 0.0, lse)

    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
        g_logp = tl.where(ignored, 0.0, g_logp)
        # A bad label gave a NaN log-prob; its gradient is NaN too wherever it is used.
        poison = (~in_range) & (~ignored) & (g_logp != 0.0)
    else:
        label = -1
        g_logp = 0.0
        ignored = False
        poison = False
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
        g_ent = tl.where(ignored, 0.0, g_ent)
        ent = tl.load(entropy_ptr + row)
    else:
        g_ent = 0.0
        ent = 0.0
    # Rows whose gradient is 0 (ignored, masked-out, or grad_output 0) are not read: every p is
    # then 0 and the row is written as zeros.
    if HAS_LABELS and HAS_GRAD_ENTROPY:
        needed = (g_logp != 0.0) | (g_ent != 0.0)
    elif HAS_LABELS:
        needed = g_logp != 0.0
    else:
        needed = g_ent != 0.0
    n_read = tl.where(needed, V, 0)

    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=offs < n_read, other=-float("inf")).to(tl.float32) * inv_temperature
        log_p = x - lse
        p = tl.exp(log_p)
        grad = -g_logp * p
        if HAS_LABELS:
            grad += tl.where(offs == label, g_logp, 0.0)
        if HAS_GRAD_ENTROPY:
            grad -= g_ent * (p * tl.where(p > 0.0, log_p + ent, 0.0))
        grad = grad * inv_temperature
        grad = tl.where(poison, float("nan"), grad)
        tl.store(out_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _block_config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps) from V and dtype only (never N: batch invariance).

    H100: 2048-wide chunks with 8 warps stream a row at ~90-96% of copy bandwidth (ANCHORS.md);
    that is 8 elements (16 B for bf16) per thread per load. Short rows take one chunk.
    """
    block = min(triton.next_power_of_2(max(V, 1)), 4096 if dtype != torch.float32 else 2048)
    if block >= 2048:
        warps = 8
    elif block >= 512:
        warps = 4
    else:
        warps = 2
    return block, warps


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with last stride 1, without a copy where the leading dims flatten to one
    constant row stride (contiguous tensors, slices logits[..., :V] of wider ones); else a copy."""
    V = logits.shape[-1]
    if logits.stride(-1) == 1 or logits.numel() == 0:
        try:
            rows = logits.view(-1, V)
        except RuntimeError:
            rows = None
        if rows is not None and (rows.stride(1) == 1 or V <= 1):
            return rows
    return logits.reshape(-1, V).contiguous()


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel.

    logits [N, V] (last stride 1), labels [N] int32/int64 or None (entropy only), weight [N] fp32
    or None (multiplies the log-prob; a 0-weight token is not read and gives exactly 0; needs
    labels, excludes with_entropy). Returns (logp [N] fp32 or None,
    entropy [N] fp32 or None, lse [N] fp32, in units of logits / T; 0 for ignored rows).
    """
    N, V = logits.shape
    if logits.stride(1) != 1 and V > 1:
        raise ValueError("logits must have a contiguous last dim (launcher)")
    device = logits.device
    lse = torch.empty(N, device=device, dtype=torch.float32)
    logp = torch.empty(N, device=device, dtype=torch.float32) if labels is not None else None
    ent = torch.empty(N, device=device, dtype=torch.float32) if with_entropy else None
    if N == 0:
        return logp, ent, lse
    if weight is not None and (labels is None or with_entropy):
        raise ValueError("weight needs labels and excludes with_entropy (launcher)")
    if labels is not None:
        labels = labels.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    block, warps = _block_config(V, logits.dtype)
    _logprobs_fwd_kernel[(N,)](
        logits,
        logits.stride(0),
        labels if labels is not None else lse,
        weight if weight is not None else lse,
        logp if logp is not None else lse,
        ent if ent is not None else lse,
        lse,
        V,
        1.0 / temperature,
        ignore_index,
        HAS_LABELS=labels is not None,
        HAS_WEIGHT=weight is not None,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=warps,
    )
    return logp, ent, lse


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: grad_logits [N, V] in logits.dtype.

    logits [N, V] (last stride 1), labels [N] or None, grad_logp [N] (needs labels) or None,
    grad_entropy [N] (needs ent) or None, lse/ent [N] fp32 from the forward. `out` ([N, V], last
    stride 1, may be `logits` itself for an in-place backward) receives the gradient; default a
    new contiguous tensor.
    """
    N, V = logits.shape
    if out is None:
        out = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    if N == 0:
        return out
    has_labels = labels is not None and grad_logp is not None
    has_grad_ent = grad_entropy is not None
    block, warps = _block_config(V, logits.dtype)
    _logprobs_bwd_kernel[(N,)](
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        labels.contiguous() if has_labels else lse,
        grad_logp.contiguous() if has_labels else lse,
        grad_entropy.contiguous() if has_grad_ent else lse,
        lse,
        ent if has_grad_ent else lse,
        V,
        1.0 / temperature,
        ignore_index,
        HAS_LABELS=has_labels,
        HAS_GRAD_ENTROPY=has_grad_ent,
        BLOCK_V=block,
        num_warps=warps,
    )
    return out
