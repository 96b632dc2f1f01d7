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

The online max / sum-exp / entropy loop and the safe lse / entropy finalisation are the shared
helpers of `_rows` (also used by the fused PPO kernel); so is the launch config `row_config`:
block size and warp count depend only on V and the dtype, never on the number of rows, so a row's
result is bitwise the same whatever batch it is computed in. Offsets are int64.

Layout: launchers take [B, T, V] tensors with last stride 1 and ANY stride_b / stride_t, so the
shifted slice `logits[:, :-1]` of a [B, T+1, V] tensor (whose leading dims do not flatten to one
row stride) is read in place; row n of the launch grid is token (n // T, n % T). `as_rows3d`
makes that [B, T, V] view of any [..., V] tensor, copying only layouts that still cannot be
expressed (last stride != 1, or > 2 leading dims that do not flatten to two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import on_input_device

from ._rows import row_config, row_lse_entropy, row_offset, row_online_stats


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    logits_stride_b,
    logits_stride_t,
    labels_ptr,
    weight_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    T,
    V,
    inv_temperature,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, T, logits_stride_b, logits_stride_t)

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

    # One pass: running max m, s = sum exp(x - m), t = sum exp(x - m) (x - m) (entropy only).
    m, s, t = row_online_stats(row_ptr, n_cols, inv_temperature, WITH_ENTROPY, BLOCK_V)
    # lse = -inf and entropy 0 where nothing was read (ignored) or the row is all -inf.
    lse, ent = row_lse_entropy(m, s, t)

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
        # (A row of only -inf has no distribution: entropy 0, as the reference's p > 0 guard gives.)
        if HAS_LABELS:
            ent = tl.where(ignored, 0.0, ent)
        tl.store(entropy_ptr + row, ent)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    logits_stride_b,
    logits_stride_t,
    grad_ptr,
    grad_stride_b,
    grad_stride_t,
    labels_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    lse_ptr,
    entropy_ptr,
    T,
    V,
    inv_temperature,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, T, logits_stride_b, logits_stride_t)
    out_ptr = grad_ptr + row_offset(row, T, grad_stride_b, grad_stride_t)
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


def as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> a [B, T, V] tensor with last stride 1 (any stride_b / stride_t) over the same
    elements, in the same row order.

    A view (no copy) for: 3-D tensors with last stride 1 (contiguous, `x[..., :V]` of a wider
    tensor, the shifted slice `x[:, :-1]`, transposed leading dims), 1-D / 2-D tensors, and more
    leading dims that flatten to one or two strides. A contiguous copy only for the rest (last
    stride != 1, or > 2 leading dims that do not flatten to two).
    """
    V = logits.shape[-1]
    if logits.numel() == 0:
        return logits.reshape(1, -1, V)
    if logits.stride(-1) == 1 or V == 1:  # (V == 1: only column 0 is read, its stride is moot)
        if logits.dim() == 3:
            return logits
        if logits.dim() <= 2:
            return logits.view(1, -1, V)
        for shape in ((1, -1, V), (-1, logits.shape[-2], V)):
            try:
                return logits.view(shape)
            except RuntimeError:
                pass
    return logits.reshape(-1, V).contiguous().unsqueeze(0)


def _check_rows3d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3 or (x.stride(2) != 1 and x.shape[2] > 1):
        raise ValueError(f"{name} must be [B, T, V] with last stride 1 (launcher), got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")


@on_input_device
def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel.

    logits [B, T, V] (last stride 1, any stride_b / stride_t: see `as_rows3d`); N = B * T rows in
    row-major (b, t) order. labels [N] int32/int64 or None (entropy only), weight [N] fp32 or None
    (multiplies the log-prob; a 0-weight token is not read and gives exactly 0; needs labels,
    excludes with_entropy). Returns (logp [N] fp32 or None, entropy [N] fp32 or None, lse [N]
    fp32, in units of logits / temperature; 0 for ignored rows).
    """
    _check_rows3d("logits", logits)
    B, T, V = logits.shape
    N = B * T
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
    block, warps = row_config(V, logits.dtype)
    _logprobs_fwd_kernel[(N,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        labels if labels is not None else lse,
        weight if weight is not None else lse,
        logp if logp is not None else lse,
        ent if ent is not None else lse,
        lse,
        T,
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


@on_input_device
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
    """Launch the backward kernel: grad_logits [B, T, V] in logits.dtype.

    logits [B, T, V] (last stride 1, any stride_b / stride_t), labels [N] or None, grad_logp [N]
    (needs labels) or None, grad_entropy [N] (needs ent) or None, lse/ent [N] fp32 from the
    forward (N = B * T, row-major (b, t) order). `out` ([B, T, V], last stride 1, any stride_b /
    stride_t; may be `logits` itself for an in-place backward: each element is read before it is
    overwritten, by the same program) receives the gradient; default a new contiguous tensor.
    """
    _check_rows3d("logits", logits)
    B, T, V = logits.shape
    N = B * T
    if out is None:
        out = torch.empty((B, T, V), device=logits.device, dtype=logits.dtype)
    elif out.shape != logits.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != logits shape {tuple(logits.shape)} (launcher)")
    _check_rows3d("out", out)
    if N == 0:
        return out
    has_labels = labels is not None and grad_logp is not None
    has_grad_ent = grad_entropy is not None
    block, warps = row_config(V, logits.dtype)
    _logprobs_bwd_kernel[(N,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        out,
        out.stride(0),
        out.stride(1),
        labels.contiguous() if has_labels else lse,
        grad_logp.contiguous() if has_labels else lse,
        grad_entropy.contiguous() if has_grad_ent else lse,
        lse,
        ent if has_grad_ent else lse,
        T,
        V,
        1.0 / temperature,
        ignore_index,
        HAS_LABELS=has_labels,
        HAS_GRAD_ENTROPY=has_grad_ent,
        BLOCK_V=block,
        num_warps=warps,
    )
    return out
