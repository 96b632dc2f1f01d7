"""DPO-family preference losses: per pair from sequence log-probs, or straight from logits.

Formulas of TRL's ``DPOTrainer.dpo_loss`` (and ``CPOTrainer`` for SimPO), written from the math
(see ``rlhf_fast.reference.dpo_loss`` for the list). Layers: the fused Triton kernels and
launchers in ``rlhf_fast.kernels.dpo``; here the custom ops ``rlhf_fast::dpo_pair_loss`` and
``rlhf_fast::dpo_pair_loss_bwd`` (fake impls + autograd, so ``torch.compile(fullgraph=True)``
traces them) and the documented public functions.

``dpo_loss_from_logits`` is a composition: ``rlhf_fast.sequence_logprobs`` (forward one read of
the logits, backward one read + one write) -> split the 2B rows into chosen / rejected ->
``dpo_loss`` -> mean over pairs. No fp32 [2B, T, V] intermediate is ever built.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf_fast._backend import (
    FLOAT_DTYPES,
    LOGP_DTYPES,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
    fp32_outputs,
    register_op,
    resolve,
    saveable,
)

# DPO_LOSS_TYPES: every accepted loss_type (TRL's DPOTrainer types + simpo);
# DPO_LABEL_SMOOTHING_TYPES: the ones whose formula uses label_smoothing (the others reject a
# non-zero value).
from rlhf_fast.reference import DPO_LABEL_SMOOTHING_TYPES, DPO_LOSS_TYPES, _dpo_reward_stats
from rlhf_fast.token_logprobs import LABEL_DTYPES

__all__ = ["dpo_loss", "dpo_loss_from_logits", "DPO_LOSS_TYPES"]

register_op("dpo_loss", triton=True)
register_op("dpo_loss_from_logits", triton=True)


def _kernels():
    # Imported lazily so that importing rlhf_fast never imports triton.
    from rlhf_fast.kernels import dpo as kernels

    return kernels


# ----------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("rlhf_fast::dpo_pair_loss_bwd", mutates_args=())
def _dpo_pair_loss_bwd(
    grad_loss: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    beta: float,
    loss_type: str,
    label_smoothing: float,
    gamma: float,
    discopop_tau: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_pc, grad_pr, grad_rc, grad_rr), each in its input's dtype; without reference
    tensors the last two are empty placeholders."""
    grads = _kernels().dpo_pair_backward(
        grad_loss,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        gamma=gamma,
        discopop_tau=discopop_tau,
    )
    # Distinct placeholders: custom-op outputs may not alias each other.
    return tuple(policy_chosen_logps.new_empty(0) if g is None else g for g in grads)


def _uses_ref(ref_chosen_logps: Optional[Tensor], loss_type: str) -> bool:
    return ref_chosen_logps is not None and loss_type != "simpo"


@_dpo_pair_loss_bwd.register_fake
def _(grad_loss, pc, pr, rc, rr, beta, loss_type, label_smoothing, gamma, discopop_tau):
    if _uses_ref(rc, loss_type):
        return torch.empty_like(pc), torch.empty_like(pr), torch.empty_like(rc), torch.empty_like(rr)
    return torch.empty_like(pc), torch.empty_like(pr), pc.new_empty(0), pc.new_empty(0)


@torch.library.custom_op("rlhf_fast::dpo_pair_loss", mutates_args=())
def _dpo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    beta: float,
    loss_type: str,
    label_smoothing: float,
    gamma: float,
    discopop_tau: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen_rewards, rejected_rewards) [B] fp32; reference tensors None = reference-free."""
    return _kernels().dpo_pair_forward(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        gamma=gamma,
        discopop_tau=discopop_tau,
    )


@_dpo_pair_loss.register_fake
def _(pc, pr, rc, rr, beta, loss_type, label_smoothing, gamma, discopop_tau):
    shape = pc.shape
    return (
        pc.new_empty(shape, dtype=torch.float32),
        pc.new_empty(shape, dtype=torch.float32),
        pc.new_empty(shape, dtype=torch.float32),
    )


def _pair_setup_context(ctx, inputs, output):
    pc, pr, rc, rr, beta, loss_type, label_smoothing, gamma, discopop_tau = inputs
    ctx.hyper = (beta, loss_type, label_smoothing, gamma, discopop_tau)
    ctx.save_for_backward(*saveable(pc, pr, rc, rr))


def _pair_backward(ctx, grad_loss, grad_chosen_rewards, grad_rejected_rewards):
    # The rewards are statistics (the public function detaches them): their gradients are ignored.
    pc, pr, rc, rr = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros(pc.shape, dtype=torch.float32, device=pc.device)
    beta, loss_type, label_smoothing, gamma, discopop_tau = ctx.hyper
    gpc, gpr, grc, grr = torch.ops.rlhf_fast.dpo_pair_loss_bwd(
        grad_loss, pc, pr, rc, rr, beta, loss_type, label_smoothing, gamma, discopop_tau
    )
    if not _uses_ref(rc, loss_type):
        grc = grr = None
    needs = ctx.needs_input_grad
    return (
        gpc if needs[0] else None,
        gpr if needs[1] else None,
        grc if needs[2] else None,
        grr if needs[3] else None,
        None,
        None,
        None,
        None,
        None,
    )


_dpo_pair_loss.register_autograd(_pair_backward, setup_context=_pair_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_hyper(beta, loss_type, label_smoothing, gamma, discopop_tau):
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
    beta = check_float("beta", beta, low=0.0, low_inclusive=False)
    ls = check_float("label_smoothing", label_smoothing)
    gamma = check_float("gamma", gamma)
    tau = check_float("discopop_tau", discopop_tau, low=0.0, low_inclusive=False)
    if ls != 0.0 and loss_type not in DPO_LABEL_SMOOTHING_TYPES:
        raise ValueError(
            f"label_smoothing={ls} has no meaning for loss_type={loss_type!r} "
            f"(used by {DPO_LABEL_SMOOTHING_TYPES}); pass 0.0"
        )
    check_float("label_smoothing", ls, low=0.0, high=1.0)
    if loss_type == "robust" and not ls < 0.5:
        raise ValueError(f"label_smoothing must be < 0.5 for loss_type='robust' (divides by 1 - 2*ls), got {ls}")
    if loss_type == "exo_pair" and not ls < 1.0:
        raise ValueError(f"label_smoothing must be < 1 for loss_type='exo_pair' (uses log(1 - ls)), got {ls}")
    return beta, ls, gamma, tau


def _check_pairs(pc, pr, rc, rr, no_ref: bool):
    check_tensor("policy_chosen_logps", pc, dtypes=LOGP_DTYPES, ndim=1)
    check_tensor("policy_rejected_logps", pr, dtypes=LOGP_DTYPES, ndim=1)
    if pr.shape != pc.shape:
        raise ValueError(
            f"policy_rejected_logps shape {tuple(pr.shape)} does not match policy_chosen_logps shape {tuple(pc.shape)}"
        )
    for name, t in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
        if t is None:
            if not no_ref:
                raise ValueError(f"{name} is required unless reference_free=True or loss_type='simpo'")
            continue
        check_tensor(name, t, dtypes=LOGP_DTYPES, ndim=1)
        if t.shape != pc.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match policy_chosen_logps shape {tuple(pc.shape)}"
            )
    return check_same_device(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr
    )


# ----------------------------------------------------------------------------------------------
# Public API


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    gamma: float = 0.5,
    discopop_tau: float = 0.05,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family preference losses from sequence log-probs.

    Formulas of TRL's ``DPOTrainer.dpo_loss`` up to TRL 0.28 (``CPOTrainer`` for ``simpo``),
    checked numerically against that source for every type (fp32 rounding apart). With
    d = (pi_c - pi_r) - (ref_c - ref_r), a = pi_c - ref_c, b = pi_r - ref_r, x = beta * d,
    eps = label_smoothing, s = sigmoid, logs = logsigmoid:

    ============ ==================================================================================
    sigmoid      -logs(x)(1 - eps) - logs(-x) eps  (DPO; eps > 0 is conservative DPO, cDPO)
    hinge        relu(1 - x)  (SLiC)
    ipo          (d - 1/(2 beta))^2  (IPO; pass length-averaged log-probs for the normalised form)
    robust       (-logs(x)(1 - eps) + logs(-x) eps) / (1 - 2 eps)  (rDPO, eps < 0.5)
    exo_pair     s(x)(logs(x) - log(1 - eps)) + s(-x)(logs(-x) - log eps); eps = 1e-3 when 0 is
                 given, as TRL does  (EXO)
    nca_pair     -logs(beta a) - logs(-beta a)/2 - logs(-beta b)/2  (NCA)
    bco_pair     -logs(beta a - delta) - logs(-(beta b - delta)), delta = detached mean of
                 cat(beta a, beta b) over this batch. TRL instead keeps a running mean over
                 steps (an equal-weight mean of the per-step batch means, pooled across
                 processes): its first step equals this, later steps differ  (BCO)
    sppo_hard    (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2  (SPPO, hard labels)
    apo_zero     (1 - s(beta a)) + s(beta b)  (APO-zero)
    apo_down     s(beta a) + (1 - s(x))  (APO-down)
    discopop     m = s(x / tau): -logs(x)(1 - m) + exp(-x) m  (DiscoPOP / LRML; TRL divides the
                 beta-scaled logit by tau). exp(-x) m is evaluated as exp(-x + logs(x / tau)):
                 equal where TRL's value is finite, and finite (instead of inf * 0 = NaN) for
                 x << 0, where TRL's fp32 formula breaks down.
    simpo        y = beta (pi_c - pi_r) - gamma: -logs(y)(1 - eps) - logs(-y) eps; always
                 reference-free (pass length-averaged log-probs, as SimPO does)  (SimPO)
    ============ ==================================================================================

    Differences from TRL a user comparing numbers will meet:
      - ``reference_free=True`` takes every reference log-prob as 0, in every loss type and in
        the rewards (beta * pi). TRL (up to 0.28; later versions dropped the option) drops the
        reference only from d, a and b of sigmoid, hinge, ipo, robust, exo_pair, apo_zero and
        apo_down; its nca_pair, bco_pair, sppo_hard, discopop and rewards still use it.
      - ``ipo`` uses the log-probs as given. TRL length-averages them for IPO inside its forward
        pass; pass averaged ones (``dpo_loss_from_logits(..., average=True)``) to match.
      - A label_smoothing that the loss type does not use raises ValueError (TRL warns and
        ignores it).
      - Newer TRL (after its DPO refactor of 2026) changed three types: its sigmoid ignores
        label_smoothing, its bco_pair has no delta, and its exo_pair requires
        label_smoothing > 0.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] policy sequence log-probs (fp32, bf16,
            fp16 or fp64; math in fp32 on the kernel path). Differentiable.
        ref_chosen_logps, ref_rejected_logps: [B] reference-model sequence log-probs (may also
            require grad: they get gradients too). May be None when ``reference_free`` or
            ``loss_type="simpo"``. From a reference model's logits::

                with torch.no_grad():
                    ref = rlhf_fast.sequence_logprobs(ref_logits, labels, mask)
                ref_chosen_logps, ref_rejected_logps = ref[:B], ref[B:]

        beta: > 0 (default 0.1).
        loss_type: one of the names above (default "sigmoid").
        label_smoothing: eps in [0, 1] for sigmoid / simpo, [0, 0.5) for robust, [0, 1) for
            exo_pair; any other loss type raises ValueError when it is not 0 (default 0.0).
        reference_free: drop the reference terms (ref log-probs taken as 0) (default False).
        gamma: SimPO's target reward margin; used by ``simpo`` only (default 0.5, TRL's
            ``simpo_gamma``).
        discopop_tau: DiscoPOP's temperature, > 0; used by ``discopop`` only (default 0.05).
        backend: None/"auto", "triton" or "reference" (see ``rlhf_fast._backend``).

    Returns:
        (losses [B] fp32, chosen_rewards [B] fp32, rejected_rewards [B] fp32); the rewards are
        beta * (pi - ref) (beta * pi when reference-free), detached. Gradients come back in each
        input's dtype. |beta * d| up to 1e4 and beyond gives finite losses and gradients.

    Kernel path: one launch forward (loss and rewards), one launch backward (all four
    gradients); bco_pair's batch mean is one small torch reduction on device (no host sync).
    """
    beta, ls, gamma, tau = _check_hyper(beta, loss_type, label_smoothing, gamma, discopop_tau)
    no_ref = bool(reference_free) or loss_type == "simpo"
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    device = _check_pairs(pc, pr, rc, rr, no_ref)
    impl = resolve("dpo_loss", backend, device, pc, pr, rc, rr)
    if impl == "reference":
        from rlhf_fast import reference

        return fp32_outputs(
            reference.dpo_loss(
                pc,
                pr,
                rc,
                rr,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=ls,
                reference_free=bool(reference_free),
                gamma=gamma,
                discopop_tau=tau,
            )
        )
    if no_ref:
        rc = rr = None
    losses, chosen_rewards, rejected_rewards = torch.ops.rlhf_fast.dpo_pair_loss(
        pc, pr, rc, rr, beta, loss_type, ls, gamma, tau
    )
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reference_free: bool = False,
    gamma: float = 0.5,
    discopop_tau: float = 0.05,
    backend: str | None = None,
) -> tuple[Tensor, dict]:
    """DPO-family loss straight from the policy's logits of the concatenated batch.

    Equivalent to (and on the kernel path composed of)::

        seq = rlhf_fast.sequence_logprobs(logits, labels, mask, average=average,
                                          temperature=temperature, ignore_index=ignore_index)
        losses, chosen_r, rejected_r = rlhf_fast.dpo_loss(seq[:B], seq[B:], ref_chosen_logps,
                                                         ref_rejected_logps, beta=..., ...)
        loss = losses.mean()

    Args:
        logits: [2B, T, V] fp32, bf16 or fp16 (last dim contiguous): the first B rows are the
            chosen completions, the last B the rejected ones (TRL's concatenated forward).
        labels: [2B, T] int64 (or int32), aligned with ``logits`` (no shift inside).
        mask: [2B, T] bool or float (1 = token counts), or None (all tokens count). Tokens whose
            label is ``ignore_index`` never count. A row with no counted token has log-prob 0
            (finite loss, 0 gradient into its logits).
        ref_chosen_logps, ref_rejected_logps: [B] reference sequence log-probs (compute them with
            ``torch.no_grad()`` and ``rlhf_fast.sequence_logprobs(ref_logits, labels, mask,
            average=average)``); None allowed when reference-free / simpo.
        beta, loss_type, label_smoothing, reference_free, gamma, discopop_tau: as ``dpo_loss``.
        average: length-average the sequence log-probs (IPO's normalised form, SimPO) (default
            False). TRL always averages for ``loss_type="ipo"``: pass True to match it.
        temperature: divides the logits before the softmax (default 1.0).
        ignore_index: default -100.
        backend: None/"auto", "triton" or "reference".

    Returns:
        (loss, stats): loss 0-d fp32, the mean of the per-pair losses (differentiable w.r.t.
        ``logits`` and the reference log-probs; gradient in logits.dtype). stats (detached):
        ``chosen_rewards``, ``rejected_rewards`` (batch means), ``reward_accuracy`` (fraction
        of pairs with chosen reward > rejected reward), ``reward_margin`` (mean of chosen -
        rejected reward), ``policy_chosen_logps`` [B], ``policy_rejected_logps`` [B].

    Kernel path: forward reads the logits once, backward reads them once and writes the
    gradient once; the per-pair math is two tiny launches on [B].
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}")
    n_rows = logits.shape[0]
    if n_rows == 0 or n_rows % 2 != 0:
        raise ValueError(
            "logits first dim must be even and > 0 (B chosen rows then B rejected rows), "
            f"got shape {tuple(logits.shape)}"
        )
    B = n_rows // 2
    rows_shape = tuple(logits.shape[:2])
    check_tensor("labels", labels, dtypes=LABEL_DTYPES, ndim=2)
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    ignore_index = check_int("ignore_index", ignore_index)
    if labels.shape != rows_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits [2B, T] = {rows_shape}")
    if mask is not None:
        check_tensor("mask", mask, ndim=2)
        if mask.shape != rows_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits [2B, T] = {rows_shape}")
    beta, ls, gamma, tau = _check_hyper(beta, loss_type, label_smoothing, gamma, discopop_tau)
    no_ref = bool(reference_free) or loss_type == "simpo"
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is None:
            if not no_ref:
                raise ValueError(f"{name} is required unless reference_free=True or loss_type='simpo'")
            continue
        check_tensor(name, t, dtypes=LOGP_DTYPES, ndim=1)
        if t.shape[0] != B:
            raise ValueError(
                f"{name} must have shape [B] = ({B},) (logits has 2B = {n_rows} rows), got {tuple(t.shape)}"
            )
    device = check_same_device(
        logits=logits,
        labels=labels,
        mask=mask,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    impl = resolve("dpo_loss_from_logits", backend, device, logits, labels, mask, ref_chosen_logps, ref_rejected_logps)
    if impl == "reference":
        from rlhf_fast import reference

        return fp32_outputs(
            reference.dpo_loss_from_logits(
                logits,
                labels,
                mask,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=ls,
                average=average,
                temperature=temperature,
                ignore_index=ignore_index,
                reference_free=bool(reference_free),
                gamma=gamma,
                discopop_tau=tau,
            )
        )
    from rlhf_fast.token_logprobs import sequence_logprobs

    seq = sequence_logprobs(
        logits, labels, mask, average=average, temperature=temperature, ignore_index=ignore_index, backend=impl
    )
    chosen, rejected = seq[:B], seq[B:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen,
        rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=ls,
        reference_free=reference_free,
        gamma=gamma,
        discopop_tau=tau,
        backend=impl,
    )
    return losses.mean(), _dpo_reward_stats(chosen_rewards, rejected_rewards, chosen, rejected)
