"""Advantage estimation: GAE, discounted returns, masked whitening, group (GRPO/RLOO) advantages.

`gae` and `discounted_returns` are reverse-time scans; their fast paths are the compiled kernels in
rlhf_fast._C (`torch.ops.rlhf_fast.gae` / `.discounted_returns`): C++ on CPU, and on CUDA one
launch that scans along T in parallel (csrc/cuda/gae_cuda.cu). `masked_whiten` and
`group_advantages` are a few fused-by-torch reductions and always run the reference.

Advantages and returns are training targets: every function here returns fp32 tensors that carry
no gradient (inputs are detached), whatever the backend.
"""

from __future__ import annotations


import torch

from rlhf_fast import reference
from rlhf_fast._backend import (
    FLOAT_DTYPES,
    check_float,
    check_same_device,
    check_same_shape,
    check_tensor,
    load_C,
    register_op,
    resolve,
)

__all__ = ["GROUP_METHODS", "discounted_returns", "gae", "group_advantages", "masked_whiten"]

GROUP_METHODS = reference.GROUP_METHODS

register_op("gae", cpp=True)
register_op("discounted_returns", cpp=True)
register_op("masked_whiten")
register_op("group_advantages")


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations of the compiled ops, so torch.compile traces them without running
# them. Registered only when rlhf_fast._C loaded (the ops do not exist otherwise).


def _check_fake_args(rewards: torch.Tensor, *others: torch.Tensor) -> None:
    torch._check(rewards.dim() == 2, lambda: f"rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    for t in others:
        torch._check(t.shape == rewards.shape, lambda t=t: f"shape {tuple(t.shape)} does not match rewards")


def _gae_fake(rewards, values, mask, gamma, lam):
    _check_fake_args(rewards, values, mask)
    return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


def _discounted_returns_fake(rewards, mask, gamma):
    _check_fake_args(rewards, mask)
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


def _register_fakes() -> bool:
    if load_C() is None:
        return False
    for name, fn in (("gae", _gae_fake), ("discounted_returns", _discounted_returns_fake)):
        qualname = f"rlhf_fast::{name}"
        # A module reload must not register twice (that raises).
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            torch.library.register_fake(qualname)(fn)
    return True


_FAKES_REGISTERED = _register_fakes()


# ----------------------------------------------------------------------------------------------
# Argument checks (errors name the argument)


def _check_mask(mask, like: torch.Tensor) -> None:
    check_tensor("mask", mask)
    check_same_shape("rewards", like, "mask", mask)
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool, integer or float, got {mask.dtype}")


def _check_scan_inputs(rewards, values, mask) -> None:
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES, ndim=2)
    if values is not None:
        check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=2)
        check_same_shape("rewards", rewards, "values", values)
    _check_mask(mask, rewards)
    check_same_device(rewards=rewards, values=values, mask=mask)


# ----------------------------------------------------------------------------------------------
# Public ops


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) with a multi-turn mask.

    The recurrence of verl's `compute_gae_advantage_return` (multi-turn form; verl then whitens
    the advantages: `masked_whiten(adv, mask)` gives its numbers): per row, for
    t = T-1 down to 0, starting from nextvalue = lastgae = 0,

        delta_t      = r_t + gamma * nextvalue - v_t
        gae_t        = delta_t + gamma * lam * lastgae
        nextvalue    = m_t * v_t + (1 - m_t) * nextvalue
        lastgae      = m_t * gae_t + (1 - m_t) * lastgae
        advantages_t = lastgae,   returns_t = advantages_t + v_t

    so masked steps (tool output, padding) carry the next value and the running advantage through
    unchanged. A float mask is used as is (the recurrence is linear in m). No whitening: apply
    `masked_whiten` to the advantages if wanted.

    Args:
        rewards: [B, T] fp32/bf16/fp16 per-token rewards (e.g. from `shape_rewards`).
        values: [B, T] fp32/bf16/fp16 value estimates, same shape and device.
        mask: [B, T] bool, integer or float; 1 = the step counts (response token). Values must lie
            in [0, 1] (not checked: that would cost a device sync); others make the recurrence
            grow without bound, and the GPU scan, which composes many steps at once, then gives
            inf/NaN where the sequential loop may still be finite.
        gamma: discount in [0, 1] (default 1.0).
        lam: GAE lambda in [0, 1] (default 1.0).
        backend: None/"auto" (C++ on CPU, CUDA kernel on GPU when rlhf_fast._C has one, else the
            reference), "cpp" or "reference"; see rlhf_fast._backend.
    Returns:
        (advantages, returns): fp32 [B, T] each, without gradient (advantages are targets).
    """
    _check_scan_inputs(rewards, values, mask)
    gamma = check_float("gamma", gamma, low=0.0, high=1.0)
    lam = check_float("lam", lam, low=0.0, high=1.0)
    impl = resolve("gae", backend, rewards.device, rewards, values, mask)
    if impl == "cpp":
        return torch.ops.rlhf_fast.gae(rewards.detach(), values.detach(), mask.detach(), gamma, lam)
    advantages, returns = reference.gae(rewards.detach(), values.detach(), mask.detach(), gamma=gamma, lam=lam)
    return advantages.to(torch.float32), returns.to(torch.float32)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Discounted reward-to-go (REINFORCE / ReMax returns) with a multi-turn mask.

    Per row, for t = T-1 down to 0, starting from running = 0:
        running   = m_t * (r_t + gamma * running) + (1 - m_t) * running
        returns_t = running
    (masked steps carry the running return through. verl's REINFORCE++ return loop differs at
    masked steps inside a row: it adds r_t there and resets the carry to 0, so the two agree
    only for right-padded masks with zero rewards on the padding.)

    Args:
        rewards: [B, T] fp32/bf16/fp16.
        mask: [B, T] bool, integer or float; 1 = the step counts. Values must lie in [0, 1], as in `gae`.
        gamma: discount in [0, 1] (default 1.0).
        backend: None/"auto", "cpp" or "reference" (as for `gae`).
    Returns:
        fp32 [B, T], without gradient.
    """
    _check_scan_inputs(rewards, None, mask)
    gamma = check_float("gamma", gamma, low=0.0, high=1.0)
    impl = resolve("discounted_returns", backend, rewards.device, rewards, mask)
    if impl == "cpp":
        return torch.ops.rlhf_fast.discounted_returns(rewards.detach(), mask.detach(), gamma)
    return reference.discounted_returns(rewards.detach(), mask.detach(), gamma=gamma).to(torch.float32)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """Whiten `x` with the mean and unbiased (Bessel) variance of its counted entries.

        out = (x - mean) / sqrt(var + eps)            (shift_mean=True)
        out = (x - mean) / sqrt(var + eps) + mean     (shift_mean=False)

    as verl's / TRL's `masked_whiten`. The statistics use counted entries only (one mean and
    variance over the whole tensor, not per row); the transform is applied at every position.
    With fewer than two counted entries the variance is taken as 0 (no division by zero, no host
    sync to check): the output is then (x - mean) / sqrt(eps), 0 at the counted entry and
    up to ~1e4 |x| elsewhere; verl raises instead.

    Args:
        x: any shape, fp32/bf16/fp16 (e.g. [B, T] advantages).
        mask: same shape as x; bool, integer or float, 1 = counts.
        shift_mean: keep the result centred (True) or add the mean back (False).
        eps: added to the variance, >= 0 (default 1e-8).
        backend: None/"auto" or "reference" (there is no kernel: this is a few reductions).
    Returns:
        fp32 tensor shaped like x, without gradient.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("mask", mask)
    check_same_shape("x", x, "mask", mask)
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool, integer or float, got {mask.dtype}")
    check_same_device(x=x, mask=mask)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    eps = check_float("eps", eps, low=0.0)
    resolve("masked_whiten", backend, x.device)  # validates backend; only the reference exists
    return reference.masked_whiten(x.detach(), mask.detach(), shift_mean=shift_mean, eps=eps).to(torch.float32)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    method: str = "grpo",
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Outcome advantages from one scalar score per response, in groups of responses to one prompt.

    Groups are `group_size` consecutive rows (rows [0, group_size) are the first prompt's).
        grpo     (DeepSeekMath, Shao et al. 2024):  (r - mean) / (std + eps), unbiased std
        dr_grpo  (Dr. GRPO, Liu et al. 2025):       r - mean
        rloo     (Ahmadian et al. 2024):            r - mean of the other group_size - 1 rows
    Broadcast the result over tokens with `adv[:, None] * mask` for a per-token advantage.

    Args:
        scores: [B] fp32/bf16/fp16, B a multiple of group_size.
        group_size: responses per prompt, >= 1 (>= 2 for "grpo" and "rloo", whose std / leave-one-out
            mean needs two rows). With group_size = 1, "dr_grpo" gives 0 (r minus its own mean);
            verl special-cases singleton groups (mean 0, std 1) and returns about the raw score.
        method: "grpo" (default), "dr_grpo" or "rloo".
        eps: added to the std for "grpo", >= 0 (default 1e-6, verl's; TRL uses 1e-4, OpenRLHF
            1e-9).
        backend: None/"auto" or "reference" (there is no kernel).
    Returns:
        fp32 [B], without gradient.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, ndim=1)
    group_size = reference.check_group_args(scores.shape[0], group_size, method)
    eps = check_float("eps", eps, low=0.0)
    resolve("group_advantages", backend, scores.device)
    return reference.group_advantages(scores.detach(), group_size, method=method, eps=eps).to(torch.float32)


