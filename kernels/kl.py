"""Per-token KL penalties and KL-shaped rewards: Triton kernels + launchers.

All math is on the difference d = logp - ref (fp32, after upcasting each input):
    k1  = d                          dk1/dlogp = 1
    k2  = d^2 / 2                    dk2/dlogp = d
    k3  = exp(-d) + d - 1            dk3/dlogp = 1 - exp(-d)
          (= exp(ref - logp) - (ref - logp) - 1, the usual "low_var_kl" form)
    abs = |d|                        dabs/dlogp = sign(d)  (0 at d == 0, like torch.abs)
and d(kind)/dref = -d(kind)/dlogp. The formulas are the shared @triton.jit helpers of
rlhf_fast.kernels._terms (kl_term / kl_value, constexpr codes KL_CODES), the same ones the fused
PPO-from-logits kernel uses. With a clamp c the value is clamped to [-c, c] and the gradient is
zero where the unclamped value lies strictly outside [-c, c] (torch.clamp's convention).

kl_penalty is elementwise over any shape (the launcher flattens contiguous copies): one read of
each input and one fp32 write forward; the backward reads grad_output and both inputs and writes
only the gradients that are needed (1 or 2 writes), recomputing exp(-d) instead of saving it
(saving would cost one more fp32 write + read than the recompute's extra input read).

shape_rewards is one kernel, one program per row: the row's last counted token is found in the
kernel (first pass over the row's mask, a max over counted positions), then the second pass
writes -kl_coef * KL_t on counted tokens, 0 elsewhere, plus the row's score at its last counted
token. The mask row is read twice, the second time from cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import kernel_mask, on_input_device

from ._terms import KL_CODES, clamp_kl, kl_term, kl_value

# Elementwise kernels: 2048 elements per program, 8 warps -> 8 per thread per tensor (two 16-byte
# loads of fp32), the usual elementwise shape. 4096 (16 per thread) made Triton 3.6 allocate up to
# 122 registers for the KL backward on sm_90 (2 blocks per SM); not yet timed on an H100.
_ELEM_BLOCK = 2048
_ELEM_WARPS = 8


@triton.jit
def _kl_fwd_kernel(
    logp_ptr,
    ref_ptr,
    out_ptr,
    n_elements,
    clamp_val,
    KIND: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    k = kl_value(logp, ref, KIND)
    if HAS_CLAMP:
        k, _ = clamp_kl(k, k, clamp_val, KIND)
    tl.store(out_ptr + offs, k, mask=valid)


@triton.jit
def _kl_bwd_kernel(
    grad_out_ptr,
    logp_ptr,
    ref_ptr,
    grad_logp_ptr,
    grad_ref_ptr,
    n_elements,
    clamp_val,
    KIND: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    WRITE_LOGP: tl.constexpr,
    WRITE_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    go = tl.load(grad_out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    k, g = kl_term(logp - ref, KIND)
    if HAS_CLAMP:
        _, g = clamp_kl(k, g, clamp_val, KIND)
    g = g * go
    if WRITE_LOGP:
        tl.store(grad_logp_ptr + offs, g.to(grad_logp_ptr.dtype.element_ty), mask=valid)
    if WRITE_REF:
        tl.store(grad_ref_ptr + offs, (-g).to(grad_ref_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _shape_rewards_kernel(
    scores_ptr,
    logp_ptr,
    logp_stride_b,
    logp_stride_t,
    ref_ptr,
    ref_stride_b,
    ref_stride_t,
    mask_ptr,
    mask_stride_b,
    mask_stride_t,
    out_ptr,
    T,
    kl_coef,
    kl_coef_ptr,
    KL_COEF_IN_MEMORY: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Under torch.compile the coefficient comes as a 0-d fp32 tensor (an adaptive KL coefficient
    # changes every step; a float argument would be a guard); eagerly it is the float argument.
    if KL_COEF_IN_MEMORY:
        coef = tl.load(kl_coef_ptr)
    else:
        coef = kl_coef
    # int64 columns: offs * stride_t passes 2**31 for a transposed [B, T] view with B * T > 2**31.
    cols = tl.arange(0, BLOCK_T).to(tl.int64)
    mask_row = mask_ptr + row * mask_stride_b

    # Pass 1: index of the last counted token (-1 when the row has none).
    last = tl.full((BLOCK_T,), -1, tl.int64)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = offs < T
        m = tl.load(mask_row + offs * mask_stride_t, mask=valid, other=0).to(tl.float32)
        last = tl.maximum(last, tl.where(m != 0.0, offs, -1))
    last_idx = tl.max(last, axis=0)
    score = tl.load(scores_ptr + row).to(tl.float32)

    # Pass 2: rewards. where() (not multiply) keeps inf/NaN at uncounted tokens out of the output.
    logp_row = logp_ptr + row * logp_stride_b
    ref_row = ref_ptr + row * ref_stride_b
    out_row = out_ptr + row * T
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = offs < T
        m = tl.load(mask_row + offs * mask_stride_t, mask=valid, other=0).to(tl.float32)
        counted = m != 0.0
        # Loads predicated on `valid` only (not on the data-dependent mask) so they stay vectorised.
        logp = tl.load(logp_row + offs * logp_stride_t, mask=valid, other=0.0).to(tl.float32)
        ref = tl.load(ref_row + offs * ref_stride_t, mask=valid, other=0.0).to(tl.float32)
        k = kl_value(logp, ref, KIND)
        r = tl.where(counted, -coef * k * m, 0.0)
        r = tl.where(offs == last_idx, r + score, r)
        tl.store(out_row + offs, r, mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers. Callers (rlhf_fast/kl.py) validate arguments; these only check what they rely on.


def _elem_grid(n: int):
    return (triton.cdiv(n, _ELEM_BLOCK),)


@on_input_device
def kl_forward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str, clamp: float | None) -> torch.Tensor:
    """KL term per element. logprobs, ref_logprobs: same shape, any float dtypes. Returns fp32, same shape."""
    logp = logprobs.contiguous()
    ref = ref_logprobs.contiguous()
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n == 0:
        return out
    _kl_fwd_kernel[_elem_grid(n)](
        logp,
        ref,
        out,
        n,
        0.0 if clamp is None else float(clamp),
        KIND=KL_CODES[kind],
        HAS_CLAMP=clamp is not None,
        BLOCK=_ELEM_BLOCK,
        num_warps=_ELEM_WARPS,
    )
    return out


@on_input_device
def kl_backward(
    grad_out: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str,
    clamp: float | None,
    need_logp: bool,
    need_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d/dlogprobs in logprobs.dtype, d/dref in ref_logprobs.dtype); an unneeded one is an
    empty tensor (shape (0,)) and is not written."""
    logp = logprobs.contiguous()
    ref = ref_logprobs.contiguous()
    go = grad_out.contiguous()
    dev = logp.device
    grad_logp = torch.empty(logp.shape if need_logp else (0,), dtype=logp.dtype, device=dev)
    grad_ref = torch.empty(ref.shape if need_ref else (0,), dtype=ref.dtype, device=dev)
    n = logp.numel()
    if n == 0 or not (need_logp or need_ref):
        return grad_logp, grad_ref
    _kl_bwd_kernel[_elem_grid(n)](
        go,
        logp,
        ref,
        grad_logp if need_logp else logp,  # placeholder pointer, never written
        grad_ref if need_ref else ref,
        n,
        0.0 if clamp is None else float(clamp),
        KIND=KL_CODES[kind],
        HAS_CLAMP=clamp is not None,
        WRITE_LOGP=need_logp,
        WRITE_REF=need_ref,
        BLOCK=_ELEM_BLOCK,
        num_warps=_ELEM_WARPS,
    )
    return grad_logp, grad_ref


@on_input_device
def shape_rewards_forward(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str,
    kl_coef_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards [B, T] fp32. scores [B]; logprobs, ref_logprobs, mask [B, T] (any strides).
    kl_coef_t: a 0-d fp32 tensor on the same device, used instead of kl_coef when given."""
    B, T = logprobs.shape
    out = torch.empty((B, T), dtype=torch.float32, device=logprobs.device)
    if B == 0 or T == 0:
        return out
    m = kernel_mask(mask)
    scores = scores.contiguous()
    block_t = min(triton.next_power_of_2(T), 2048)
    _shape_rewards_kernel[(B,)](
        scores,
        logprobs,
        logprobs.stride(0),
        logprobs.stride(1),
        ref_logprobs,
        ref_logprobs.stride(0),
        ref_logprobs.stride(1),
        m,
        m.stride(0),
        m.stride(1),
        out,
        T,
        float(kl_coef),
        kl_coef_t if kl_coef_t is not None else out,  # (never read without KL_COEF_IN_MEMORY)
        KL_COEF_IN_MEMORY=kl_coef_t is not None,
        KIND=KL_CODES[kind],
        BLOCK_T=block_t,
        num_warps=8 if block_t >= 2048 else 4,
    )
    return out
