"""Pure-PyTorch reference implementations: the ground truth every kernel is tested against.

Each function is written straight from its formula (the docstring names the source), computes in
fp32 whatever the input dtype (float64 inputs stay float64, so the oracle tests can use them), and
has the same signature as the public op minus `backend=`. Readable over fast: nothing here is
fused, and `gae` / `discounted_returns` are the reverse Python loop over T that the common RL
libraries use.

Conventions (DESIGN.md): logits [..., V]; labels [...] int64, aligned with logits (no shift);
mask [B, T] bool or float, 1 = token counts. Masked positions contribute exactly 0 (via
`torch.where`, so a NaN/inf computed at an uncounted token never leaks into a loss or gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_fast._backend import check_int, custom_ops_untransformable, python_number

__all__ = [
    "logprobs",
    "entropy",
    "sequence_logprobs",
    "linear_logprobs",
    "kl_penalty",
    "shape_rewards",
    "gae",
    "discounted_returns",
    "masked_whiten",
    "group_advantages",
    "aggregate",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ppo_loss_from_logits",
    "dpo_loss",
    "dpo_loss_from_logits",
    "KL_KINDS",
    "DPO_LOSS_TYPES",
    "AGG_MODES",
]

# name or alias -> canonical kind. "+" kinds (verl): the base estimator's value with k2's
# gradient (straight-through, an unbiased gradient of the KL); k2+ is k2 itself.
KL_KINDS = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
    "abs": "abs",
    "k1+": "k1+",
    "kl+": "k1+",
    "k2+": "k2",
    "mse+": "k2",
    "k3+": "k3+",
    "low_var_kl+": "k3+",
    "abs+": "abs+",
}
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "simpo",
)
# Loss types whose formula uses label_smoothing; any other type rejects a non-zero value.
DPO_LABEL_SMOOTHING_TYPES = ("sigmoid", "robust", "exo_pair", "simpo")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def mask_divisor(total: torch.Tensor) -> torch.Tensor:
    """A mask total as a divisor: itself where > 0, else 1 (nothing counted -> the sum, 0, stays 0).
    Not clamp_min(1): a fractional mask may weigh less than 1 in all and still divides by its sum.
    Shared by the reference and the kernel paths' torch-side weights (aggregation, token_logprobs)."""
    return torch.where(total > 0, total, torch.ones_like(total))


class _ExpZeroSafe(torch.autograd.Function):
    """exp(x) (expm1(x) with minus_one) whose backward gives 0 wherever the incoming gradient is
    0 and x is not NaN, even where the result overflowed to inf. A branch that torch.maximum /
    clamp / where did not pick gets a 0 gradient, and 0 * inf would make it NaN: e.g. a
    log-ratio of 99 (fp32 exp overflows past ~88.7) on a clipped token, whose true gradient is
    0, as the kernels give.
    Differentiable again (create_graph), with the same rule one order up; vmap-able. Forward
    mode: `_ExpZeroSafeForwardMode`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, minus_one: bool):
        return torch.expm1(x) if minus_one else torch.exp(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # (A NaN x keeps its NaN gradient: NaN in, NaN out, as on the kernel paths.)
        return torch.where((grad == 0) & ~x.isnan(), 0.0, grad * _exp(x)), None


class _ExpZeroSafeForwardMode(_ExpZeroSafe):
    """_ExpZeroSafe plus a forward-mode rule (the same zero rule on the tangent), for
    torch.func.jvp / jacfwd / hessian and forward_ad dual tensors. A class of its own because
    Dynamo refuses to trace an autograd.Function that defines jvp: torch.compile gets the other."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_tangent, _minus_one_tangent):
        (x,) = ctx.saved_tensors
        return torch.where((x_tangent == 0) & ~x.isnan(), 0.0, x_tangent * _exp(x))


def _zero_safe_exp() -> type[_ExpZeroSafe]:
    """The class to apply: the one with the forward-mode rule where a tangent may reach it (in
    eager mode, inside a torch.func transform or a forward_ad dual_level(): the same test as the
    backend choice's), the plain one otherwise and always while torch.compile traces."""
    if torch.compiler.is_compiling() or not custom_ops_untransformable():
        return _ExpZeroSafe
    return _ExpZeroSafeForwardMode


def _exp(x: torch.Tensor) -> torch.Tensor:
    return _zero_safe_exp().apply(x, False)


def _expm1(x: torch.Tensor) -> torch.Tensor:
    return _zero_safe_exp().apply(x, True)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x*m)/sum(m) over counted entries; 0 when nothing counts."""
    m = mask.detach().to(x.dtype)
    return torch.where(m != 0, x * m, 0.0).sum() / mask_divisor(m.sum())


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy


def _token_logprobs_and_entropy(logits, labels, temperature, ignore_index, with_entropy=True):
    """Per-token log p(label) and (with_entropy) entropy of softmax(logits / temperature), fp32
    (or fp64); the entropy is None otherwise, which skips its [..., V] intermediates."""
    z = logits.to(_compute_dtype(logits))
    z = z if temperature == 1.0 else z / temperature
    V = z.shape[-1]
    ignored = labels == ignore_index
    # Rows that are all -inf (padding, say) or ignored are computed on zeros instead: their
    # outputs are constants (NaN log-prob, 0 entropy; 0 and 0 when ignored), so they get a zero
    # gradient, never the 0 * NaN of logsumexp's backward that would poison the whole batch's.
    dead = (z == -math.inf).all(-1)
    z = torch.where((dead | ignored).unsqueeze(-1), torch.zeros_like(z), z)
    lse = torch.logsumexp(z, dim=-1)
    bad = (~ignored) & ((labels < 0) | (labels >= V))
    safe = torch.where(ignored | bad, torch.zeros_like(labels), labels).long()
    # Subtracted before the squeeze: for vocab-sharded DTensor logits the gathered value is a
    # masked partial sum that torch (2.13) fails to reduce once squeezed.
    logp = (torch.gather(z, -1, safe.unsqueeze(-1)) - lse.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(bad | dead, torch.full_like(logp, float("nan")), logp)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not with_entropy:
        return logp, None
    ent = _entropy_terms(z - lse.unsqueeze(-1))
    ent = torch.where(ignored | dead, torch.zeros_like(ent), ent)
    return logp, ent


def _entropy_terms(log_p):
    """H = -sum p log p over the last dim. p = 0 where z = -inf contributes 0 (not 0 * -inf = NaN)
    in the forward (outer where) and the backward (inner where); a NaN p stays NaN (the test is
    p == 0, not p > 0, which would drop NaN and hide a diverged row behind entropy 0)."""
    p = log_p.exp()
    return -torch.where(p == 0, 0.0, p * torch.where(p == 0, 0.0, log_p)).sum(-1)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, inplace_backward=False):
    """log softmax(logits / temperature)[label] per token (the `log_softmax(x.float()).gather` users write).

    logits [..., V] any float dtype; labels [...] int. Returns fp32 [...] (and the entropy [...]
    when return_entropy). ignore_index tokens: log-prob 0 and entropy 0 (zero gradient). A label
    outside [0, V) that is not ignore_index gives NaN. `inplace_backward` is accepted for API
    parity and ignored here.
    """
    logp, ent = _token_logprobs_and_entropy(logits, labels, temperature, ignore_index, return_entropy)
    return (logp, ent) if return_entropy else logp


def entropy(logits, *, temperature=1.0):
    """Entropy -sum p log p of softmax(logits / temperature) over the last dim. [..., V] -> fp32 [...]."""
    z = logits.to(_compute_dtype(logits))
    z = z if temperature == 1.0 else z / temperature
    dead = (z == -math.inf).all(-1)  # an all -inf row: entropy 0 with a zero gradient
    z = torch.where(dead.unsqueeze(-1), torch.zeros_like(z), z)
    ent = _entropy_terms(torch.log_softmax(z, dim=-1))
    return torch.where(dead, torch.zeros_like(ent), ent)


def sequence_logprobs(logits, labels, mask=None, *, average=False, temperature=1.0, ignore_index=-100):
    """Masked sum (or mean) over T of per-token log-probs: logits [B, T, V] -> fp32 [B].

    mask [B, T] (None = all ones); ignore_index tokens never count. average=True divides by the
    sum of the mask over counted tokens (their number for a 0/1 mask; a row with none gives 0).
    The DPO trainers' `concatenated_forward`.
    """
    logp = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & (mask != 0)
    m = torch.where(counted, mask.detach().to(logp.dtype) if mask is not None else torch.ones_like(logp), 0.0)
    total = torch.where(counted, logp * m, 0.0).sum(-1)
    if average:
        return total / mask_divisor(m.sum(-1))
    return total


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False):
    """logprobs(hidden @ weight.T + bias, labels): hidden [..., H], weight [V, H], bias [V] or None."""
    dt = _compute_dtype(hidden)
    logits = F.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


# ----------------------------------------------------------------------------------------------
# KL and rewards


def kl_penalty(logprobs, ref_logprobs, kind="k1", *, clamp=None):
    """Per-token KL estimate between the policy and the reference (Schulman, "Approximating KL
    divergence", 2020; verl `kl_penalty`).

    k1 ("kl") = logp - ref; k2 ("mse") = 0.5 (logp - ref)^2;
    k3 ("low_var_kl") = exp(ref - logp) - (ref - logp) - 1; abs = |logp - ref|.
    clamp=c clamps the result to [-c, c] (verl clamps low_var_kl to [-10, 10]). fp32 out.
    "k1+", "k3+", "abs+" (aliases kl+, low_var_kl+; k2+ / mse+ = k2): verl's straight-through
    kinds, the base estimator's value (clamped if asked) with the gradient of k2, i.e. logp - ref.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(KL_KINDS)}")
    kind = KL_KINDS[kind]
    if kind.endswith("+"):
        value = kl_penalty(logprobs, ref_logprobs, kind[:-1], clamp=clamp)
        k2 = kl_penalty(logprobs, ref_logprobs, "k2")
        return k2 - k2.detach() + value.detach()
    dt = _compute_dtype(logprobs)
    logp, ref = logprobs.to(dt), ref_logprobs.to(dt)
    diff = logp - ref
    if kind == "k1":
        out = diff
    elif kind == "k2":
        out = 0.5 * diff * diff
    elif kind == "k3":
        # = exp(-d) + d - 1 (verl's form), without its fp32 cancellation for small |d| (12 % off
        # at |d| = 1e-3): the kernels use a Taylor series there, the reference expm1.
        out = _expm1(-diff) + diff
    else:
        out = diff.abs()
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out


def _last_counted_index(mask):
    """[B] index of each row's last counted token, -1 for rows with none."""
    # Positions from the mask rather than torch.arange, as a DTensor mask needs DTensor operands;
    # a [T] cumsum over dim 0, as DTensor (torch 2.13) scans cumsum(-1) shard by shard.
    pos = mask.new_ones(mask.shape[-1], dtype=torch.long).cumsum(0) - 1
    return torch.where(mask != 0, pos, -1).amax(-1)


def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, kind="k1"):
    """Per-token reward for PPO (TRL/OpenRLHF `compute_reward`): -kl_coef * KL_t on every counted
    token, plus the sequence score scores[b] at row b's last counted token. [B, T] fp32.
    """
    dt = _compute_dtype(logprobs)
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    m = mask.to(dt)
    rewards = torch.where(m != 0, -kl_coef * kl * m, 0.0)
    if rewards.shape[-1] == 0:  # T = 0: no token to put a score on (and amax over it raises)
        return rewards
    last = _last_counted_index(mask)
    has = last >= 0
    # Out of place: under torch.func.vmap over the scores an in-place scatter into the unbatched
    # zeros would be refused.
    bonus = torch.zeros_like(rewards).scatter(
        1, last.clamp_min(0).unsqueeze(1), torch.where(has, scores.to(dt), 0.0).unsqueeze(1)
    )
    return rewards + bonus


# ----------------------------------------------------------------------------------------------
# Advantages


def gae(rewards, values, mask, *, gamma=1.0, lam=1.0):
    """Generalised advantage estimation (Schulman et al. 2016) with verl's multi-turn masking:
    masked steps carry the next value and the running advantage through unchanged.

    Reverse loop over T (vectorised over B):
        delta_t = r_t + gamma * nextvalue - v_t;  gae_t = delta_t + gamma * lam * lastgae
        nextvalue = m_t v_t + (1 - m_t) nextvalue;  lastgae = m_t gae_t + (1 - m_t) lastgae
        advantages_t = lastgae;  returns = advantages + values (no whitening).
    rewards, values, mask [B, T] -> (advantages, returns) fp32 [B, T].
    """
    dt = _compute_dtype(rewards)
    r, v, m = rewards.to(dt), values.to(dt), mask.to(dt)
    B, T = r.shape
    nextvalue = r.new_zeros(B)  # (new_zeros: a DTensor stays a DTensor)
    lastgae = r.new_zeros(B)
    # Columns are stacked at the end rather than written into a buffer: under torch.func.vmap over
    # values or mask alone, an in-place write of a batched column into rewards' buffer is refused.
    columns = [None] * T
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nextvalue - v[:, t]
        gae_t = delta + gamma * lam * lastgae
        nextvalue = m[:, t] * v[:, t] + (1 - m[:, t]) * nextvalue
        lastgae = m[:, t] * gae_t + (1 - m[:, t]) * lastgae
        columns[t] = lastgae
    adv = torch.stack(columns, dim=1) if T else torch.empty_like(r)
    return adv, adv + v


def discounted_returns(rewards, mask, *, gamma=1.0):
    """Discounted reward-to-go (REINFORCE returns), masked steps carrying the running return:
    R_t = m_t (r_t + gamma R_{t+1}) + (1 - m_t) R_{t+1}. [B, T] -> fp32 [B, T]."""
    dt = _compute_dtype(rewards)
    r, m = rewards.to(dt), mask.to(dt)
    B, T = r.shape
    running = r.new_zeros(B)
    columns = [None] * T  # stacked at the end, as in gae (vmap over the mask alone)
    for t in reversed(range(T)):
        running = m[:, t] * (r[:, t] + gamma * running) + (1 - m[:, t]) * running
        columns[t] = running
    return torch.stack(columns, dim=1) if T else torch.empty_like(r)


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) with mean and unbiased (Bessel) variance over counted tokens
    (verl/TRL `masked_whiten`; a float mask weighs each token, n = sum(mask), var = sum(m (x -
    mean)^2) / (n - 1)). shift_mean=False adds the mean back. Applied at every position. Where
    n <= 1 the sum of squares is divided by 1 instead of n - 1 (no division by zero; a single
    counted token gives variance 0), and an empty mask gives mean 0."""
    dt = _compute_dtype(x)
    x = x.to(dt)
    m = mask.detach().to(dt)
    n = m.sum()
    mean = torch.where(m != 0, x * m, 0.0).sum() / mask_divisor(n)
    centered = x - mean
    sq = torch.where(m != 0, centered * centered * m, 0.0).sum()
    var = sq / mask_divisor(n - 1)
    white = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white


GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def check_group_args(n_scores, group_size, method):
    """Validate group_advantages' method and group_size for n_scores scores (the kernel-free public
    op and this reference alike: a group of one has no std / no other rows, which would be NaN).
    Returns group_size (a numpy integer as a Python int)."""
    if method not in GROUP_METHODS:
        raise ValueError(f"method={method!r} is not one of {GROUP_METHODS}")
    group_size = check_int("group_size", group_size, low=1)
    if method in ("grpo", "rloo") and group_size < 2:
        raise ValueError(f"group_size must be >= 2 for method={method!r}, got {group_size}")
    if n_scores % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of scores ({n_scores})")
    return group_size


def group_advantages(scores, group_size, *, method="grpo", eps=1e-6):
    """Outcome advantages for [B] scores in groups of `group_size` consecutive rows.

    grpo (DeepSeekMath): (r - mean) / (std + eps), unbiased std; dr_grpo (Dr. GRPO, Liu et al.
    2025): r - mean; rloo (Ahmadian et al. 2024): r - mean of the other rows of the group.
    Returns fp32 [B].
    """
    group_size = check_group_args(scores.shape[0], group_size, method)
    dt = _compute_dtype(scores)
    if scores.numel() == 0:  # (std over no groups warns "degrees of freedom <= 0")
        return scores.to(dt).reshape(-1)
    s = scores.to(dt).reshape(-1, group_size)
    mean = s.mean(-1, keepdim=True)
    if method == "grpo":
        out = (s - mean) / (s.std(-1, unbiased=True, keepdim=True) + eps)
    elif method == "dr_grpo":
        out = s - mean
    else:
        others = (s.sum(-1, keepdim=True) - s) / (group_size - 1)
        out = s - others
    return out.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Aggregation and PPO


def check_agg(agg, horizon=None):
    """Validate an aggregation mode and its horizon (used by the reference and the kernels alike).
    Returns the horizon (None kept; a numpy scalar as a Python number)."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")
    if horizon is not None and agg != "seq-mean-token-sum-norm":
        raise ValueError(f"horizon is only used by agg='seq-mean-token-sum-norm', got agg={agg!r}")
    horizon = python_number(horizon)
    # bool is an int, and an infinite horizon would make the loss silently 0: both rejected.
    ok = isinstance(horizon, (int, float)) and not isinstance(horizon, bool) and 0 < horizon < math.inf
    if horizon is not None and not ok:
        raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
    return horizon


def check_kl_term(kl_coef, ref_logprobs):
    """A KL weight with nothing to measure the KL against is a forgotten argument, not "no KL"."""
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={kl_coef} needs ref_logprobs (the reference policy's [B, T] log-probs); "
            "pass kl_coef=0.0 for no KL term"
        )


def aggregate(loss_mat, mask, agg="token-mean", *, horizon=None):
    """verl `agg_loss` modes, with the seq-* modes averaging over sequences that have at least one
    counted token; empty mask -> 0.

    token-mean: sum(L m) / sum(m); seq-mean-token-sum: mean_b sum_t L m;
    seq-mean-token-mean: mean_b (sum_t L m / sum_t m); seq-mean-token-sum-norm:
    seq-mean-token-sum / horizon (default T).
    """
    horizon = check_agg(agg, horizon)
    dt = _compute_dtype(loss_mat)
    m = mask.detach().to(dt)  # a mask weighs tokens; it gets no gradient (nor on the kernel path)
    Lm = torch.where(m != 0, loss_mat.to(dt) * m, 0.0)
    if agg == "token-mean":
        return Lm.sum() / mask_divisor(m.sum())
    tokens = m.sum(-1)
    nonempty = tokens > 0
    n_seq = nonempty.sum().to(dt).clamp_min(1.0)
    seq_sum = Lm.sum(-1)
    if agg == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if agg == "seq-mean-token-mean":
        return torch.where(nonempty, seq_sum / mask_divisor(tokens), 0.0).sum() / n_seq
    h = max(mask.shape[-1], 1) if horizon is None else horizon  # T = 0: a 0 sum, not 0 / 0
    return seq_sum.sum() / n_seq / h


def _ppo_policy_terms(logp, old, adv, mask, clip_eps, clip_eps_high, dual_clip):
    """Per-token PPO clipped loss and the masks behind its stats (verl `compute_policy_loss`).

    The log-ratio is zeroed at uncounted tokens: exp() of a huge difference there would be inf,
    and inf * 0 in the backward of exp is NaN even though the token's weight is 0.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = _exp(torch.where(mask != 0, logp - old, 0.0))
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    clipped_active = loss2 > loss1
    loss = torch.maximum(loss1, loss2)
    dual_active = None
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        dual_active = (adv < 0) & (loss > loss3)
        loss = torch.where(adv < 0, torch.minimum(loss, loss3), loss)
    return loss, ratio, clipped_active, dual_active


def _policy_stats(ratio, logp, old, clipped_active, dual_active, mask):
    counted = mask != 0
    any_counted = counted.any()
    masked_ratio = torch.where(counted, ratio, float("-inf"))
    # amax of an empty batch raises: its max is -inf (reported as 0 below, as for an empty mask)
    ratio_max = masked_ratio.amax() if masked_ratio.numel() else masked_ratio.new_full((), float("-inf"))
    stats = {
        "clipfrac": _masked_mean(clipped_active.to(ratio.dtype), mask),
        "approx_kl": _masked_mean(old - logp, mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": torch.where(any_counted, ratio_max, torch.zeros_like(ratio_max)),
    }
    if dual_active is not None:
        stats["dual_clipfrac"] = _masked_mean(dual_active.to(ratio.dtype), mask)
    return {k: v.detach() for k, v in stats.items()}


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps=0.2,
    clip_eps_high=None,
    dual_clip=None,
    agg="token-mean",
    horizon=None,
    loss_scale=1.0,
):
    """PPO clipped surrogate (Schulman et al. 2017) with asymmetric clipping (DAPO's clip-higher)
    and dual-clip (Ye et al. 2020), as in verl `compute_policy_loss`.

    Per token L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = exp(logp - old); with
    dual_clip = c and A < 0: L = min(L, -c A). Aggregated with `aggregate(agg)`.
    Returns (loss 0-d, stats): clipfrac, approx_kl (masked mean of old - logp), ratio_mean,
    ratio_max (0 for an empty mask), dual_clipfrac when dual_clip is set. Gradient reaches
    `logprobs` only. loss_scale multiplies the loss (hence the gradient), not the stats.
    """
    dt = _compute_dtype(logprobs)
    logp = logprobs.to(dt)
    old = old_logprobs.detach().to(dt)
    adv = advantages.detach().to(dt)
    loss_tok, ratio, clipped, dual = _ppo_policy_terms(logp, old, adv, mask, clip_eps, clip_eps_high, dual_clip)
    loss = aggregate(loss_tok, mask, agg, horizon=horizon) * loss_scale
    return loss, _policy_stats(ratio, logp, old, clipped, dual, mask)


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean", horizon=None, loss_scale=1.0):
    """Clipped value loss (verl `compute_value_loss`): per token
    0.5 max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), aggregated (times loss_scale).
    Returns (loss, stats): vf_clipfrac (clipped term strictly larger), vpred_mean.
    clip_eps=None: no clipping, 0.5 (v - R)^2 (OpenRLHF ValueLoss(clip_eps=None)); old_values unused."""
    dt = _compute_dtype(values)
    v = values.to(dt)
    R = returns.detach().to(dt)
    if clip_eps is None:
        v_clipped = v
    else:
        v_old = old_values.detach().to(dt)
        v_clipped = torch.maximum(torch.minimum(v, v_old + clip_eps), v_old - clip_eps)
    # Zero the residuals at uncounted tokens: an inf there would give inf * 0 = NaN in the backward.
    counted = mask != 0
    l1 = torch.where(counted, v - R, 0.0) ** 2
    l2 = torch.where(counted, v_clipped - R, 0.0) ** 2
    loss = 0.5 * aggregate(torch.maximum(l1, l2), mask, agg, horizon=horizon) * loss_scale
    stats = {
        "vf_clipfrac": _masked_mean((l2 > l1).to(dt), mask).detach(),
        "vpred_mean": _masked_mean(v, mask).detach(),
    }
    return loss, stats


def ppo_loss_from_logits(
    logits,
    labels,
    old_logprobs,
    advantages,
    mask,
    *,
    temperature=1.0,
    clip_eps=0.2,
    clip_eps_high=None,
    dual_clip=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_kind="k3",
    kl_clamp=None,
    entropy_coef=0.0,
    agg="token-mean",
    horizon=None,
    ignore_index=-100,
    loss_scale=1.0,
    inplace_backward=False,
):
    """PPO/GRPO actor loss from logits [B, T, V]: per-token log-probs and entropy, the clipped
    policy term, + kl_coef * kl_penalty(logp, ref, kl_kind, clamp=kl_clamp) when kl_coef != 0 (which
    needs ref_logprobs), - entropy_coef * entropy, aggregated (ignore_index tokens count as masked out).
    inplace_backward is accepted for the public op's signature and changes nothing here (it is a
    memory option of the kernel path: the gradient written into the logits' storage).

    Returns (loss, stats): logprobs [B, T] (detached), entropy (masked mean), clipfrac,
    approx_kl, ratio_mean, ratio_max, kl (masked mean of the KL term, 0 without ref),
    policy_loss (aggregated policy term alone), and dual_clipfrac when dual_clip is set. Gradient
    reaches `logits` only. loss_scale multiplies the loss (hence the gradient), not the stats.
    """
    check_kl_term(kl_coef, ref_logprobs)
    logp, ent = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True)
    counted = (mask != 0) & (labels != ignore_index)
    m = torch.where(counted, mask.to(logp.dtype), 0.0)  # (aggregate and _masked_mean detach it)
    old = old_logprobs.detach().to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    policy_tok, ratio, clipped, dual = _ppo_policy_terms(logp, old, adv, m, clip_eps, clip_eps_high, dual_clip)
    total = policy_tok
    if kl_coef != 0.0:  # (check_kl_term above: ref_logprobs is given)
        ref = ref_logprobs.detach().to(logp.dtype)
        # Same reason as the log-ratio: k3's exp must not see a huge difference at uncounted tokens.
        kl_tok = kl_penalty(torch.where(counted, logp, ref), ref, kl_kind, clamp=kl_clamp)
        total = total + kl_coef * kl_tok
        kl_mean = _masked_mean(kl_tok, m).detach()
    else:
        kl_mean = logp.new_zeros(())  # (new_zeros: a DTensor stays a DTensor)
    if entropy_coef != 0.0:
        total = total - entropy_coef * ent
    loss = aggregate(total, m, agg, horizon=horizon) * loss_scale
    stats = _policy_stats(ratio, logp, old, clipped, dual, m)
    stats.update(
        logprobs=logp.detach(),
        entropy=_masked_mean(ent, m).detach(),
        kl=kl_mean,
        policy_loss=aggregate(policy_tok, m, agg, horizon=horizon).detach(),
    )
    return loss, stats


# ----------------------------------------------------------------------------------------------
# DPO family


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
    gamma=0.5,
    discopop_tau=0.05,
):
    """Per-pair preference losses, formulas of TRL's DPOTrainer.dpo_loss (and CPOTrainer for simpo).

    With logits = (pi_c - pi_r) - (ref_c - ref_r) (ref terms 0 when reference_free or simpo),
    ls = label_smoothing, s(x) = sigmoid, ls(x) = logsigmoid:
      sigmoid   -ls(b*logits)(1-ls) - ls(-b*logits) ls            (Rafailov et al.; cDPO smoothing)
      hinge     relu(1 - b*logits)                                (SLiC)
      ipo       (logits - 1/(2b))^2                               (Azar et al.)
      robust    (-ls(b*logits)(1-ls) + ls(-b*logits) ls)/(1-2ls)  (Chowdhury et al.)
      exo_pair  s(b*logits)(ls(b*logits) - log(1-ls)) + s(-b*logits)(ls(-b*logits) - log ls),
                ls = 1e-3 when 0 is given (as TRL)                (Ji et al.)
      nca_pair  -ls(cr) - 0.5 ls(-cr) - 0.5 ls(-rr), cr = b(pi_c - ref_c), rr = b(pi_r - ref_r)
      bco_pair  -ls(cr - d) - ls(-(rr - d)), d = detached batch mean of [cr, rr] (TRL keeps a
                running mean across steps; here the current batch's)
      sppo_hard (a - 1/(2b))^2 + (c + 1/(2b))^2, a = pi_c - ref_c, c = pi_r - ref_r
      apo_zero  (1 - s(b a)) + s(b c);   apo_down  s(b a) + (1 - s(b*logits))
      discopop  x = b*logits, mod = s(x / tau): -ls(x)(1 - mod) + exp(-x) mod   (Chris Lu et al.)
      simpo     x = b(pi_c - pi_r) - gamma: -ls(x)(1-ls) - ls(-x) ls  (Meng et al.; pass
                length-averaged log-probs)
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]) fp32, rewards = b(pi - ref)
    detached (b*pi where the reference is dropped). The ref log-probs may be None (the default)
    only where the reference is dropped (reference_free or simpo).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
    if label_smoothing != 0.0 and loss_type not in DPO_LABEL_SMOOTHING_TYPES:
        raise ValueError(f"label_smoothing has no meaning for loss_type={loss_type!r}")
    if loss_type == "robust" and not label_smoothing < 0.5:  # as the public op: 1 - 2 ls <= 0
        raise ValueError(f"label_smoothing must be < 0.5 for loss_type='robust', got {label_smoothing}")
    dt = _compute_dtype(policy_chosen_logps)
    pc, pr = policy_chosen_logps.to(dt), policy_rejected_logps.to(dt)
    no_ref = reference_free or loss_type == "simpo"
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is None and not no_ref:
            raise ValueError(f"{name} is required unless reference_free=True or loss_type='simpo'")
    rc = torch.zeros_like(pc) if no_ref else ref_chosen_logps.to(dt)
    rr_ = torch.zeros_like(pr) if no_ref else ref_rejected_logps.to(dt)
    b, ls = beta, label_smoothing
    chosen_lr = pc - rc
    rejected_lr = pr - rr_
    logits = chosen_lr - rejected_lr
    x = b * logits
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - x)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * b)) ** 2
    elif loss_type == "robust":
        losses = (-F.logsigmoid(x) * (1 - ls) + F.logsigmoid(-x) * ls) / (1 - 2 * ls)
    elif loss_type == "exo_pair":
        e = ls if ls != 0.0 else 1e-3
        losses = torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - e)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(e)
        )
    elif loss_type == "nca_pair":
        cr, rr = b * chosen_lr, b * rejected_lr
        losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "bco_pair":
        cr, rr = b * chosen_lr, b * rejected_lr
        delta = torch.cat([cr, rr]).mean().detach()
        losses = -F.logsigmoid(cr - delta) - F.logsigmoid(-(rr - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_lr - 0.5 / b) ** 2 + (rejected_lr + 0.5 / b) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(b * chosen_lr)) + torch.sigmoid(b * rejected_lr)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(b * chosen_lr) + (1 - torch.sigmoid(x))
    elif loss_type == "discopop":
        mod = torch.sigmoid(x / discopop_tau)
        # exp(-x) overflows for x << 0, where mod is exactly 0 in fp32 anyway: evaluate it only
        # where mod > 0 so the loss stays finite wherever TRL's formula is finite.
        exp_term = torch.where(mod > 0, torch.exp(torch.where(mod > 0, -x, 0.0)), 0.0)
        losses = -F.logsigmoid(x) * (1 - mod) + exp_term * mod
    else:  # simpo
        xs = x - gamma
        losses = -F.logsigmoid(xs) * (1 - ls) - F.logsigmoid(-xs) * ls
    return losses, (b * chosen_lr).detach(), (b * rejected_lr).detach()


def dpo_loss_from_logits(
    logits,
    labels,
    mask,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    average=False,
    temperature=1.0,
    ignore_index=-100,
    reference_free=False,
    gamma=0.5,
    discopop_tau=0.05,
):
    """DPO straight from the policy's logits [2B, T, V] (first B rows chosen, last B rejected):
    sequence_logprobs (sum, or mean with average=True) -> dpo_loss -> mean over pairs.

    Returns (loss 0-d fp32, stats): chosen_rewards, rejected_rewards (batch means),
    reward_accuracy (fraction with chosen > rejected reward), reward_margin (mean),
    policy_chosen_logps [B], policy_rejected_logps [B] (detached).
    """
    seq = sequence_logprobs(
        logits, labels, mask, average=average, temperature=temperature, ignore_index=ignore_index
    )
    B = seq.shape[0] // 2
    losses, cr, rr = dpo_loss(
        seq[:B],
        seq[B:],
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        gamma=gamma,
        discopop_tau=discopop_tau,
    )
    return losses.mean(), _dpo_reward_stats(cr, rr, seq[:B], seq[B:])


def _dpo_reward_stats(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """The stats of dpo_loss_from_logits (also rlhf_fast.dpo's): reward means, accuracy and margin
    over the [B] pairs, and the policy's sequence log-probs, detached."""
    return {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(torch.float32).mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "policy_chosen_logps": chosen_logps.detach(),
        "policy_rejected_logps": rejected_logps.detach(),
    }
