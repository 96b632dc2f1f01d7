"""PPO / GRPO actor loss straight from logits, with the logits gradient written during the forward.

Layers: Triton kernels + launchers in `rlhf_fast.kernels.ppo_from_logits`; here the custom ops
(`rlhf_fast::ppo_loss_from_logits_fwd`, its in-place twin and the grad_output scaling op), their
fake implementations and autograd, and the documented public function.

Why the gradient comes from the forward: every aggregation mode is a weighted sum of per-token
losses with weights that depend on the mask alone (`aggregation_weights`), so dloss/dlogp and
dloss/dentropy of each token are known before backward. The kernel writes dloss/dlogits while it
has the row in hand and backward only hands it back (times grad_output, folded in for free when
grad_output == 1 in eager mode; one fused multiply pass under torch.compile, see `_backward`).
No [N, V] fp32 intermediate is ever allocated.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf_fast import reference
from rlhf_fast._backend import (
    FLOAT_DTYPES,
    as_float_mask,
    check_float,
    check_int,
    check_loss_scale,
    check_same_device,
    check_same_shape,
    check_tensor,
    checks_enabled,
    kernel_backward,
    overlaps_itself,
    refuse_second_order,
    register_op,
    resolve,
    traced_backward,
)
from rlhf_fast.aggregation import aggregation_weights, check_agg

__all__ = ["ppo_loss_from_logits"]

register_op("ppo_loss_from_logits", triton=True)

_KL_KINDS = reference.KL_KINDS  # name or alias -> canonical k1 | k2 | k3 | abs | k1+ | k3+ | abs+
_N_STATS = 8
# Same order as rlhf_fast.kernels.ppo_from_logits.STAT_NAMES (not imported here: that imports triton).
_STAT_NAMES = ("policy_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max", "kl", "dual_clipfrac")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
_BACKWARD_TWICE = (
    "ppo_loss_from_logits: backward ran twice through the same graph (retain_graph=True). The "
    "logits gradient is computed in the forward and scaled by grad_output in place during the "
    "first backward, so it cannot be handed out again; recompute the loss for a second backward."
)


def _kernels():
    from rlhf_fast.kernels import ppo_from_logits as kernels  # lazy: importing rlhf_fast never imports triton

    return kernels


# ------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("rlhf_fast::ppo_loss_from_logits_fwd", mutates_args=())
def _fwd_op(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    stat_mask: Tensor,
    ref_logprobs: Optional[Tensor],
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: Optional[float],
    kl_coef: float,
    kl_kind: str,
    kl_clamp: Optional[float],
    entropy_coef: float,
    ignore_index: int,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward. Returns (loss 0-d fp32, logp [B, T] fp32, entropy [B, T] fp32,
    grad_logits [B, T, V] in the logits' dtype (dloss/dlogits for grad_output = 1; an empty [0]
    tensor when write_grad is False: then the logits are read once and nothing is written),
    stats [8] fp32 in _STAT_NAMES order).

    grad_logits is private to the autograd of this op: backward scales it in place by
    grad_output and hands it out as the logits' gradient (do not keep or read it)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else None
    loss, logp, ent, stats = _kernels().ppo_from_logits_fwd(
        logits,
        labels,
        old_logprobs,
        advantages,
        weights,
        stat_mask,
        ref_logprobs,
        grad,
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_kind=kl_kind,
        kl_clamp=kl_clamp,
        entropy_coef=entropy_coef,
        ignore_index=ignore_index,
    )
    if grad is None:
        grad = logits.new_empty((0,))
    return loss, logp, ent, grad, stats


@_fwd_op.register_fake
def _fwd_fake(
    logits,
    labels,
    old_logprobs,
    advantages,
    weights,
    stat_mask,
    ref_logprobs,
    temperature,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    kl_kind,
    kl_clamp,
    entropy_coef,
    ignore_index,
    write_grad,
):
    B, T, _ = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty((), **f32),
        logits.new_empty((B, T), **f32),
        logits.new_empty((B, T), **f32),
        logits.new_empty(logits.shape if write_grad else (0,)),
        logits.new_empty((_N_STATS,), **f32),
    )


@torch.library.custom_op("rlhf_fast::ppo_loss_from_logits_fwd_inplace", mutates_args=("logits",))
def _fwd_inplace_op(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    stat_mask: Tensor,
    ref_logprobs: Optional[Tensor],
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: Optional[float],
    kl_coef: float,
    kl_kind: str,
    kl_clamp: Optional[float],
    entropy_coef: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Like ppo_loss_from_logits_fwd, but the gradient overwrites `logits` (last stride 1).
    Returns (loss, logp, entropy, stats)."""
    if logits.stride(-1) != 1:
        raise ValueError("ppo_loss_from_logits_fwd_inplace: logits needs last stride 1")
    loss, logp, ent, stats = _kernels().ppo_from_logits_fwd(
        logits,
        labels,
        old_logprobs,
        advantages,
        weights,
        stat_mask,
        ref_logprobs,
        logits,
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        kl_kind=kl_kind,
        kl_clamp=kl_clamp,
        entropy_coef=entropy_coef,
        ignore_index=ignore_index,
    )
    return loss, logp, ent, stats


@_fwd_inplace_op.register_fake
def _fwd_inplace_fake(logits, labels, *args):
    B, T, _ = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty((), **f32),
        logits.new_empty((B, T), **f32),
        logits.new_empty((B, T), **f32),
        logits.new_empty((_N_STATS,), **f32),
    )


@torch.library.custom_op("rlhf_fast::ppo_loss_from_logits_scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    """grad [B, T, V] *= grad_output (0-d) in place; no work (and no host sync) when it is 1."""
    _kernels().scale_grad_(grad, grad_output)


@_scale_grad_op.register_fake
def _scale_grad_fake(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    loss, logp, ent, grad, stats = output
    ctx.write_grad = inputs[-1]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(logp, ent, grad, stats)
    # Autograd otherwise hands backward a zeros_like() of every output that got no gradient,
    # non-differentiable ones included: a memset of a [B, T, V] buffer (the saved gradient's
    # size: +1 write of the logits' bytes and +1 [N, V] buffer in every step, seen on an H100).
    # backward reads only grad_loss, so None for the rest is fine.
    ctx.set_materialize_grads(False)
    ctx.grad_consumed = False


def _backward(ctx, grad_loss, *unused_grads):
    # Only the logits get a gradient: old_logprobs, advantages, weights, mask and ref_logprobs are
    # targets (detached), the floats are hyper-parameters.
    no_input_grads = (None,) * 16
    if not ctx.write_grad or grad_loss is None:  # no logits gradient wanted / none reached loss
        return (None,) + no_input_grads
    # Eager guard, checked before saved_tensors (which a second backward can no longer read: the
    # first one scaled the saved gradient in place). Under torch.compile this Python runs once, at
    # trace time, the flag is never set, and the compiled backward never re-reads it (a traced
    # check would need a device flag and a host sync to raise, which backward must not do). The
    # docstring says so: unsupported under compile.
    if ctx.grad_consumed:
        raise RuntimeError(_BACKWARD_TWICE)
    (grad,) = ctx.saved_tensors
    if traced_backward(grad):
        # Under torch.compile the in-place scale op costs more than a plain multiply: `grad` is a
        # saved intermediate (a backward-graph input that no caller sees), so functionalization
        # turns the mutation into "clone, then mutate the clone" and inductor cannot re-inplace
        # it (it only re-inplaces mutated graph inputs that get a copy_ back, i.e. the user's own
        # inputs). The clone lands in grad's own (dead) buffer: a full read + write of [N, V]
        # that copies nothing, then the scale op (0 or 1 more pass). Declaring the op otherwise
        # does not help: a custom op may not return an alias of its input, and a new output
        # only when grad_output != 1 would need a host sync. A traced multiply is one fused
        # pointwise pass (1 read + 1 write, written into the dead buffer, fusable with what
        # consumes the gradient): never more traffic than the copy, half of copy + scale.
        # tests/test_ppo_from_logits.py greps inductor's output code for this.
        return (grad * grad_loss,) + no_input_grads
    ctx.grad_consumed = True
    _scale_grad_op(grad, grad_loss)
    return (refuse_second_order(grad),) + no_input_grads


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _InplaceBackward(torch.autograd.Function):
    """Eager-only path for inplace_backward=True: the gradient lives in the logits' storage."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, logp, ent, stats = _fwd_inplace_op(logits, *args)
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(logp, ent, stats)
        ctx.set_materialize_grads(False)  # no zeros for the outputs without a gradient
        ctx.grad_consumed = False
        ctx.n_args = len(args)
        return loss, logp, ent, stats

    @staticmethod
    @kernel_backward  # the gradient is a kernel's buffer: a double backward raises, never drops terms
    def backward(ctx, grad_loss, *unused_grads):
        if ctx.grad_consumed:
            raise RuntimeError(_BACKWARD_TWICE)
        if grad_loss is None:  # nothing reached the loss (materialize_grads is off)
            return (None,) * (1 + ctx.n_args)
        ctx.grad_consumed = True
        (grad,) = ctx.saved_tensors
        _scale_grad_op(grad, grad_loss)
        return (grad,) + (None,) * ctx.n_args


# ------------------------------------------------------------------------------------------------
# Public function


_REF_NOT_KNOWN_YET = object()  # PPOLoss at construction: ref_logprobs comes with each forward


def _check_hyper(
    temperature, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_kind, kl_clamp, entropy_coef, agg, horizon,
    ignore_index, loss_scale, ref_logprobs=_REF_NOT_KNOWN_YET,
):
    """The hyper-parameter checks of ppo_loss_from_logits, in its order (none needs a tensor but
    the kl_coef / ref_logprobs pairing, skipped where ref_logprobs is not known yet: PPOLoss runs
    the rest at construction). Returns temperature, clip_eps, clip_eps_high (clip_eps where None),
    dual_clip, kl_coef, kl_clamp, entropy_coef and loss_scale as floats, then horizon and
    ignore_index (None kept; numpy scalars as Python numbers)."""
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    clip_eps = check_float("clip_eps", clip_eps, low=0.0)
    clip_high = clip_eps if clip_eps_high is None else check_float("clip_eps_high", clip_eps_high, low=0.0)
    if dual_clip is not None:
        dual_clip = check_float("dual_clip", dual_clip, low=1.0, low_inclusive=False)
    kl_coef = check_float("kl_coef", kl_coef)
    if ref_logprobs is not _REF_NOT_KNOWN_YET:
        reference.check_kl_term(kl_coef, ref_logprobs)
    kl_clamp = check_float("kl_clamp", kl_clamp, low=0.0, allow_none=True)
    entropy_coef = check_float("entropy_coef", entropy_coef)
    loss_scale = check_loss_scale(loss_scale)
    if kl_kind not in _KL_KINDS:
        raise ValueError(f"kl_kind={kl_kind!r} is not one of {sorted(_KL_KINDS)}")
    horizon = check_agg(agg, horizon)
    ignore_index = check_int("ignore_index", ignore_index)
    return temperature, clip_eps, clip_high, dual_clip, kl_coef, kl_clamp, entropy_coef, loss_scale, horizon, ignore_index


def ppo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    kl_clamp: float | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    horizon: float | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str | None = None,
    loss_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO / GRPO actor loss from logits, fused: log-probs, entropy, clipped surrogate, KL penalty,
    entropy bonus and aggregation in one pass, with the logits gradient written in that pass.

    Per token (x = logits / temperature): logp = log softmax(x)[label]; H = entropy of
    softmax(x); r = exp(logp - old_logprobs); P = max(-A r, -A clip(r, 1 - clip_eps,
    1 + clip_eps_high)) and, with dual_clip = c (> 1) and A < 0, P = min(P, -c A);
    L = P + kl_coef * kl_penalty(logp, ref_logprobs, kl_kind, clamp=kl_clamp) - entropy_coef * H (the KL term only
    when kl_coef != 0); loss = aggregate(L, mask, agg, horizon=horizon).

    Args:
        logits: [B, T, V] fp32 / bf16 / fp16 (last stride 1 avoids a copy; a [:, :-1] slice of a
            bigger tensor is fine). Gets the gradient, in its own dtype.
        labels: [B, T] int (aligned with logits, no shift); `ignore_index` tokens count as masked.
        old_logprobs, advantages: [B, T] float, detached targets (no gradient flows to them).
        mask: [B, T] bool or float, 1 = token counts (float values weight the token).
        temperature: logits are divided by it (> 0). Default 1.
        clip_eps / clip_eps_high: lower / upper clip range (upper defaults to clip_eps).
        dual_clip: c > 1 enables dual-clip for negative advantages. Default None.
        ref_logprobs: [B, T] float or None, detached. kl_coef: weight of the KL term (default 0);
            nonzero needs ref_logprobs (ValueError without: a forgotten argument, not "no KL").
        kl_kind: k1 | k2 | k3 | abs (aliases kl, mse, low_var_kl), or verl's straight-through
            k1+ | k3+ | abs+ (value of the base estimator, gradient of k2; see kl_penalty).
            Default "k3".
        kl_clamp: None (default) or c >= 0: the per-token KL is torch.clamp'ed to [-c, c], its
            gradient 0 outside. verl clamps low_var_kl (k3) to [-10, 10]: pass 10.0 to match.
        entropy_coef: weight of the entropy bonus (subtracted). Default 0.
        agg, horizon: see `rlhf_fast.aggregate` (default "token-mean").
        ignore_index: label value of tokens that never count. Default -100.
        inplace_backward: write the gradient into the logits' storage instead of a new [B, T, V]
            buffer (no extra logits-sized memory at all). The caller's logits are CLOBBERED by the
            forward: do not use them afterwards (an autograd op that saved them raises at
            backward, via the version counter). Ignored under torch.compile (the functional op
            is used there). Needs a logits tensor with last stride 1, else a copy is made first;
            ignored, too, for logits whose elements share memory (an expanded tensor).
        backend: None / "auto" / "triton" / "reference" (see `rlhf_fast._backend`).
        loss_scale: > 0, multiplies the returned loss and the gradient (default 1; the stats are
            not scaled). For gradient accumulation over k micro-batches pass 1 / k and call
            loss.backward(): the gradients of (loss / k).backward() without its cost, a pass over
            the [B, T, V] gradient to multiply it by grad_output = 1 / k (the gradient is written
            in the forward, already scaled). Eager mode; under torch.compile the backward makes
            its one traced multiply by grad_output whatever the scale. Range [1e-30, 1e30].
            fp16 with torch.amp.GradScaler: pass loss_scale=scaler.get_scale() and backward
            scaler.scale(loss / scale); scaling afterwards (scaler.scale(loss)) multiplies an fp16
            gradient already rounded at scale 1, whose values below ~6e-5 have lost their digits.

    Returns:
        (loss 0-d fp32, stats), stats holding detached tensors (never synced to the host):
        "logprobs" [B, T] fp32 new log-probs (0 at ignore_index tokens, NaN for a label outside
        [0, V)); "entropy" (masked mean of H); "clipfrac"; "approx_kl" (masked mean of
        old - logp); "ratio_mean"; "ratio_max" (0 for an empty mask); "kl" (masked mean of the KL
        estimate, 0 without a KL term); "policy_loss" (aggregated P alone); "dual_clipfrac" when
        dual_clip is set. An empty mask gives loss 0 and a zero gradient.

    Backward (kernel path; the reference path is plain autograd): the gradient was computed in
    the forward; backward multiplies it by grad_output in place (no work when grad_output == 1).
    Hence a second backward through the same graph (retain_graph=True) is not supported: in
    eager mode it raises RuntimeError; under torch.compile the guard cannot run (it is Python
    state, read once at trace time), so a second backward is not detected there (the compiled
    backward multiplies a functional copy, which gave the right gradient with torch 2.13, but
    this is not guaranteed) -- recompute the loss instead. Under torch.compile grad_output is
    folded in by one traced multiply (one pass over the gradient, also when grad_output == 1;
    see `_backward`).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}")
    check_tensor("labels", labels, dtypes=_INT_DTYPES, ndim=2)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits [B, T] {tuple(logits.shape[:2])}")
    check_tensor("old_logprobs", old_logprobs, ndim=2)
    check_tensor("advantages", advantages, ndim=2)
    if not old_logprobs.is_floating_point():
        raise ValueError(f"old_logprobs must be a float tensor, got {old_logprobs.dtype}")
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be a float tensor, got {advantages.dtype}")
    check_same_shape("labels", labels, "old_logprobs", old_logprobs)
    check_same_shape("labels", labels, "advantages", advantages)
    as_float_mask("mask", mask, labels)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, ndim=2)
        if not ref_logprobs.is_floating_point():
            raise ValueError(f"ref_logprobs must be a float tensor, got {ref_logprobs.dtype}")
        check_same_shape("labels", labels, "ref_logprobs", ref_logprobs)
    device = check_same_device(
        logits=logits,
        labels=labels,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
    )
    (temperature, clip_eps, clip_high, dual_clip, kl_coef, kl_clamp, entropy_coef, loss_scale, horizon,
     ignore_index) = _check_hyper(
        temperature, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_kind, kl_clamp, entropy_coef, agg, horizon,
        ignore_index, loss_scale, ref_logprobs,
    )

    impl = resolve(
        "ppo_loss_from_logits", backend, device, logits, labels, old_logprobs, advantages, mask, ref_logprobs
    )
    if impl == "reference":
        return reference.ppo_loss_from_logits(
            logits,
            labels,
            old_logprobs,
            advantages,
            mask,
            temperature=temperature,
            clip_eps=clip_eps,
            clip_eps_high=clip_high,
            dual_clip=dual_clip,
            ref_logprobs=ref_logprobs,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            kl_clamp=kl_clamp,
            entropy_coef=entropy_coef,
            agg=agg,
            horizon=horizon,
            ignore_index=ignore_index,
            loss_scale=loss_scale,
        )

    V = logits.shape[-1]
    if checks_enabled():  # RLHF_FAST_CHECK=1: a host sync, on request only
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels has values outside [0, {V}) that are not ignore_index={ignore_index}")

    mask = mask.detach()
    counted = (mask != 0) & (labels != ignore_index)
    stat_mask = torch.where(counted, mask.to(torch.float32), 0.0)
    weights = aggregation_weights(stat_mask, agg, horizon=horizon)
    if loss_scale != 1.0:
        # The loss and the gradient are both sums over w_bt (the stats use stat_mask): scaling the
        # weights scales both, in the forward pass that writes the gradient.
        weights = weights * loss_scale
    args = (
        labels,
        old_logprobs.detach(),
        advantages.detach(),
        weights,
        stat_mask,
        None if ref_logprobs is None else ref_logprobs.detach(),
        temperature,
        clip_eps,
        clip_high,
        dual_clip,
        kl_coef,
        _KL_KINDS[kl_kind],
        kl_clamp,
        entropy_coef,
        ignore_index,
    )
    # No gradient wanted (eval, no_grad, frozen logits): the second pass is skipped.
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    if write_grad and inplace_backward and not torch.compiler.is_compiling() and not overlaps_itself(logits):
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        loss, logp, ent, stats_vec = _InplaceBackward.apply(x, *args)
    else:
        loss, logp, ent, _grad, stats_vec = _fwd_op(logits, *args, write_grad)

    stats = {name: stats_vec[i] for i, name in enumerate(_STAT_NAMES)}
    if loss_scale != 1.0:
        stats["policy_loss"] = stats["policy_loss"] / loss_scale  # summed with the scaled weights
    if dual_clip is None:
        del stats["dual_clipfrac"]
    stats["logprobs"] = logp
    return loss, stats
