"""Linear layer -> per-token log-probs, one chunk of logits at a time.

`linear_logprobs(hidden, weight, labels)` equals `logprobs(hidden @ weight.T + bias, labels)`,
but on the "triton" backend it never holds the [N, V] logits: rows go through in chunks of C,
and only one [C, V] logits buffer exists at a time.

Forward, per chunk of C rows:
    logits_c = hidden_c @ weight.T (+ bias)          matmul in the input dtype (bf16 on GPU)
    logp_c, entropy_c, lse_c = Triton row kernel     (rlhf_fast.kernels.logprobs)
keeping only the per-row fp32 results (logp, entropy, lse: O(N) memory).
Backward, per chunk: recompute logits_c, turn it IN PLACE into grad_logits_c with the Triton
backward kernel (from the saved lse / entropy and the incoming grad_logp / grad_entropy), then
    grad_hidden_c  = grad_logits_c @ weight
    grad_weight   += grad_logits_c.T @ hidden_c      (accumulated in fp32, cast at the end; on CUDA
                                                      in the GEMM itself: addmm with out_dtype fp32)
    grad_bias     += grad_logits_c.sum(0)            (fp32 accumulator too)
Only the gradients autograd asks for are computed.
Layers: custom ops `rlhf_fast::linear_logprobs_fwd` / `linear_logprobs_bwd` (opaque to
torch.compile, with fake impls and autograd) around the launchers of `rlhf_fast.kernels.logprobs`.

Costs: peak memory O(C * V) for logits instead of O(N * V); C is chosen so a chunk of fp32-sized
logits stays under ~1 GiB (a multiple of 8 rows, at least 1: 1760 rows at V = 151936, a 535 MB
bf16 chunk; on an H100 a 440-row chunk left the grad_weight GEMM (K = C) short and ran 19
accumulations per step). Time: one extra matmul (the
recompute of the logits in the backward) over materialising them, i.e. 4 matmuls of N x H x V
instead of 3, plus one read + one write of each [C, V] chunk per pass. This is NOT yet the fused
matmul + online log-softmax kernel that would run within a few percent of the three matmuls.

The "reference" backend materialises the logits (rlhf_fast.reference.linear_logprobs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_fast import reference
from rlhf_fast._backend import (
    FLOAT_DTYPES,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
    register_op,
    resolve,
    saveable,
)

__all__ = ["linear_logprobs"]

register_op("linear_logprobs", triton=True)

# Budget for one chunk of logits, counted at 4 bytes per element (the fp32 size, whatever the
# input dtype, so a bf16 run keeps headroom for matmul workspaces).
_CHUNK_BYTES = 2**30


def _chunk_rows(n_rows: int, vocab: int, override: int | None = None) -> int:
    """Rows per chunk: C * V * 4 <= _CHUNK_BYTES, a multiple of 8, at least 1, at most N."""
    if override is not None:
        rows = override
    else:
        rows = _CHUNK_BYTES // (4 * max(vocab, 1))
        rows = rows - rows % 8 if rows >= 8 else max(rows, 1)
    return max(1, min(rows, max(n_rows, 1)))


def _kernels():
    # Imported lazily so that importing rlhf_fast never imports triton.
    from rlhf_fast.kernels import logprobs as kernels

    return kernels


def _empty(like: torch.Tensor) -> torch.Tensor:
    # Placeholder for an output that was not asked for (custom ops cannot return None).
    return like.new_empty(0)


@torch.library.custom_op("rlhf_fast::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None (one dtype), labels [N] ->
    (logp [N] fp32, entropy [N] fp32 (or [0] without with_entropy), lse [N] fp32)."""
    kernels = _kernels()
    N = hidden.shape[0]
    logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    ent = torch.empty(N if with_entropy else 0, device=hidden.device, dtype=torch.float32)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        logits_c = F.linear(hidden[start:stop], weight, bias)  # the only [C, V] buffer
        logp_c, ent_c, lse_c = kernels.logprobs_forward(
            logits_c.unsqueeze(0), labels[start:stop], None, temperature, ignore_index, with_entropy
        )
        logp[start:stop] = logp_c
        lse[start:stop] = lse_c
        if with_entropy:
            ent[start:stop] = ent_c
        del logits_c
    return logp, ent, lse


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk):
    N = hidden.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    return logp, hidden.new_empty(N if with_entropy else 0, dtype=torch.float32), torch.empty_like(logp)


# Whether this torch accepts an fp32 accumulator for a bf16/fp16 addmm (aten::addmm.dtype_out):
# torch <= 2.7 has no such overload, 2.8/2.9 reject an fp32 `self` with low-precision matrices.
# None until a CUDA backward has tried it; then the answer is kept for the process.
_addmm_out_dtype_works: bool | None = None
_DEVICE_ERRORS = tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e is not None)


def _accumulate_grad_weight(
    grad_weight: Tensor, grad_logits_c: Tensor, hidden_c: Tensor, *, first: bool, fused: bool | None = None
) -> None:
    """grad_weight (fp32 [V, H]) = (0 if first else grad_weight) + grad_logits_c.T @ hidden_c.

    beta = 0 on the first chunk: the accumulator starts uninitialised, and addmm ignores its
    input entirely (NaN included) when beta is 0. fused (default: on CUDA) tries the
    out_dtype GEMM for bf16/fp16 inputs, falling back where this torch lacks it."""
    global _addmm_out_dtype_works
    beta = 0.0 if first else 1.0
    if grad_logits_c.dtype == torch.float32:
        grad_weight.addmm_(grad_logits_c.t(), hidden_c, beta=beta)
        return
    if fused is None:
        fused = grad_logits_c.is_cuda
    if fused and _addmm_out_dtype_works is not False:
        # bf16/fp16 GEMM that adds into the fp32 accumulator in its epilogue. A separate
        # `grad_weight += mm(...)` costs a read + write of the fp32 [V, H] buffer per chunk:
        # 50 of 114 ms per step at 8192 x 4096 x 151936 on an H100.
        try:
            torch.addmm(grad_weight, grad_logits_c.t(), hidden_c, beta=beta, out_dtype=torch.float32, out=grad_weight)
        except (RuntimeError, TypeError) as exc:  # argument checks: raised before anything is written
            # Out of memory or a CUDA error is not an answer about the overload: raised as
            # is, without switching the fused GEMM off for the rest of the process.
            if _addmm_out_dtype_works or isinstance(exc, _DEVICE_ERRORS) or str(exc).startswith("CUDA error"):
                raise
            _addmm_out_dtype_works = False
        else:
            _addmm_out_dtype_works = True
            return
    # No out_dtype GEMM (CPU, older torch): low-precision matmul, summed across chunks in fp32.
    product = torch.mm(grad_logits_c.t(), hidden_c)
    if first:
        grad_weight.copy_(product)
    else:
        grad_weight += product


@torch.library.custom_op("rlhf_fast::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    chunk: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtype; a gradient
    not asked for (need_* False) comes back as an empty [0] tensor and is not computed."""
    kernels = _kernels()
    N = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else _empty(hidden)
    # The first chunk's addmm (beta = 0: its input is ignored, NaN included) initialises it.
    grad_weight = torch.empty(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        hidden_c = hidden[start:stop]
        # Recompute the chunk's logits, then overwrite them in place with their gradient.
        grad_logits_c = F.linear(hidden_c, weight, bias)
        rows = grad_logits_c.unsqueeze(0)
        kernels.logprobs_backward(
            rows,
            labels[start:stop],
            grad_logp[start:stop] if grad_logp is not None else None,
            grad_entropy[start:stop] if grad_entropy is not None else None,
            lse[start:stop],
            entropy[start:stop] if grad_entropy is not None else None,
            temperature,
            ignore_index,
            out=rows,
        )
        if need_hidden:
            torch.mm(grad_logits_c, weight, out=grad_hidden[start:stop])
        if need_weight:
            _accumulate_grad_weight(grad_weight, grad_logits_c, hidden_c, first=start == 0)
        if need_bias:
            grad_bias += grad_logits_c.sum(0, dtype=torch.float32)
        del grad_logits_c, rows
    if need_weight and N == 0:
        grad_weight.zero_()  # no chunk ran to initialise it
    grad_weight = grad_weight.to(weight.dtype) if need_weight else _empty(weight)
    grad_bias = grad_bias.to(bias.dtype) if need_bias else _empty(weight)
    return grad_hidden, grad_weight, grad_bias


@_linear_logprobs_bwd.register_fake
def _(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    temperature,
    ignore_index,
    chunk,
    need_hidden,
    need_weight,
    need_bias,
):
    return (
        torch.empty_like(hidden) if need_hidden else _empty(hidden),
        torch.empty_like(weight) if need_weight else _empty(weight),
        weight.new_empty(weight.shape[0]) if need_bias else _empty(weight),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk = inputs
    _, ent, lse = output
    # (labels may be an inference tensor; hidden / weight / bias are saved as eager's matmul saves them)
    ctx.save_for_backward(hidden, weight, bias, *saveable(labels), lse, ent if with_entropy else None)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.chunk = chunk
    ctx.with_entropy = with_entropy


def _backward(ctx, grad_logp, grad_ent, _grad_lse):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    none = (None,) * 5
    if not ctx.with_entropy:
        grad_ent = None
    if not (need_hidden or need_weight or need_bias) or (grad_logp is None and grad_ent is None):
        return (None, None, None) + none
    grad_hidden, grad_weight, grad_bias = _linear_logprobs_bwd(
        grad_logp,
        grad_ent,
        hidden,
        weight,
        bias,
        labels,
        lse,
        ent,
        ctx.temperature,
        ctx.ignore_index,
        ctx.chunk,
        need_hidden,
        need_weight,
        need_bias,
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
    ) + none


_linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast gives F.linear on `device_type` here, or None outside autocast."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
    _chunk_rows_override: int | None = None,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token, chunk by chunk.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (the LM's last hidden states).
        weight: [V, H] (the LM head); on the kernel path cast to hidden's dtype for the matmul
            (the reference computes the logits in fp32); its gradient comes back in its own
            dtype. bias: [V] or None (likewise). Under ``torch.autocast`` all three are cast to
            the autocast dtype instead, as ``F.linear`` would be, forward and backward alike.
        labels: [...] int64/int32, aligned with hidden (no shift inside); ignore_index -> 0.
        temperature (> 0), ignore_index, return_entropy: as in `rlhf_fast.logprobs`.
        backend: None/"auto" (CUDA -> "triton", CPU -> "reference"), "triton", "reference".
        _chunk_rows_override: private; force the rows per chunk (tests use it to hit several
            chunks and a remainder).
    Returns: fp32 [...] log-probs (and entropy [...] when return_entropy).

    Memory ("triton"): O(C * V) logits for a chunk of C rows (C * V * 4 bytes <= ~1 GiB)
    instead of O(N * V), plus O(N) fp32 per-row results. Cost: one extra matmul (the logits are
    recomputed in the backward) compared with materialising them; not yet the fused
    matmul + log-softmax kernel that would run within a few percent of the three matmuls.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one row (vocabulary entry), got shape {tuple(weight.shape)}")
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight rows {weight.shape[0]}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    ignore_index = check_int("ignore_index", ignore_index)
    if _chunk_rows_override is not None:
        check_int("_chunk_rows_override", _chunk_rows_override, low=1)
    impl = resolve("linear_logprobs", backend, hidden.device, hidden, weight, labels, bias)
    if impl != "triton":
        return reference.linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )

    lead_shape = hidden.shape[:-1]
    H, V = hidden.shape[-1], weight.shape[0]
    # Under torch.autocast the matmuls run in the autocast dtype, as F.linear's would (and as
    # the reference path's do). The cast happens here, before the custom op, so that its backward
    # recomputes the very logits the forward normalised (not fp32 ones against a bf16
    # log-normaliser, with fp32 matmuls) and autograd casts each gradient back to its
    # argument's dtype.
    compute_dtype = _autocast_dtype(hidden.device.type) or hidden.dtype
    hidden2d = hidden.reshape(-1, H).to(compute_dtype)
    labels1d = labels.reshape(-1).contiguous()
    weight_c = weight.to(compute_dtype)
    bias_c = bias.to(compute_dtype) if bias is not None else None
    chunk = _chunk_rows(hidden2d.shape[0], V, _chunk_rows_override)
    logp, ent, _ = _linear_logprobs_fwd(
        hidden2d, weight_c, bias_c, labels1d, temperature, ignore_index, return_entropy, chunk
    )
    logp = logp.view(lead_shape)
    if return_entropy:
        return logp, ent.view(lead_shape)
    return logp
