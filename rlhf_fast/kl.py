"""Per-token KL penalties between the policy and the reference model, and KL-shaped rewards.

    kl_penalty(logprobs, ref_logprobs, kind="k1", *, clamp=None, backend=None)  -> fp32, same shape
    shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, kind="k1", backend=None) -> [B, T] fp32

Fast path: Triton kernels in `rlhf_fast.kernels.kl` (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1), wrapped as the custom ops rlhf_fast::kl_penalty (with a Triton backward,
rlhf_fast::kl_penalty_backward) and rlhf_fast::shape_rewards, so torch.compile(fullgraph=True)
traces them without a graph break; outside torch.compile kl_penalty goes through an
autograd.Function calling the same launchers (less dispatch overhead). Reference:
`rlhf_fast.reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf_fast._backend import (
    LOGP_DTYPES,
    check_float,
    check_same_device,
    check_same_shape,
    check_tensor,
    fp32_outputs,
    kernel_backward,
    register_op,
    resolve,
    saveable,
)
from rlhf_fast.reference import KL_KINDS  # name -> canonical kind (verl: kl = k1, mse = k2, low_var_kl = k3)

__all__ = ["KL_KINDS", "kl_penalty", "shape_rewards"]

register_op("kl_penalty", triton=True)
register_op("shape_rewards", triton=True)


# ----------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("rlhf_fast::kl_penalty", mutates_args=())
def _kl_penalty_op(logprobs: Tensor, ref_logprobs: Tensor, kind: str, clamp: float | None) -> Tensor:
    from rlhf_fast.kernels import kl as kl_kernels

    return kl_kernels.kl_forward(logprobs, ref_logprobs, kind, clamp)


@_kl_penalty_op.register_fake
def _(logprobs, ref_logprobs, kind, clamp):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward_op(
    grad: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: str,
    clamp: float | None,
    need_logprobs: bool,
    need_ref: bool,
) -> tuple[Tensor, Tensor]:
    """(d/dlogprobs, d/dref_logprobs); an unneeded gradient comes back as an empty (0,) tensor."""
    from rlhf_fast.kernels import kl as kl_kernels

    return kl_kernels.kl_backward(grad, logprobs, ref_logprobs, kind, clamp, need_logprobs, need_ref)


@_kl_penalty_backward_op.register_fake
def _(grad, logprobs, ref_logprobs, kind, clamp, need_logprobs, need_ref):
    return (
        logprobs.new_empty(logprobs.shape if need_logprobs else (0,)),
        ref_logprobs.new_empty(ref_logprobs.shape if need_ref else (0,)),
    )


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, kind, clamp = inputs
    ctx.save_for_backward(*saveable(logprobs, ref_logprobs))
    ctx.kind = kind
    ctx.clamp = clamp


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    need_logprobs, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_logprobs or need_ref):
        return None, None, None, None
    grad_logprobs, grad_ref = _kl_penalty_backward_op(
        grad, logprobs, ref_logprobs, ctx.kind, ctx.clamp, need_logprobs, need_ref
    )
    return (grad_logprobs if need_logprobs else None), (grad_ref if need_ref else None), None, None


_kl_penalty_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)


class _KLPenaltyFunction(torch.autograd.Function):
    """Eager-mode twin of rlhf_fast::kl_penalty calling the same launchers: it skips the custom
    op's Python dispatch (tens of microseconds per call, comparable to the kernel at [1024, 8192]).
    Under torch.compile the custom op is used."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, kind, clamp):
        from rlhf_fast.kernels import kl as kl_kernels

        ctx.save_for_backward(*saveable(logprobs, ref_logprobs))
        ctx.kind = kind
        ctx.clamp = clamp
        return kl_kernels.kl_forward(logprobs, ref_logprobs, kind, clamp)

    @staticmethod
    @kernel_backward  # the kernels' gradient is not itself differentiable: raise, never drop terms
    def backward(ctx, grad):
        from rlhf_fast.kernels import kl as kl_kernels

        logprobs, ref_logprobs = ctx.saved_tensors
        need_logprobs, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_logprobs or need_ref):
            return None, None, None, None
        grad_logprobs, grad_ref = kl_kernels.kl_backward(
            grad, logprobs, ref_logprobs, ctx.kind, ctx.clamp, need_logprobs, need_ref
        )
        return (grad_logprobs if need_logprobs else None), (grad_ref if need_ref else None), None, None


@torch.library.custom_op("rlhf_fast::shape_rewards", mutates_args=())
def _shape_rewards_op(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: str,
    kl_coef_t: Optional[Tensor] = None,
) -> Tensor:
    """kl_coef_t (0-d fp32, or None): the coefficient as a tensor, used instead of kl_coef."""
    from rlhf_fast.kernels import kl as kl_kernels

    return kl_kernels.shape_rewards_forward(scores, logprobs, ref_logprobs, mask, kl_coef, kind, kl_coef_t)


@_shape_rewards_op.register_fake
def _(scores, logprobs, ref_logprobs, mask, kl_coef, kind, kl_coef_t=None):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation


def _canonical_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(KL_KINDS)}")
    return KL_KINDS[kind]


def _check_pair(logprobs, ref_logprobs) -> None:
    check_tensor("logprobs", logprobs, dtypes=LOGP_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, dtypes=LOGP_DTYPES)
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)


# ----------------------------------------------------------------------------------------------
# Public functions


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1", *, clamp=None, backend=None) -> Tensor:
    """Per-token KL estimate between the policy and the reference model.

    With d = logprobs - ref_logprobs (computed in fp32):
        "k1" (alias "kl")          d
        "k2" (alias "mse")         d^2 / 2
        "k3" (alias "low_var_kl")  exp(-d) + d - 1  = exp(ref - logp) - (ref - logp) - 1  (>= 0);
                                   the alias does not clamp: verl's low_var_kl clamps to
                                   [-10, 10], so pass clamp=10.0 for verl's numbers
        "abs"                      |d|
        "k1+", "k3+", "abs+" (aliases "kl+", "low_var_kl+"; "k2+" / "mse+" = "k2"): verl's
            straight-through kinds: the value of k1 / k3 / abs, the gradient of k2 (d), which is
            an unbiased gradient of the KL; a clamp applies to the value only.

    Args:
        logprobs: any shape, fp32/bf16/fp16 (fp64 accepted; math in fp32 on the Triton path).
        ref_logprobs: same shape as logprobs, any of those dtypes (may differ from logprobs').
        kind: see above; default "k1".
        clamp: None (default) or c >= 0: clamp the result to [-c, c] (verl clamps low_var_kl to
            [-10, 10]); the gradient is 0 where the unclamped value lies outside [-c, c] (not for
            the straight-through kinds k1+, k3+, abs+: their k2 gradient is never clamped, as in
            verl; k2+ / mse+ are k2 itself, clamped like it).
        backend: None/"auto", "triton" or "reference" (see rlhf_fast._backend).
    Returns:
        fp32 tensor of logprobs' shape. Differentiable w.r.t. both inputs (d/dref = -d/dlogp);
        gradients come back in each input's dtype.
    """
    canonical = _canonical_kind(kind)
    _check_pair(logprobs, ref_logprobs)
    clamp = check_float("clamp", clamp, low=0.0, allow_none=True)
    impl = resolve("kl_penalty", backend, logprobs.device, logprobs, ref_logprobs)
    if impl == "reference":
        from rlhf_fast import reference

        return fp32_outputs(reference.kl_penalty(logprobs, ref_logprobs, kind, clamp=clamp))
    if torch.compiler.is_compiling():
        return _kl_penalty_op(logprobs, ref_logprobs, canonical, clamp)
    return _KLPenaltyFunction.apply(logprobs, ref_logprobs, canonical, clamp)


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kind: str = "k1",
    backend=None,
) -> Tensor:
    """Per-token PPO rewards with a KL penalty (TRL / OpenRLHF `compute_reward`).

    rewards[b, t] = -kl_coef * kl_penalty(logprobs, ref_logprobs, kind)[b, t] * mask[b, t] on counted
    tokens (mask != 0) and exactly 0 on the others (an inf/NaN log-prob there does not leak), plus
    scores[b] at row b's last counted token; a row with no counted token gets no score.

    Args:
        scores: [B] sequence scores (any float dtype).
        logprobs, ref_logprobs: [B, T] (fp32/bf16/fp16/fp64), any strides.
        mask: [B, T] bool, integer or float; 1 = token counts (a float mask weights the KL term).
        kl_coef: KL coefficient (keyword only, required).
        kind: KL estimator, as in `kl_penalty`; default "k1".
        backend: None/"auto", "triton" or "reference".
    Returns:
        [B, T] fp32. Not differentiable: rewards are targets, so the op runs on detached inputs
        (no gradient flows to scores or log-probs).

    The Triton kernel is one program per row that first finds the row's last counted token from
    the mask (in the kernel, no [B] index tensor made in torch), then writes the row's rewards.
    """
    canonical = _canonical_kind(kind)
    check_tensor("scores", scores, dtypes=LOGP_DTYPES, ndim=1)
    _check_pair(logprobs, ref_logprobs)
    check_tensor("logprobs", logprobs, ndim=2)
    check_tensor("mask", mask)
    check_same_shape("logprobs", logprobs, "mask", mask)
    if scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must have shape [B] = [{logprobs.shape[0]}], got {tuple(scores.shape)}")
    check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    kl_coef = check_float("kl_coef", kl_coef)
    impl = resolve("shape_rewards", backend, logprobs.device, scores, logprobs, ref_logprobs, mask)
    if impl == "reference":
        from rlhf_fast import reference

        # Detached, not only no_grad: no_grad does not stop forward-mode AD (torch.func.jvp).
        inputs = (scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask.detach())
        return fp32_outputs(reference.shape_rewards(*inputs, kl_coef=kl_coef, kind=kind))
    coef_t = None
    if torch.compiler.is_compiling():
        # kl_coef as a 0-d tensor, not the op's float argument: Dynamo guards on the value of a
        # custom op's float argument, so an adaptive KL coefficient (a new value every step)
        # would compile again each step, and fullgraph=True fails after 8.
        # (A traced multiply: Dynamo keeps a float symbolic there, not as torch.full's fill.)
        coef_t = torch.ones((), dtype=torch.float32, device=logprobs.device) * kl_coef
        kl_coef = 0.0  # (unused beside coef_t)
    return _shape_rewards_op(
        scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask.detach(), float(kl_coef), canonical, coef_t
    )
