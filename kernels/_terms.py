"""Per-token loss terms shared by the Triton kernels (`@triton.jit` helpers, no launchers).

Every helper works elementwise on a scalar or on a block of any shape, in fp32, and is inlined
into the calling kernel. Masking (uncounted tokens, padding lanes) is the caller's job: pass a
safe input there (e.g. log-ratio 0, diff 0) so no helper ever evaluates exp() of garbage.

KL estimators (`KL_KIND` is a constexpr code from `KL_CODES`; `diff = logp - ref`):
    kl_term(diff, KL_KIND)          -> (kl, dkl/dlogp)
    kl_value(logp, ref, KL_KIND)    -> kl
    kl_dlogp(logp, ref, KL_KIND)    -> dkl/dlogp
        KL_NONE (0): kl = 0,                    dkl = 0
        k1  (1):     kl = diff,                 dkl = 1   (also at diff = +-inf, never NaN)
        k2  (2):     kl = diff^2 / 2,           dkl = diff
        k3  (3):     kl = exp(-diff) + diff - 1, dkl = 1 - exp(-diff)  (series below |diff| 1/4)
        abs (4):     kl = |diff|,               dkl = sign(diff)  (0 at diff = 0)
        k1+ (5), k3+ (7), abs+ (8): straight-through (verl): kl of k1 / k3 / abs, dkl = diff (k2's)
    clamp_kl(kl, dkl, c, KL_KIND)   -> torch.clamp(kl, -c, c) and its derivative (0 outside;
                                       the straight-through kinds keep k2's derivative)
    `KL_CODES` maps every name accepted by the public API (rlhf_fast.reference.KL_KINDS: k1, k2,
    k3, abs, k1+, k3+, abs+ and the aliases kl, mse, low_var_kl, kl+, low_var_kl+, k2+, mse+) to
    its code; launchers pass
    `KL_CODES[kind]` as the constexpr (or KL_NONE when no KL term is wanted).

PPO clipped surrogate (ONE convention for the clip arguments: eps_low / eps_high, the distances
below and above 1, NOT the ratio bounds 1 - eps_low / 1 + eps_high; `log_ratio = logp - old`):
    ppo_clip_term(log_ratio, adv, eps_low, eps_high, dual_clip, HAS_DUAL)
        -> (loss, dloss/dlogp, ratio, clipped, dual_active)
        ratio = exp(log_ratio)
        loss  = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        HAS_DUAL (constexpr) and A < 0:  loss = min(loss, -dual_clip A)
        clipped:     the clipped branch is strictly larger (counts towards clipfrac)
        dual_active: the dual-clip bound is strictly smaller and A < 0 (dual_clipfrac)
        dloss/dlogp: -A ratio, or 0 where `clipped` or `dual_active` (the active term is then
            constant in logp). Ties take the unclipped branch, as autograd through the reference
            does (inside the clip range both branches agree and their gradient halves add up).
            A NaN log-ratio gives a NaN loss and a NaN derivative.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rlhf_fast.reference import KL_KINDS

KL_NONE, KL_K1, KL_K2, KL_K3, KL_ABS = 0, 1, 2, 3, 4
# Straight-through kinds (verl's "k1+", "k3+", "abs+"): the base estimator's value, k2's gradient.
# Code = base code + KL_ST_OFFSET (k2+ is k2 itself, so 6 is unused).
KL_ST_OFFSET = 4
KL_K1_ST, KL_K3_ST, KL_ABS_ST = KL_K1 + KL_ST_OFFSET, KL_K3 + KL_ST_OFFSET, KL_ABS + KL_ST_OFFSET
_CANONICAL_CODES = {
    "k1": KL_K1,
    "k2": KL_K2,
    "k3": KL_K3,
    "abs": KL_ABS,
    "k1+": KL_K1_ST,
    "k3+": KL_K3_ST,
    "abs+": KL_ABS_ST,
}
# name or alias (rlhf_fast.reference.KL_KINDS) -> constexpr code
KL_CODES = {name: _CANONICAL_CODES[canonical] for name, canonical in KL_KINDS.items()}

__all__ = [
    "KL_ABS",
    "KL_ABS_ST",
    "KL_CODES",
    "KL_K1",
    "KL_K1_ST",
    "KL_K2",
    "KL_K3",
    "KL_K3_ST",
    "KL_NONE",
    "KL_ST_OFFSET",
    "clamp_kl",
    "clamp_nan",
    "kl_dlogp",
    "kl_term",
    "kl_value",
    "ppo_clip_term",
]


# The same offset as a compile-time constant for the @triton.jit helpers below.
_ST_OFFSET = tl.constexpr(KL_ST_OFFSET)


@triton.jit
def clamp_nan(x, lo, hi):
    """torch.clamp(x, lo, hi): NaN stays NaN (the default tl.minimum / tl.maximum return the other
    operand for a NaN one, which would turn a NaN loss or KL into a finite bound)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, tl.PropagateNan.ALL)


# |diff| below which k3 and its derivative come from their Taylor series (see _k3_series).
K3_SERIES_BELOW = tl.constexpr(0.25)


@triton.jit
def _k3_series(diff):
    """(exp(-diff) + diff - 1, 1 - exp(-diff)) for |diff| < 1/4, by Taylor series in x = -diff.

    exp(-d) + d - 1 ~ d^2 / 2 cancels in fp32: 1 ulp of exp (6e-8) is 12 % of it at |d| = 1e-3,
    the usual size of a policy-vs-reference log-ratio. With q = (e^x - 1 - x) / x^2 (Horner, terms
    to x^6 / 8!): k3 = x^2 q and 1 - e^-d = -(x + x^2 q); truncation < 4e-10 relative at 1/4.
    """
    x = -diff
    q = 1.0 / 5040 + x * (1.0 / 40320)
    q = 1.0 / 720 + x * q
    q = 1.0 / 120 + x * q
    q = 1.0 / 24 + x * q
    q = 1.0 / 6 + x * q
    q = 0.5 + x * q
    return x * x * q, -x * (1.0 + x * q)


@triton.jit
def kl_term(diff, KL_KIND: tl.constexpr):
    """(kl, dkl/dlogp) of the estimator KL_KIND at diff = logp - ref (fp32, scalar or block)."""
    if KL_KIND > _ST_OFFSET:  # straight-through (k1+, k3+, abs+): the base's value, k2's derivative
        kl, _ = _kl_base_term(diff, KL_KIND - _ST_OFFSET)
        d_kl = diff
    else:
        kl, d_kl = _kl_base_term(diff, KL_KIND)
    return kl, d_kl


@triton.jit
def _kl_base_term(diff, KL_KIND: tl.constexpr):
    """kl_term of the estimators 0..4 (KL_NONE, k1, k2, k3, abs)."""
    if KL_KIND == 1:  # k1
        kl = diff
        d_kl = tl.full(diff.shape, 1.0, tl.float32)
    elif KL_KIND == 2:  # k2
        kl = 0.5 * diff * diff
        d_kl = diff
    elif KL_KIND == 3:  # k3 (low-variance)
        e = tl.exp(-diff)
        small = tl.abs(diff) < K3_SERIES_BELOW
        kl_series, d_kl_series = _k3_series(tl.where(small, diff, 0.0))
        kl = tl.where(small, kl_series, e + diff - 1.0)
        d_kl = tl.where(small, d_kl_series, 1.0 - e)
    elif KL_KIND == 4:  # abs
        kl = tl.abs(diff)
        d_kl = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    else:  # KL_NONE
        kl = tl.full(diff.shape, 0.0, tl.float32)
        d_kl = kl
    return kl, d_kl


@triton.jit
def clamp_kl(kl, d_kl, clamp_val, KL_KIND: tl.constexpr):
    """torch.clamp(kl, -clamp_val, clamp_val) and its derivative: d_kl inside [-clamp_val,
    clamp_val], 0 outside; where kl is NaN, 0 * d_kl, as the chain rule through torch.clamp's
    backward gives (NaN when d_kl is NaN, e.g. k2 / k3; 0 for k1). NaN values stay NaN. The
    straight-through kinds clamp the value only: their gradient is k2's, never clamped (verl)."""
    inside = (kl >= -clamp_val) & (kl <= clamp_val)
    d_outside = tl.where(kl != kl, d_kl * 0.0, 0.0)  # noqa: PLR0124 (the NaN test)
    kl = clamp_nan(kl, -clamp_val, clamp_val)
    if KL_KIND > _ST_OFFSET:
        return kl, d_kl
    return kl, tl.where(inside, d_kl, d_outside)


@triton.jit
def kl_value(logp, ref, KL_KIND: tl.constexpr):
    """kl(logp, ref) of the estimator KL_KIND (fp32)."""
    kl, _ = kl_term(logp - ref, KL_KIND)
    return kl


@triton.jit
def kl_dlogp(logp, ref, KL_KIND: tl.constexpr):
    """d kl(logp, ref) / d logp of the estimator KL_KIND (fp32)."""
    _, d_kl = kl_term(logp - ref, KL_KIND)
    return d_kl


@triton.jit
def ppo_clip_term(log_ratio, adv, eps_low, eps_high, dual_clip, HAS_DUAL: tl.constexpr):
    """PPO clipped surrogate at one token (fp32, scalar or block); see the module docstring.

    Returns (loss, dloss/dlogp, ratio, clipped, dual_active). eps_low / eps_high are the clip
    widths (ratio bounds 1 - eps_low, 1 + eps_high); dual_clip is read only when HAS_DUAL.
    """
    ratio = tl.exp(log_ratio)
    loss_plain = -adv * ratio
    # NaN-propagating clamp and max (torch's semantics): a NaN ratio gives a NaN loss.
    loss_clipped = -adv * clamp_nan(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = loss_clipped > loss_plain
    loss = tl.maximum(loss_plain, loss_clipped, propagate_nan=tl.PropagateNan.ALL)
    d_loss = tl.where(clipped, 0.0, loss_plain)  # d(-A r)/dlogp = -A r
    if HAS_DUAL:
        bound = -dual_clip * adv
        dual_active = (adv < 0.0) & (loss > bound)
        loss = tl.where(dual_active, bound, loss)
        d_loss = tl.where(dual_active, 0.0, d_loss)
    else:
        dual_active = clipped & False
    return loss, d_loss, ratio, clipped, dual_active
