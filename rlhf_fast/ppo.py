"""PPO per-token losses on [B, T] log-probs / values: the clipped policy loss and the clipped value loss.

    ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
                    dual_clip=None, agg="token-mean", horizon=None, backend=None) -> (loss, stats)
    ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean",
                   horizon=None, backend=None) -> (loss, stats)

Fast path: `rlhf_fast.kernels.ppo`. The forward is one fused Triton kernel that reads each input
once and writes the per-token gradient (before the aggregation weights) plus per-tile partial
sums, then a one-program finalize kernel reduces those (deterministically, no atomics) into the
loss, the stats and the per-row aggregation scales; the backward is one Triton kernel scaling
the saved gradient by the row scale and grad_output. Wrapped as custom ops
(rlhf_fast::ppo_policy_loss, rlhf_fast::ppo_value_loss, rlhf_fast::ppo_scale_grad) so that
torch.compile(fullgraph=True) traces them; outside torch.compile an autograd.Function calling the
same launchers is used instead (less dispatch overhead). Reference: `rlhf_fast.reference`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast._backend import (
    FLOAT_DTYPES,
    check_same_device,
    check_same_shape,
    check_tensor,
    register_op,
    resolve,
)
from rlhf_fast.aggregation import check_agg

__all__ = ["ppo_policy_loss", "ppo_value_loss"]

_INPUT_DTYPES = (*FLOAT_DTYPES, torch.float64)
# Output vectors of the custom ops: [loss, stats...] (order fixed by rlhf_fast.kernels.ppo).
_POLICY_OUT = ("loss", "clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max")
_VALUE_OUT = ("loss", "vf_clipfrac", "vpred_mean")

register_op("ppo_policy_loss", triton=True)
register_op("ppo_value_loss", triton=True)


# ----------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("rlhf_fast::ppo_scale_grad", mutates_args=())
def _scale_grad_op(g: Tensor, scale: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """grad [B, T] (dtype) = g [B, T] fp32 * scale [B] fp32 (per row) * grad_out (0-d)."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    return ppo_kernels.scale_grad(g, scale, grad_out, dtype)


@_scale_grad_op.register_fake
def _(g, scale, grad_out, dtype):
    return g.new_empty(g.shape, dtype=dtype)


@torch.library.custom_op("rlhf_fast::ppo_policy_loss", mutates_args=())
def _ppo_policy_op(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    horizon: float,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out [6] fp32 = [loss, clipfrac, approx_kl, ratio_mean, dual_clipfrac, ratio_max],
    g [B, T] fp32 (or (0,) without write_grad), row scales [B] fp32)."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    return ppo_kernels.ppo_policy_forward(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, horizon, write_grad
    )


@_ppo_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, horizon, write_grad):
    B, T = logprobs.shape
    f32 = torch.float32
    return (
        logprobs.new_empty((len(_POLICY_OUT),), dtype=f32),
        logprobs.new_empty((B, T) if write_grad else (0,), dtype=f32),
        logprobs.new_empty((B,), dtype=f32),
    )


@torch.library.custom_op("rlhf_fast::ppo_value_loss", mutates_args=())
def _ppo_value_op(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    agg: str,
    horizon: float,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out [3] fp32 = [loss, vf_clipfrac, vpred_mean], g [B, T] fp32 or (0,), row scales [B])."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    return ppo_kernels.ppo_value_forward(values, old_values, returns, mask, clip_eps, agg, horizon, write_grad)


@_ppo_value_op.register_fake
def _(values, old_values, returns, mask, clip_eps, agg, horizon, write_grad):
    B, T = values.shape
    f32 = torch.float32
    return (
        values.new_empty((len(_VALUE_OUT),), dtype=f32),
        values.new_empty((B, T) if write_grad else (0,), dtype=f32),
        values.new_empty((B,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    # Only the first input (log-probs / values) gets a gradient; the others are treated as
    # constants (detached) whatever their requires_grad.
    _, g, scale = output
    ctx.mark_non_differentiable(g, scale)
    ctx.save_for_backward(g, scale)
    ctx.input_dtype = inputs[0].dtype
    ctx.write_grad = inputs[-1]
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out, grad_g, grad_scale):
    g, scale = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        if not ctx.write_grad:
            raise RuntimeError("rlhf_fast PPO loss: backward called on a forward run with write_grad=False")
        # Only the loss (entry 0) is differentiable; the stats entries have no gradient path.
        grad_input = _scale_grad_op(g, scale, grad_out[0], ctx.input_dtype)
    return (grad_input,) + (None,) * (ctx.n_inputs - 1)


_ppo_policy_op.register_autograd(_backward, setup_context=_setup_context)
_ppo_value_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedLossFunction(torch.autograd.Function):
    """Eager-mode twin of the custom ops above, calling the same launchers.

    A custom op's Python dispatch costs tens of microseconds per call (forward and backward),
    which at the benchmark size ([1024, 8192] fp32, ~0.08 ms of kernels) is as long as the
    kernels themselves; outside torch.compile this plain autograd.Function skips it. Under
    torch.compile the custom ops are used (opaque to the tracer, with fake impls).
    """

    @staticmethod
    def forward(ctx, forward_launcher, x, *args):
        out, g, scale = forward_launcher(x, *args)
        ctx.save_for_backward(g, scale)
        ctx.input_dtype = x.dtype
        ctx.n_args = len(args)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[1]:
            from rlhf_fast.kernels import ppo as ppo_kernels

            grad_x = ppo_kernels.scale_grad(g, scale, grad_out[0], ctx.input_dtype)
        return (None, grad_x) + (None,) * ctx.n_args


def _fused_loss(op, launcher_name: str, x: Tensor, *args) -> Tensor:
    """out = [loss, stats...] through the custom op (under torch.compile) or the eager twin."""
    if torch.compiler.is_compiling():
        out, _, _ = op(x, *args)
        return out
    from rlhf_fast.kernels import ppo as ppo_kernels

    return _FusedLossFunction.apply(getattr(ppo_kernels, launcher_name), x, *args)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_number(name: str, value, *, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _check_inputs(names: tuple[str, str, str], a: Tensor, b: Tensor, c: Tensor, mask: Tensor) -> None:
    check_tensor(names[0], a, dtypes=_INPUT_DTYPES, ndim=2)
    check_tensor(names[1], b, dtypes=_INPUT_DTYPES)
    check_tensor(names[2], c, dtypes=_INPUT_DTYPES)
    check_tensor("mask", mask)
    check_same_shape(names[0], a, names[1], b)
    check_same_shape(names[0], a, names[2], c)
    check_same_shape(names[0], a, "mask", mask)
    check_same_device(**{names[0]: a, names[1]: b, names[2]: c, "mask": mask})


def _horizon(agg: str, horizon, T: int) -> float:
    check_agg(agg, horizon)
    return float(T if horizon is None else horizon)


def _grad_wanted(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


# ----------------------------------------------------------------------------------------------
# Public functions


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    horizon=None,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss per token, aggregated (verl `compute_policy_loss`).

    r = exp(logprobs - old_logprobs);  L = max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high));
    with dual_clip = c and A < 0:  L = min(L, -c A).  loss = aggregate(L, mask, agg, horizon=horizon).

    Args:
        logprobs: [B, T] current policy log-probs, fp32/bf16/fp16 (fp64 accepted), any strides.
        old_logprobs: [B, T] behaviour-policy log-probs (any of those dtypes).
        advantages: [B, T] (any of those dtypes).
        mask: [B, T] bool, integer or float; 1 = token counts (a float mask weights the token).
        clip_eps: lower clip range eps_low >= 0 (default 0.2).
        clip_eps_high: upper clip range eps_high >= 0 (DAPO clip-higher); default clip_eps.
        dual_clip: None (default) or c > 1 (dual-clip PPO, applied where A < 0).
        agg: "token-mean" (default), "seq-mean-token-sum", "seq-mean-token-mean",
            "seq-mean-token-sum-norm" (see rlhf_fast.aggregate).
        horizon: divisor for "seq-mean-token-sum-norm" (default T).
        backend: None/"auto", "triton" or "reference".
    Returns:
        loss: 0-d fp32, differentiable w.r.t. logprobs only (the gradient comes back in logprobs'
            dtype). old_logprobs and advantages are treated as constants: even if they require
            grad they receive none.
        stats: dict of detached 0-d fp32 tensors (no host sync): "clipfrac" (masked fraction of
            tokens whose clipped branch is strictly active), "approx_kl" (masked mean of
            old_logprobs - logprobs), "ratio_mean", "ratio_max" (over counted tokens, 0 for an
            empty mask) and, with dual_clip, "dual_clipfrac" (masked fraction where the dual clip
            is strictly active). Masked means divide by max(sum(mask), 1).
    Uncounted tokens contribute exactly 0 (an inf ratio from a huge log-prob difference there
    never reaches the loss or gradient); an empty mask gives loss 0, gradient 0, stats 0.
    """
    _check_inputs(("logprobs", "old_logprobs", "advantages"), logprobs, old_logprobs, advantages, mask)
    eps_low = _check_number("clip_eps", clip_eps, minimum=0.0)
    eps_high = eps_low if clip_eps_high is None else _check_number("clip_eps_high", clip_eps_high, minimum=0.0)
    if dual_clip is not None:
        dual_clip = _check_number("dual_clip", dual_clip, minimum=1.0, strict=True)
    h = _horizon(agg, horizon, logprobs.shape[-1])
    impl = resolve("ppo_policy_loss", backend, logprobs.device)
    if impl == "reference":
        from rlhf_fast import reference

        return reference.ppo_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_eps=clip_eps,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            agg=agg,
            horizon=horizon,
        )
    out = _fused_loss(
        _ppo_policy_op,
        "ppo_policy_forward",
        logprobs,
        old_logprobs.detach(),
        advantages.detach(),
        mask.detach(),
        1.0 - eps_low,
        1.0 + eps_high,
        dual_clip,
        agg,
        h,
        _grad_wanted(logprobs),
    )
    values = out.detach()
    stats = {name: values[i] for i, name in enumerate(_POLICY_OUT) if i > 0}
    if dual_clip is None:
        del stats["dual_clipfrac"]
    return out[0], stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
    horizon=None,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss per token, aggregated (verl `compute_value_loss`).

    vc = clip(values, old_values - clip_eps, old_values + clip_eps);
    L = 0.5 max((values - returns)^2, (vc - returns)^2);  loss = aggregate(L, mask, agg, horizon=horizon).

    Args:
        values: [B, T] current value predictions, fp32/bf16/fp16 (fp64 accepted), any strides.
        old_values: [B, T] value predictions at rollout time; returns: [B, T] targets.
        mask: [B, T] bool, integer or float; 1 = token counts.
        clip_eps: value clip range >= 0 (default 0.2).
        agg, horizon: as in `ppo_policy_loss`.
        backend: None/"auto", "triton" or "reference".
    Returns:
        loss: 0-d fp32, differentiable w.r.t. values only (gradient in values' dtype; old_values
            and returns receive none even if they require grad).
        stats: detached 0-d fp32 tensors "vf_clipfrac" (masked fraction where the clipped term is
            strictly larger) and "vpred_mean" (masked mean of values).
    """
    _check_inputs(("values", "old_values", "returns"), values, old_values, returns, mask)
    eps = _check_number("clip_eps", clip_eps, minimum=0.0)
    h = _horizon(agg, horizon, values.shape[-1])
    impl = resolve("ppo_value_loss", backend, values.device)
    if impl == "reference":
        from rlhf_fast import reference

        return reference.ppo_value_loss(values, old_values, returns, mask, clip_eps=clip_eps, agg=agg, horizon=horizon)
    out = _fused_loss(
        _ppo_value_op,
        "ppo_value_forward",
        values,
        old_values.detach(),
        returns.detach(),
        mask.detach(),
        eps,
        agg,
        h,
        _grad_wanted(values),
    )
    stats_values = out.detach()
    stats = {name: stats_values[i] for i, name in enumerate(_VALUE_OUT) if i > 0}
    return out[0], stats
