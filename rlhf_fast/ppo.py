"""PPO per-token losses on [B, T] log-probs / values: the clipped policy loss and the clipped value loss.

    ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
                    dual_clip=None, agg="token-mean", horizon=None, backend=None,
                    loss_scale=1.0) -> (loss, stats)
    ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean",
                   horizon=None, backend=None, loss_scale=1.0) -> (loss, stats)

Fast path: `rlhf_fast.kernels.ppo`. Every aggregation mode weights token (b, t) by m_bt * s_b with
a row scale s_b that depends on the mask alone, so the forward first reduces the mask to those
scales (one cheap pass over the mask), then reads each input once and writes the FINAL per-token
gradient (in the input's dtype) plus per-tile partial sums, which the last program to finish
reduces in a fixed order (deterministic; atomics only on arrival counters) into the loss and the
stats. The two passes are two launches, one after the other (the schedule measured on an H100);
RLHF_FAST_PPO_LAUNCH=fused (one cooperative launch) or =pdl (programmatic dependent launch,
sm_90+) are opt-in schedules not yet run on a GPU; each is deterministic.
The backward only multiplies that gradient by grad_output, in place, and does no work at all
(no host sync either) when grad_output == 1. Hence a second backward through the same graph
(retain_graph=True) raises RuntimeError: the saved gradient was already handed out (and scaled).

Wrapped as custom ops (rlhf_fast::ppo_policy_loss, rlhf_fast::ppo_value_loss and the in-place
rlhf_fast::ppo_scale_grad_) so that torch.compile(fullgraph=True) traces them; outside
torch.compile an autograd.Function calling the same launchers is used instead (less dispatch
overhead). Reference: `rlhf_fast.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast._backend import (
    LOGP_DTYPES,
    check_float,
    check_loss_scale,
    check_same_device,
    check_same_shape,
    check_tensor,
    fp32_outputs,
    fused_grad_dtype,
    kernel_backward,
    register_op,
    resolve,
)
from rlhf_fast.aggregation import check_agg

__all__ = ["ppo_policy_loss", "ppo_value_loss"]

# Stats vectors of the custom ops (order fixed by rlhf_fast.kernels.ppo.POLICY_STATS / VALUE_STATS;
# repeated here so that importing rlhf_fast never imports triton).
_POLICY_STATS = ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max")
_VALUE_STATS = ("vf_clipfrac", "vpred_mean")
_BACKWARD_TWICE = (
    "rlhf_fast PPO loss: backward ran twice through the same graph (retain_graph=True). The "
    "gradient is computed in the forward and scaled by grad_output in place during the first "
    "backward, so it cannot be handed out again; recompute the loss for a second backward."
)

register_op("ppo_policy_loss", triton=True)
register_op("ppo_value_loss", triton=True)


def _kernels():
    from rlhf_fast.kernels import ppo as ppo_kernels  # lazy: importing rlhf_fast never imports triton

    return ppo_kernels


# ----------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("rlhf_fast::ppo_scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    """grad [B, T] (contiguous) *= grad_output (0-d) in place; no work and no host sync when it is 1."""
    _kernels().scale_grad_(grad, grad_output)


@_scale_grad_op.register_fake
def _(grad, grad_output):
    return None


@torch.library.custom_op("rlhf_fast::ppo_policy_loss", mutates_args=())
def _ppo_policy_op(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    agg: str,
    horizon: float,
    write_grad: bool,
    loss_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss 0-d fp32, stats [5] fp32 = [clipfrac, approx_kl, ratio_mean, dual_clipfrac, ratio_max],
    grad [B, T] in logprobs' dtype, fp32 for fp16 (d loss / d logprobs for grad_output = 1; an
    empty (0,) tensor without write_grad)). grad is private to this op's autograd: backward
    scales it in place. loss_scale multiplies the loss and grad, not the stats. horizon: the
    seq-mean-token-sum-norm divisor, 0 for T."""
    return _kernels().ppo_policy_forward(
        logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual_clip, agg, horizon, write_grad, loss_scale
    )


@_ppo_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual_clip, agg, horizon, write_grad, loss_scale):
    f32 = torch.float32
    return (
        logprobs.new_empty((), dtype=f32),
        logprobs.new_empty((len(_POLICY_STATS),), dtype=f32),
        logprobs.new_empty(logprobs.shape if write_grad else (0,), dtype=fused_grad_dtype(logprobs.dtype)),
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
    loss_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss 0-d fp32, stats [2] fp32 = [vf_clipfrac, vpred_mean], grad [B, T] in values' dtype
    (fp32 for fp16) or (0,)); grad, loss_scale and horizon as in rlhf_fast::ppo_policy_loss."""
    return _kernels().ppo_value_forward(
        values, old_values, returns, mask, clip_eps, agg, horizon, write_grad, loss_scale
    )


@_ppo_value_op.register_fake
def _(values, old_values, returns, mask, clip_eps, agg, horizon, write_grad, loss_scale):
    f32 = torch.float32
    return (
        values.new_empty((), dtype=f32),
        values.new_empty((len(_VALUE_STATS),), dtype=f32),
        values.new_empty(values.shape if write_grad else (0,), dtype=fused_grad_dtype(values.dtype)),
    )


def _setup_context(ctx, inputs, output):
    # Only the first input (log-probs / values) gets a gradient; the others are treated as
    # constants (detached) whatever their requires_grad.
    _, stats, grad = output
    ctx.mark_non_differentiable(stats, grad)
    ctx.save_for_backward(grad)
    ctx.write_grad = inputs[-2]  # (..., write_grad, loss_scale)
    ctx.n_inputs = len(inputs)
    ctx.grad_consumed = False


def _backward(ctx, grad_loss, grad_stats, grad_grad):
    grad_input = None
    if ctx.needs_input_grad[0]:
        if not ctx.write_grad:
            raise RuntimeError("rlhf_fast PPO loss: backward called on a forward run with write_grad=False")
        if ctx.grad_consumed:
            raise RuntimeError(_BACKWARD_TWICE)
        ctx.grad_consumed = True
        (grad_input,) = ctx.saved_tensors
        _scale_grad_op(grad_input, grad_loss)
    return (grad_input,) + (None,) * (ctx.n_inputs - 1)


_ppo_policy_op.register_autograd(_backward, setup_context=_setup_context)
_ppo_value_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedLossFunction(torch.autograd.Function):
    """Eager-mode twin of the custom ops above, calling the same launchers.

    A custom op's Python dispatch costs tens of microseconds per call (forward and backward),
    which at the benchmark size ([1024, 8192] fp32, well under 0.1 ms of kernels) is as long as
    the kernels themselves; outside torch.compile this plain autograd.Function skips it. Under
    torch.compile the custom ops are used (opaque to the tracer, with fake impls).
    Returns (loss, stats): the loss as its own 0-d output, so backward gets grad_output directly.
    """

    @staticmethod
    def forward(ctx, forward_launcher, x, *args):
        loss, stats, grad = forward_launcher(x, *args)
        ctx.mark_non_differentiable(stats)
        # The gradient buffer is saved (not kept as a ctx attribute) so that autograd releases it
        # after backward and the caller's .grad can take it over without a copy.
        ctx.save_for_backward(grad)
        ctx.n_args = len(args)
        ctx.grad_consumed = False
        return loss, stats

    @staticmethod
    @kernel_backward  # the gradient is a kernel's buffer: a double backward raises, never drops terms
    def backward(ctx, grad_loss, grad_stats):
        grad_x = None
        if ctx.needs_input_grad[1]:
            if ctx.grad_consumed:
                raise RuntimeError(_BACKWARD_TWICE)
            ctx.grad_consumed = True
            (grad_x,) = ctx.saved_tensors
            _kernels().scale_grad_(grad_x, grad_loss)
        return (None, grad_x) + (None,) * ctx.n_args


def _fused_loss(op, launcher_name: str, x: Tensor, *args) -> tuple[Tensor, Tensor]:
    """(loss, stats vector) through the custom op (under torch.compile) or the eager twin; the
    last of args is loss_scale."""
    if torch.compiler.is_compiling():
        # loss_scale as a traced multiply, not an op argument: Dynamo guards on the value of a
        # custom op's float argument, so every new scale (one per micro-batch, say) would compile
        # again, and fullgraph=True fails after 8. The compiled backward then folds grad_output
        # (= loss_scale) into the gradient in its one pass, as it does for any grad_output.
        *rest, loss_scale = args
        loss, stats, _ = op(x, *rest, 1.0)
        return loss * loss_scale, stats
    return _FusedLossFunction.apply(getattr(_kernels(), launcher_name), x, *args)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_inputs(names: tuple[str, str, str], a: Tensor, b: Tensor, c: Tensor, mask: Tensor) -> None:
    check_tensor(names[0], a, dtypes=LOGP_DTYPES, ndim=2)
    check_tensor(names[1], b, dtypes=LOGP_DTYPES)
    check_tensor(names[2], c, dtypes=LOGP_DTYPES)
    check_tensor("mask", mask)
    check_same_shape(names[0], a, names[1], b)
    check_same_shape(names[0], a, names[2], c)
    check_same_shape(names[0], a, "mask", mask)
    check_same_device(**{names[0]: a, names[1]: b, names[2]: c, "mask": mask})


def _horizon(agg: str, horizon) -> float:
    """The custom ops' horizon argument: 0.0 stands for T (the default), which the launcher reads
    from the shape. Passing T itself would make torch.compile guard on its value (a custom op's
    float argument is a constant of the graph), compiling again for every sequence length."""
    horizon = check_agg(agg, horizon)
    return 0.0 if horizon is None else float(horizon)


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
    loss_scale: float = 1.0,
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
        dual_clip: None (default) or c > 1 (dual-clip PPO, applied where A < 0). verl always
            applies it with c = 3 (clip_ratio_c): pass dual_clip=3.0 to get verl's numbers.
            (verl also clamps the log-ratio to [-20, 20] before exp; that shows only for tokens
            with |logp - old| > 20.) Note the argument order: verl's compute_policy_loss takes
            (old_log_prob, log_prob, advantages, ...).
        agg: "token-mean" (default), "seq-mean-token-sum", "seq-mean-token-mean",
            "seq-mean-token-sum-norm" (see rlhf_fast.aggregate).
        horizon: divisor for "seq-mean-token-sum-norm" (default T).
        backend: None/"auto", "triton" or "reference".
        loss_scale: > 0, multiplies the loss and its gradient, not the stats (default 1). For
            gradient accumulation over k micro-batches pass 1 / k and call loss.backward(): the
            gradient is written in the forward already scaled, where (loss / k).backward() costs
            one more pass over it (eager mode; under torch.compile the scale is a traced multiply
            of the loss, so a new value never recompiles). Range [1e-30, 1e30]. For fp16
            inputs the gradient is kept in fp32 until scaled (then cast), so
            torch.amp.GradScaler's scaler.scale(loss).backward() loses no small gradients.
    Returns:
        loss: 0-d fp32, differentiable w.r.t. logprobs only (the gradient comes back in logprobs'
            dtype). old_logprobs and advantages are treated as constants: even if they require
            grad they receive none.
        stats: dict of detached 0-d fp32 tensors (no host sync): "clipfrac" (masked fraction of
            tokens whose clipped branch is strictly active), "approx_kl" (masked mean of
            old_logprobs - logprobs), "ratio_mean", "ratio_max" (over counted tokens, 0 for an
            empty mask) and, with dual_clip, "dual_clipfrac" (masked fraction where the dual clip
            is strictly active). Masked means divide by sum(mask) (by 1 for an empty mask).
    Uncounted tokens contribute exactly 0 (an inf ratio from a huge log-prob difference there
    never reaches the loss or gradient); an empty mask gives loss 0, gradient 0, stats 0.

    Backward (kernel path): the gradient is written during the forward; backward multiplies it by
    grad_output in place (no work when grad_output == 1). Hence a second backward through the
    same graph (retain_graph=True) raises RuntimeError: recompute the loss instead.
    """
    _check_inputs(("logprobs", "old_logprobs", "advantages"), logprobs, old_logprobs, advantages, mask)
    eps_low = check_float("clip_eps", clip_eps, low=0.0)
    eps_high = eps_low if clip_eps_high is None else check_float("clip_eps_high", clip_eps_high, low=0.0)
    dual_clip = check_float("dual_clip", dual_clip, low=1.0, low_inclusive=False, allow_none=True)
    loss_scale = check_loss_scale(loss_scale)
    h = _horizon(agg, horizon)
    impl = resolve("ppo_policy_loss", backend, logprobs.device, logprobs, old_logprobs, advantages, mask)
    if impl == "reference":
        from rlhf_fast import reference

        return fp32_outputs(
            reference.ppo_policy_loss(
                logprobs,
                old_logprobs,
                advantages,
                mask,
                clip_eps=eps_low,
                clip_eps_high=eps_high,
                dual_clip=dual_clip,
                agg=agg,
                horizon=horizon,
                loss_scale=loss_scale,
            )
        )
    loss, stats_vec = _fused_loss(
        _ppo_policy_op,
        "ppo_policy_forward",
        logprobs,
        old_logprobs.detach(),
        advantages.detach(),
        mask.detach(),
        eps_low,
        eps_high,
        dual_clip,
        agg,
        h,
        _grad_wanted(logprobs),
        loss_scale,
    )
    stats = {name: stats_vec[i] for i, name in enumerate(_POLICY_STATS)}
    if dual_clip is None:
        del stats["dual_clipfrac"]
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    horizon=None,
    backend=None,
    loss_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss per token, aggregated (verl `compute_value_loss`).

    vc = clip(values, old_values - clip_eps, old_values + clip_eps);
    L = 0.5 max((values - returns)^2, (vc - returns)^2);  loss = aggregate(L, mask, agg, horizon=horizon).

    Args:
        values: [B, T] current value predictions, fp32/bf16/fp16 (fp64 accepted), any strides.
        old_values: [B, T] value predictions at rollout time; returns: [B, T] targets. (verl's
            compute_value_loss takes (vpreds, returns, values, ...): a different order.)
        mask: [B, T] bool, integer or float; 1 = token counts.
        clip_eps: value clip range >= 0 (default 0.2), or None for the unclipped loss
            0.5 (values - returns)^2 (OpenRLHF's ValueLoss(clip_eps=None); old_values is then
            not used and may be None, and vf_clipfrac is 0).
        agg, horizon, loss_scale: as in `ppo_policy_loss`.
        backend: None/"auto", "triton" or "reference".
    Returns:
        loss: 0-d fp32, differentiable w.r.t. values only (gradient in values' dtype; old_values
            and returns receive none even if they require grad).
        stats: detached 0-d fp32 tensors "vf_clipfrac" (masked fraction where the clipped term is
            strictly larger) and "vpred_mean" (masked mean of values).
    Backward as in `ppo_policy_loss` (gradient from the forward; a second backward through the
    same graph raises RuntimeError).
    """
    if old_values is None:  # the unclipped loss does not use them (the reference takes None too)
        if clip_eps is not None:
            raise ValueError("old_values is required unless clip_eps=None (the unclipped value loss)")
        old_values = values.detach()
    _check_inputs(("values", "old_values", "returns"), values, old_values, returns, mask)
    eps = check_float("clip_eps", clip_eps, low=0.0, allow_none=True)
    loss_scale = check_loss_scale(loss_scale)
    h = _horizon(agg, horizon)
    impl = resolve("ppo_value_loss", backend, values.device, values, old_values, returns, mask)
    if eps is None and impl != "reference":
        # Unclipped, through the same kernel: clip(v, v - 0, v + 0) = v makes both terms equal.
        old_values, eps = values, 0.0
    if impl == "reference":
        from rlhf_fast import reference

        return fp32_outputs(
            reference.ppo_value_loss(
                values, old_values, returns, mask, clip_eps=eps, agg=agg, horizon=horizon, loss_scale=loss_scale
            )
        )
    loss, stats_vec = _fused_loss(
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
        loss_scale,
    )
    stats = {name: stats_vec[i] for i, name in enumerate(_VALUE_STATS)}
    return loss, stats
