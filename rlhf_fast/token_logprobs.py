"""Per-token log-probs, entropy and per-sequence log-prob sums straight from logits.

Replaces ``torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])`` (and the entropy
computed from the same softmax) with one fused Triton pass per row in the forward and one
read + one write of the logits in the backward; no [N, V] fp32 intermediate is ever built.

Layers: Triton kernels and launchers in ``rlhf_fast.kernels.logprobs``; here the custom ops
(``rlhf_fast::logprobs_fwd``, ``entropy_fwd``, ``sequence_logprobs_fwd``, ``logprobs_bwd`` and the
in-place ``logprobs_bwd_``) with fake impls and autograd, and the documented public functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf_fast._backend import (
    FLOAT_DTYPES,
    as_float_mask,
    check_float,
    check_int,
    check_same_device,
    check_same_shape,
    check_tensor,
    checks_enabled,
    overlaps_itself,
    register_op,
    resolve,
    saveable,
    traced_backward,
)
from rlhf_fast.reference import mask_divisor

__all__ = ["entropy", "logprobs", "sequence_logprobs"]

LABEL_DTYPES = (torch.int64, torch.int32)

register_op("logprobs", triton=True)
register_op("entropy", triton=True)
register_op("sequence_logprobs", triton=True)


def _kernels():
    # Imported lazily so that importing rlhf_fast never imports triton.
    from rlhf_fast.kernels import logprobs as kernels

    return kernels


def _rows_share_storage(rows: Tensor, logits: Tensor) -> bool:
    return rows.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------
# Backward ops (shared by all three forward ops)


def _launch_bwd(rows, out, grad_logp, grad_entropy, labels, lse, entropy, temperature, ignore_index):
    """The backward kernel of both ops below on logits rows [B, T, V], flattening the per-token
    tensors; out: where the gradient goes (None: a new buffer)."""

    def flat(t):
        return None if t is None else t.reshape(-1)

    return _kernels().logprobs_backward(
        rows,
        flat(labels),
        flat(grad_logp),
        flat(grad_entropy),
        lse.reshape(-1),
        flat(entropy),
        temperature,
        ignore_index,
        out=out,
    )


@torch.library.custom_op("rlhf_fast::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    labels: Optional[Tensor],
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """grad_logits [..., V] (logits.dtype) from grad_logp / grad_entropy [...] and the saved
    fp32 lse / entropy [...]. A None grad means that output gets no gradient."""
    rows = _kernels().as_rows3d(logits)
    grad = _launch_bwd(rows, None, grad_logp, grad_entropy, labels, lse, entropy, temperature, ignore_index)
    return grad.view(logits.shape)


@_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("rlhf_fast::logprobs_bwd_", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    labels: Optional[Tensor],
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
) -> None:
    """Like logprobs_bwd but writes the gradient over `logits` (no second [N, V] buffer).

    Eager only: under torch.compile `_grad_logits` calls the functional logprobs_bwd instead.
    Functionalization turns this mutation of a saved intermediate into "clone, then mutate the
    clone", which cost a self-copy of the logits, and on GPUs inductor may pad the saved buffer's
    row stride and then pass this op a dense view of it (wrong gradients; see `_grad_logits`).
    """
    rows = _kernels().as_rows3d(logits)
    in_place = _rows_share_storage(rows, logits)
    out = rows if in_place else None
    grad = _launch_bwd(rows, out, grad_logp, grad_entropy, labels, lse, entropy, temperature, ignore_index)
    if not in_place:
        # A layout [B, T, V] strides cannot express (rare: see as_rows3d): the kernel worked on a
        # copy; write it back.
        logits.copy_(grad.view(logits.shape))


@_logprobs_bwd_inplace.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return None


def _grad_logits(ctx, grad_logp, grad_entropy, logits, labels, lse, ent):
    # Under torch.compile the in-place op is not used: inductor (2.11 and 2.13) may pad the saved
    # logits' row stride (comprehensive padding, on GPU by default: 1271 -> 1280) and then hands
    # the functionalized mutation a dense (V, 1) view of that padded buffer, so the kernel reads
    # and writes the wrong elements (wrong gradients on an H100, 2026-11-23; reproduced on CPU by
    # forcing the padding). The functional op costs a second [N, V] buffer there, which is what
    # the compiled in-place path cost in time anyway (a self-copy of the logits).
    if ctx.inplace_backward and not traced_backward(logits):
        torch.ops.rlhf_fast.logprobs_bwd_(
            grad_logp, grad_entropy, logits, labels, lse, ent, ctx.temperature, ctx.ignore_index
        )
        return logits
    return torch.ops.rlhf_fast.logprobs_bwd(
        grad_logp, grad_entropy, logits, labels, lse, ent, ctx.temperature, ctx.ignore_index
    )


# ----------------------------------------------------------------------------------------------
# logprobs_fwd: per-token log-prob (+ entropy)


@torch.library.custom_op("rlhf_fast::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp [...], entropy [...] or [0] when not requested, lse [...]), all fp32."""
    kernels = _kernels()
    logp, ent, lse = kernels.logprobs_forward(
        kernels.as_rows3d(logits), labels.reshape(-1), None, temperature, ignore_index, with_entropy
    )
    lead = logits.shape[:-1]
    ent = ent.view(lead) if ent is not None else logits.new_empty((0,), dtype=torch.float32)
    return logp.view(lead), ent, lse.view(lead)


@_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward):
    lead = logits.shape[:-1]
    logp = logits.new_empty(lead, dtype=torch.float32)
    ent = logits.new_empty(lead if with_entropy else (0,), dtype=torch.float32)
    return logp, ent, logits.new_empty(lead, dtype=torch.float32)


def _logprobs_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward = inputs
    _, ent, lse = output
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.with_entropy = with_entropy
    ctx.inplace_backward = inplace_backward
    ctx.save_for_backward(logits, *saveable(labels), lse, ent if with_entropy else None)


def _logprobs_backward(ctx, grad_logp, grad_entropy, grad_lse):
    logits, labels, lse, ent = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    grad_ent = grad_entropy if ctx.with_entropy else None
    grad = _grad_logits(ctx, grad_logp, grad_ent, logits, labels, lse, ent)
    return grad, None, None, None, None, None


_logprobs_fwd.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


# ----------------------------------------------------------------------------------------------
# entropy_fwd


@torch.library.custom_op("rlhf_fast::entropy_fwd", mutates_args=())
def _entropy_fwd(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(entropy [...], lse [...]), fp32."""
    kernels = _kernels()
    _, ent, lse = kernels.logprobs_forward(kernels.as_rows3d(logits), None, None, temperature, 0, True)
    lead = logits.shape[:-1]
    return ent.view(lead), lse.view(lead)


@_entropy_fwd.register_fake
def _(logits, temperature):
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=torch.float32), logits.new_empty(lead, dtype=torch.float32)


def _entropy_setup_context(ctx, inputs, output):
    logits, temperature = inputs
    ent, lse = output
    ctx.temperature = temperature
    ctx.ignore_index = 0
    ctx.inplace_backward = False
    ctx.save_for_backward(logits, lse, ent)


def _entropy_backward(ctx, grad_entropy, grad_lse):
    logits, lse, ent = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return _grad_logits(ctx, None, grad_entropy, logits, None, lse, ent), None


_entropy_fwd.register_autograd(_entropy_backward, setup_context=_entropy_setup_context)


# ----------------------------------------------------------------------------------------------
# sequence_logprobs_fwd: weighted per-token log-probs [B, T] (the caller sums over T)


@torch.library.custom_op("rlhf_fast::sequence_logprobs_fwd", mutates_args=())
def _sequence_logprobs_fwd(
    logits: Tensor, labels: Tensor, weight: Tensor, temperature: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """(weight * logp [B, T] with exact 0 where weight == 0, lse [B, T]), fp32."""
    kernels = _kernels()
    logp, _, lse = kernels.logprobs_forward(
        kernels.as_rows3d(logits),
        labels.reshape(-1),
        weight.reshape(-1).to(torch.float32),
        temperature,
        ignore_index,
        False,
    )
    lead = logits.shape[:-1]
    return logp.view(lead), lse.view(lead)


@_sequence_logprobs_fwd.register_fake
def _(logits, labels, weight, temperature, ignore_index):
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=torch.float32), logits.new_empty(lead, dtype=torch.float32)


def _sequence_setup_context(ctx, inputs, output):
    logits, labels, weight, temperature, ignore_index = inputs
    _, lse = output
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = False
    ctx.save_for_backward(logits, *saveable(labels, weight), lse)


def _sequence_backward(ctx, grad_token, grad_lse):
    logits, labels, weight, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    # [B, T] fp32, tiny; the [B, T, V] gradient is then one kernel pass.
    grad_logp = grad_token * weight
    return _grad_logits(ctx, grad_logp, None, logits, labels, lse, None), None, None, None, None


_sequence_logprobs_fwd.register_autograd(_sequence_backward, setup_context=_sequence_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_logits(logits: Tensor) -> None:
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}")


def _check_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> int:
    """Validate labels against logits; returns ignore_index (a numpy integer as a Python int)."""
    check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape without its last dim "
            f"{tuple(logits.shape[:-1])}"
        )
    check_same_device(logits=logits, labels=labels)
    ignore_index = check_int("ignore_index", ignore_index)
    if checks_enabled():
        # RLHF_FAST_CHECK=1 only: a host sync to turn silent NaNs into an error.
        V = logits.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            values = torch.unique(labels[bad])[:8].tolist()
            raise ValueError(
                f"labels has {int(bad.sum())} value(s) outside [0, {V}) that are not "
                f"ignore_index={ignore_index}, e.g. {values}"
            )
    return ignore_index


# ----------------------------------------------------------------------------------------------
# Public API


def logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and optionally its entropy.

    Args:
        logits: [..., V] fp32, bf16 or fp16, last dim contiguous. Read in place (no copy) when
            the leading dims flatten to at most two strides: contiguous tensors, a slice
            ``x[..., :V]`` of a wider tensor, the shifted slice ``x[:, :-1]`` of [B, T + 1, V]
            logits, transposed [B, T] dims. Other layouts (last stride != 1, or more leading dims
            that do not flatten to two) are copied once.
        labels: [...] int64 (or int32), the token ids, already aligned with ``logits`` (no shift).
        temperature: divides the logits before the softmax (default 1.0; positive float).
        ignore_index: label value for tokens that do not count (default -100): their log-prob
            and entropy are 0 and they get 0 gradient.
        return_entropy: also return the entropy H = -sum_j p_j log p_j of softmax(logits / T)
            (default False); both outputs are differentiable.
        inplace_backward: write the gradient into ``logits``' own storage instead of a new
            [..., V] tensor (default False). ``logits`` is clobbered by the backward, so nothing
            else may need its values afterwards (e.g. a softcap/tanh that saved its output).
            Under torch.compile it has no effect: the gradient gets its own buffer (inductor
            mis-addresses in-place writes to a padded saved tensor; see ``_grad_logits``), nor
            on logits whose elements share memory (an expanded tensor): a new buffer then.
        backend: None/"auto", "triton" or "reference" (see ``rlhf_fast._backend``).

    Returns:
        logp [...] fp32, or (logp, entropy) [...] fp32 each. Gradients come back in logits.dtype.

    A label outside [0, V) that is not ``ignore_index`` is never read out of bounds: its log-prob
    is NaN (its gradient row is NaN on the kernel path, 0 on the reference); with
    ``RLHF_FAST_CHECK=1`` a ValueError is raised instead (costs a host sync). -inf logits (masked
    vocabulary) are fine; a label whose logit is -inf gets log-prob -inf.

    Kernel path: forward reads the logits once; backward reads them once and writes the
    gradient once (1 + 2 passes over [N, V] in all); ignore_index rows (and, in the backward,
    rows whose upstream gradient is 0) are not read. Only logits, labels and the fp32 per-row
    logsumexp (and entropy) are saved. A row's result is bitwise the same whatever batch it is
    in (the block size depends on V and the dtype only). Works under torch.compile(fullgraph=True)
    (custom ops ``rlhf_fast::logprobs_fwd`` / ``logprobs_bwd`` / ``logprobs_bwd_``), except that
    RLHF_FAST_CHECK=1 adds a data-dependent check that breaks the graph.
    """
    _check_logits(logits)
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    ignore_index = _check_labels(logits, labels, ignore_index)
    impl = resolve("logprobs", backend, logits.device, logits, labels)
    if impl == "reference":
        from rlhf_fast import reference

        return reference.logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    # Logits whose elements alias (an expanded tensor) cannot take the gradient over themselves.
    inplace = bool(inplace_backward) and (torch.compiler.is_compiling() or not overlaps_itself(logits))
    logp, ent, _ = torch.ops.rlhf_fast.logprobs_fwd(
        logits, labels, temperature, ignore_index, bool(return_entropy), inplace
    )
    if return_entropy:
        return logp, ent
    return logp


def entropy(logits: Tensor, *, temperature: float = 1.0, backend: str | None = None) -> Tensor:
    """Entropy H = -sum_j p_j log p_j of softmax(logits / temperature) per row.

    Args:
        logits: [..., V] fp32, bf16 or fp16, last dim contiguous (layout rules as in ``logprobs``).
        temperature: positive float (default 1.0).
        backend: None/"auto", "triton" or "reference".

    Returns:
        entropy [...] fp32, differentiable (dH/dz_j = -(1/T) p_j (log p_j + H), in logits.dtype).
        Entries with logit -inf contribute 0.
    """
    _check_logits(logits)
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    impl = resolve("entropy", backend, logits.device, logits)
    if impl == "reference":
        from rlhf_fast import reference

        return reference.entropy(logits, temperature=temperature)
    ent, _ = torch.ops.rlhf_fast.entropy_fwd(logits, temperature)
    return ent


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    average: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str | None = None,
) -> Tensor:
    """Per-sequence sum (or mean) of token log-probs, as DPO-style losses use.

    Args:
        logits: [B, T, V] fp32, bf16 or fp16, last dim contiguous.
        labels: [B, T] int64 (or int32), aligned with ``logits`` (no shift inside).
        mask: [B, T] bool, int or float weights (default None = all ones). Tokens whose label is
            ``ignore_index`` never count, whatever the mask. The mask gets no gradient.
        average: False (default) sums the counted tokens' log-probs; True divides by the sum of
            the mask over counted tokens (the number of counted tokens for a bool mask; a
            fractional mask's own sum, even below 1). A row with no counted token gives 0 (and 0
            gradient).
        temperature: positive float (default 1.0).
        ignore_index: default -100.
        backend: None/"auto", "triton" or "reference".

    Returns:
        [B] fp32. Gradient in logits.dtype.

    Kernel path: one token kernel computes w_bt * logp_bt ([B, T] fp32, exactly 0 where w = 0,
    so masked-out tokens never contribute, even with bad labels, and their logits are not read);
    the sum over T is a plain deterministic torch reduction of that tiny [B, T] tensor. Backward
    is one pass over [B, T, V]: grad_logits = g_b * w_bt * (onehot - softmax) / T with
    w = mask (or mask / count); rows with w = 0 are only written (zeros), not read.
    """
    _check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D [B, T, V], got shape {tuple(logits.shape)}")
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    ignore_index = _check_labels(logits, labels, ignore_index)
    if mask is not None:
        check_tensor("mask", mask)
        check_same_shape("labels", labels, "mask", mask)  # before either path: no silent broadcast
        check_same_device(logits=logits, mask=mask)
    impl = resolve("sequence_logprobs", backend, logits.device, logits, labels, mask)
    if impl == "reference":
        from rlhf_fast import reference

        return reference.sequence_logprobs(
            logits, labels, mask, average=average, temperature=temperature, ignore_index=ignore_index
        )
    counted = labels != ignore_index
    if mask is None:
        weight = counted.to(torch.float32)
    else:
        weight = as_float_mask("mask", mask.detach(), labels) * counted
    if average:
        # As the reference: divide by the counted weight where it is > 0 (an empty row gives 0).
        weight = weight / mask_divisor(weight.sum(-1, keepdim=True))
    token, _ = torch.ops.rlhf_fast.sequence_logprobs_fwd(logits, labels, weight, temperature, ignore_index)
    return token.sum(-1)
