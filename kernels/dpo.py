"""Per-pair DPO-family losses: fused Triton forward and backward kernels + launchers.

Inputs are four [B] vectors of sequence log-probs (policy chosen/rejected, reference
chosen/rejected; any float dtype, math in fp32). With a = pi_c - ref_c, b = pi_r - ref_r
(reference-free: a = pi_c, b = pi_r) and the DPO logit d = (pi_c - pi_r) - (ref_c - ref_r),
every loss type is a function of (a, b) and one kernel evaluates it per pair:

    forward  (one launch): loss [B] fp32, chosen_rewards = beta*a, rejected_rewards = beta*b
    backward (one launch): dL/dpi_c = g*dL/da, dL/dpi_r = g*dL/db, dL/dref_c = -g*dL/da,
                           dL/dref_r = -g*dL/db  (g = grad of the per-pair loss), input dtypes

The loss type is a tl.constexpr mode switch (each mode is a different function); beta,
label_smoothing, the SimPO margin, the DiscoPOP tau and the EXO log-targets are runtime floats.
bco_pair needs the batch mean of the rewards: the launcher takes it as a 1-element fp32 tensor
computed on device (no host sync).

Every log-sigmoid is evaluated as min(x, 0) - log1p(exp(-|x|)) and every sigmoid from
exp(-|x|), so |beta*d| up to 1e4 and beyond gives finite values and no NaN. DiscoPOP's
exp(-s) * sigmoid(s/tau) is evaluated as exp(-s + logsigmoid(s/tau)) (same value, no inf*0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import on_input_device

# Mode numbers of the kernels' LOSS_MODE switch. SimPO runs the sigmoid mode with a margin and no
# reference terms.
LOSS_MODES = {
    "sigmoid": 0,
    "hinge": 1,
    "ipo": 2,
    "robust": 3,
    "exo_pair": 4,
    "nca_pair": 5,
    "bco_pair": 6,
    "sppo_hard": 7,
    "apo_zero": 8,
    "apo_down": 9,
    "discopop": 10,
    "simpo": 0,
}

# One program handles BLOCK pairs. B is at most a few thousand: a handful of programs.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _log1p(u):
    # log(1 + u) accurate for tiny u >= 0 without libdevice: log(w) * u / (w - 1) with w = 1 + u
    # cancels the rounding of w (Goldberg); w == 1 means u is below fp32 resolution: log1p(u) = u.
    w = 1.0 + u
    denom = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.where(w == 1.0, u, tl.log(w) * u / denom)


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load_pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, valid, USE_REF: tl.constexpr):
    pc = tl.load(pc_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if USE_REF:
        rc = tl.load(rc_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        rr = tl.load(rr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        a = pc - rc
        b = pr - rr
    else:
        a = pc
        b = pr
    # The DPO logit (pi_c - pi_r) - (ref_c - ref_r), rounded as (pi_c - ref_c) - (pi_r - ref_r).
    d = a - b
    return a, b, d


@triton.jit
def _dpo_pair_fwd_kernel(
    pc_ptr,
    pr_ptr,
    rc_ptr,
    rr_ptr,
    delta_ptr,
    loss_ptr,
    chosen_reward_ptr,
    rejected_reward_ptr,
    B,
    beta,
    label_smoothing,
    margin,
    tau,
    log_keep,
    log_flip,
    LOSS_MODE: tl.constexpr,
    USE_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < B
    a, b, d = _load_pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, valid, USE_REF)
    ls = label_smoothing
    if LOSS_MODE == 0:  # sigmoid (cDPO label smoothing) / simpo (margin)
        x = beta * d - margin
        loss = -_logsigmoid(x) * (1.0 - ls) - _logsigmoid(-x) * ls
    elif LOSS_MODE == 1:  # hinge
        r = 1.0 - beta * d
        loss = tl.where(r < 0.0, 0.0, r)  # relu that keeps a NaN (bad label upstream) as NaN, as torch
    elif LOSS_MODE == 2:  # ipo
        r = d - 0.5 / beta
        loss = r * r
    elif LOSS_MODE == 3:  # robust
        x = beta * d
        loss = (-_logsigmoid(x) * (1.0 - ls) + _logsigmoid(-x) * ls) / (1.0 - 2.0 * ls)
    elif LOSS_MODE == 4:  # exo_pair
        x = beta * d
        loss = _sigmoid(x) * (_logsigmoid(x) - log_keep) + _sigmoid(-x) * (_logsigmoid(-x) - log_flip)
    elif LOSS_MODE == 5:  # nca_pair
        cr = beta * a
        rj = beta * b
        loss = -_logsigmoid(cr) - 0.5 * _logsigmoid(-cr) - 0.5 * _logsigmoid(-rj)
    elif LOSS_MODE == 6:  # bco_pair
        delta = tl.load(delta_ptr).to(tl.float32)
        loss = -_logsigmoid(beta * a - delta) - _logsigmoid(-(beta * b - delta))
    elif LOSS_MODE == 7:  # sppo_hard
        half_inv_beta = 0.5 / beta
        ra = a - half_inv_beta
        rb = b + half_inv_beta
        loss = ra * ra + rb * rb
    elif LOSS_MODE == 8:  # apo_zero
        loss = (1.0 - _sigmoid(beta * a)) + _sigmoid(beta * b)
    elif LOSS_MODE == 9:  # apo_down
        loss = _sigmoid(beta * a) + (1.0 - _sigmoid(beta * (a - b)))
    else:  # discopop
        s = beta * d
        q = s / tau
        # TRL: -logsigmoid(s) * (1 - sigmoid(q)) + exp(-s) * sigmoid(q); the second product as one exp.
        loss = -_logsigmoid(s) * _sigmoid(-q) + tl.exp(-s + _logsigmoid(q))
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(chosen_reward_ptr + offs, beta * a, mask=valid)
    tl.store(rejected_reward_ptr + offs, beta * b, mask=valid)


@triton.jit
def _dpo_pair_bwd_kernel(
    grad_loss_ptr,
    pc_ptr,
    pr_ptr,
    rc_ptr,
    rr_ptr,
    delta_ptr,
    grad_pc_ptr,
    grad_pr_ptr,
    grad_rc_ptr,
    grad_rr_ptr,
    B,
    beta,
    label_smoothing,
    margin,
    tau,
    log_keep,
    log_flip,
    LOSS_MODE: tl.constexpr,
    USE_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < B
    a, b, d = _load_pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, valid, USE_REF)
    g = tl.load(grad_loss_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ls = label_smoothing
    # ga = dL/da, gb = dL/db. Losses of d alone: dL/dd = gd, and d = a - b gives ga = gd, gb = -gd.
    if LOSS_MODE == 0:
        x = beta * d - margin
        gd = beta * (-_sigmoid(-x) * (1.0 - ls) + _sigmoid(x) * ls)
        ga = gd
        gb = -gd
    elif LOSS_MODE == 1:
        gd = tl.where(1.0 - beta * d > 0.0, -beta, 0.0)
        ga = gd
        gb = -gd
    elif LOSS_MODE == 2:
        gd = 2.0 * (d - 0.5 / beta)
        ga = gd
        gb = -gd
    elif LOSS_MODE == 3:
        x = beta * d
        gd = beta * (-_sigmoid(-x) * (1.0 - ls) - _sigmoid(x) * ls) / (1.0 - 2.0 * ls)
        ga = gd
        gb = -gd
    elif LOSS_MODE == 4:
        # d/dx [q(x)(logq(x) - c1) + q(-x)(logq(-x) - c2)] = q(x) q(-x) (x - c1 + c2)
        x = beta * d
        gd = beta * _sigmoid(x) * _sigmoid(-x) * (x - log_keep + log_flip)
        ga = gd
        gb = -gd
    elif LOSS_MODE == 5:
        cr = beta * a
        rj = beta * b
        ga = beta * (-_sigmoid(-cr) + 0.5 * _sigmoid(cr))
        gb = beta * 0.5 * _sigmoid(rj)
    elif LOSS_MODE == 6:
        delta = tl.load(delta_ptr).to(tl.float32)
        ga = -beta * _sigmoid(-(beta * a - delta))
        gb = beta * _sigmoid(beta * b - delta)
    elif LOSS_MODE == 7:
        half_inv_beta = 0.5 / beta
        ga = 2.0 * (a - half_inv_beta)
        gb = 2.0 * (b + half_inv_beta)
    elif LOSS_MODE == 8:
        sa = _sigmoid(beta * a)
        sb = _sigmoid(beta * b)
        ga = -beta * sa * (1.0 - sa)
        gb = beta * sb * (1.0 - sb)
    elif LOSS_MODE == 9:
        xa = beta * a
        xd = beta * (a - b)
        dsd = _sigmoid(xd) * _sigmoid(-xd)
        ga = beta * (_sigmoid(xa) * _sigmoid(-xa) - dsd)
        gb = beta * dsd
    else:
        s = beta * d
        q = s / tau
        keep = _sigmoid(-q)
        logistic = -_logsigmoid(s)
        blend = tl.exp(-s + _logsigmoid(q))
        gs = -_sigmoid(-s) * keep - logistic * keep * _sigmoid(q) / tau + blend * (keep / tau - 1.0)
        gd = beta * gs
        ga = gd
        gb = -gd
    ga = g * ga
    gb = g * gb
    tl.store(grad_pc_ptr + offs, ga.to(grad_pc_ptr.dtype.element_ty), mask=valid)
    tl.store(grad_pr_ptr + offs, gb.to(grad_pr_ptr.dtype.element_ty), mask=valid)
    if USE_REF:
        tl.store(grad_rc_ptr + offs, (-ga).to(grad_rc_ptr.dtype.element_ty), mask=valid)
        tl.store(grad_rr_ptr + offs, (-gb).to(grad_rr_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers. Callers (rlhf_fast/dpo.py) validate shapes, dtypes and devices; these assume valid
# inputs.


def exo_log_targets(label_smoothing: float) -> tuple[float, float]:
    """(log(1 - eps), log(eps)) of EXO's target distribution; eps = 1e-3 when 0 is given (as TRL)."""
    eps = label_smoothing if label_smoothing > 0.0 else 1e-3
    return math.log1p(-eps), math.log(eps)


def bco_delta(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Detached batch mean of the rewards cat(beta*a, beta*b) as a 1-element fp32 tensor (no sync)."""
    with torch.no_grad():
        a = pc.float() - rc.float() if rc is not None else pc.float()
        b = pr.float() - rr.float() if rr is not None else pr.float()
        return (torch.cat((beta * a, beta * b)).mean()).reshape(1)


def _bco_delta_or(placeholder, pc, pr, rc, rr, use_ref, loss_type, beta):
    if loss_type != "bco_pair":
        return placeholder
    return bco_delta(pc, pr, rc if use_ref else None, rr if use_ref else None, float(beta))


def _scalars(loss_type, beta, label_smoothing, gamma, discopop_tau):
    margin = float(gamma) if loss_type == "simpo" else 0.0
    log_keep, log_flip = exo_log_targets(float(label_smoothing)) if loss_type == "exo_pair" else (0.0, 0.0)
    return float(beta), float(label_smoothing), margin, float(discopop_tau), log_keep, log_flip


@on_input_device
def dpo_pair_forward(pc, pr, rc, rr, *, beta, loss_type, label_smoothing, gamma, discopop_tau):
    """Per-pair loss, chosen and rejected rewards ([B] fp32 each) in one launch.

    rc/rr None = reference-free (a = pi_c, b = pi_r). Inputs [B], any float dtype, same device,
    already validated by rlhf_fast.dpo (rc and rr both given or both None).
    """
    mode = LOSS_MODES[loss_type]
    use_ref = rc is not None and loss_type != "simpo"
    B = pc.shape[0]
    loss = torch.empty(B, dtype=torch.float32, device=pc.device)
    chosen_rewards = torch.empty_like(loss)
    rejected_rewards = torch.empty_like(loss)
    if B == 0:
        return loss, chosen_rewards, rejected_rewards
    pc, pr = pc.contiguous(), pr.contiguous()
    rc = rc.contiguous() if use_ref else pc
    rr = rr.contiguous() if use_ref else pr
    # bco_pair's batch mean; the other modes never read the pointer (any valid tensor will do).
    delta = _bco_delta_or(loss, pc, pr, rc, rr, use_ref, loss_type, beta)
    grid = (triton.cdiv(B, _BLOCK),)
    _dpo_pair_fwd_kernel[grid](
        pc, pr, rc, rr, delta, loss, chosen_rewards, rejected_rewards, B,
        *_scalars(loss_type, beta, label_smoothing, gamma, discopop_tau),
        LOSS_MODE=mode, USE_REF=use_ref, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return loss, chosen_rewards, rejected_rewards


@on_input_device
def dpo_pair_backward(grad_loss, pc, pr, rc, rr, *, beta, loss_type, label_smoothing, gamma, discopop_tau):
    """Gradients of sum(grad_loss * loss) w.r.t. pc, pr, rc, rr in one launch (each in its input's dtype).

    Returns (grad_pc, grad_pr, grad_rc, grad_rr); the last two are None when reference-free.
    Inputs as for dpo_pair_forward (validated by the caller).
    """
    mode = LOSS_MODES[loss_type]
    use_ref = rc is not None and loss_type != "simpo"
    B = pc.shape[0]
    grad_pc = torch.empty_like(pc, memory_format=torch.contiguous_format)
    grad_pr = torch.empty_like(pr, memory_format=torch.contiguous_format)
    grad_rc = torch.empty_like(rc, memory_format=torch.contiguous_format) if use_ref else None
    grad_rr = torch.empty_like(rr, memory_format=torch.contiguous_format) if use_ref else None
    if B == 0:
        return grad_pc, grad_pr, grad_rc, grad_rr
    grad_loss = grad_loss.contiguous()
    pc, pr = pc.contiguous(), pr.contiguous()
    rc = rc.contiguous() if use_ref else pc
    rr = rr.contiguous() if use_ref else pr
    delta = _bco_delta_or(grad_loss, pc, pr, rc, rr, use_ref, loss_type, beta)
    grid = (triton.cdiv(B, _BLOCK),)
    _dpo_pair_bwd_kernel[grid](
        grad_loss, pc, pr, rc, rr, delta,
        grad_pc, grad_pr, grad_rc if use_ref else grad_pc, grad_rr if use_ref else grad_pr, B,
        *_scalars(loss_type, beta, label_smoothing, gamma, discopop_tau),
        LOSS_MODE=mode, USE_REF=use_ref, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return grad_pc, grad_pr, grad_rc, grad_rr
