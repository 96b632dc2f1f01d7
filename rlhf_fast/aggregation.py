"""Loss aggregation over [B, T] per-token losses (verl's loss_agg_mode names).

Every mode is linear in the per-token loss, so each is a weighted sum sum(w * L) with weights
w [B, T] that depend on the mask alone. The fused PPO kernels use those weights to write the
per-token gradient during the forward pass.
"""

from __future__ import annotations

import torch

from rlhf_fast._backend import as_float_mask, check_same_device, check_tensor, register_op, resolve
from rlhf_fast.reference import AGG_MODES, check_agg, mask_divisor

__all__ = ["AGG_MODES", "aggregate", "aggregation_weights", "check_agg"]

register_op("aggregate")


def aggregation_weights(mask: torch.Tensor, agg: str = "token-mean", *, horizon=None) -> torch.Tensor:
    """Weights w [B, T] fp32 with aggregate(L, mask, agg) == (w * L).sum() for every L.

    mask: [B, T] bool or float (1 = token counts). An empty mask gives all-zero weights
    (so the loss is 0 with 0 gradient, never NaN). No host sync.
    """
    horizon = check_agg(agg, horizon)
    check_tensor("mask", mask, ndim=2)
    m = mask.detach().to(torch.float32)  # a mask weighs tokens; it is not differentiated
    if agg == "token-mean":
        return m / mask_divisor(m.sum())
    per_seq = m.sum(dim=-1, keepdim=True)  # [B, 1] counted tokens per sequence
    n_seqs = (per_seq > 0).sum().to(torch.float32).clamp_min(1.0)  # sequences with a counted token
    if agg == "seq-mean-token-sum":
        return m / n_seqs
    if agg == "seq-mean-token-mean":
        return m / (mask_divisor(per_seq) * n_seqs)
    divisor = float(mask.shape[-1] if horizon is None else horizon)
    return m / (n_seqs * divisor)


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *, horizon=None, backend: str | None = None
) -> torch.Tensor:
    """Aggregate per-token losses into a scalar fp32 loss.

    Args:
        loss_mat: [B, T] per-token loss (any float dtype; math in fp32).
        mask: [B, T] bool or float, 1 = token counts.
        agg: "token-mean" (sum(L*m)/sum(m)), "seq-mean-token-sum" (mean over non-empty sequences
            of sum_t L*m), "seq-mean-token-mean" (mean over non-empty sequences of the masked
            token mean), "seq-mean-token-sum-norm" (seq-mean-token-sum / horizon).
        horizon: divisor for "seq-mean-token-sum-norm"; default T (mask.shape[-1]).
        backend: only "reference" exists (a weighted sum; the fused losses fold these weights
            into their own kernels).
    Returns: 0-d fp32 tensor; an empty mask gives 0 (and 0 gradient).
    Differentiable w.r.t. loss_mat.

    Against verl's `agg_loss` (checked numerically): equal for every mode in current verl, except
    that an empty mask gives NaN there. verl releases before its global-batch rework divided
    seq-mean-token-sum-norm by horizon only (no mean over sequences: n_seqs times this value).
    verl also normalises by global batch sizes across data-parallel ranks and micro-batches;
    this function normalises within the call.
    """
    check_tensor("loss_mat", loss_mat, ndim=2)
    as_float_mask("mask", mask, loss_mat)
    check_same_device(loss_mat=loss_mat, mask=mask)
    resolve("aggregate", backend, loss_mat.device)
    w = aggregation_weights(mask, agg, horizon=horizon)
    # where(): a NaN/inf loss at an uncounted token must not leak through 0 * NaN.
    return torch.where(w != 0, loss_mat.to(torch.float32) * w, 0.0).sum()
