"""The reference path is the ground truth, so it is itself held to independent float64 oracles:
hand-checked values and element-by-element Python loops written from the formulas (math module,
no torch ops on the oracle side)."""

import math

import pytest
import torch
from conftest import DEVICE, INTERPRETED

import rlhf_fast
from rlhf_fast import reference as R

torch.manual_seed(0)


def _lse(row):
    mx = max(row)
    if mx == -math.inf:
        return -math.inf
    return mx + math.log(sum(math.exp(v - mx) for v in row))


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---------------------------------------------------------------------------------- log-probs


def test_logprobs_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    logp, ent = R.logprobs(logits, labels, return_entropy=True)
    assert logp.tolist() == pytest.approx([math.log(0.5), math.log(0.75)], abs=1e-12)
    assert ent.tolist() == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_loop(temperature):
    logits = torch.randn(4, 3, 13, dtype=torch.float64)
    logits[0, 0, 5] = -math.inf  # masked vocabulary entry
    labels = torch.randint(0, 13, (4, 3))
    labels[1, 2] = -100
    logp, ent = R.logprobs(logits, labels, temperature=temperature, return_entropy=True)
    for b in range(4):
        for t in range(3):
            row = [v / temperature for v in logits[b, t].tolist()]
            lse = _lse(row)
            y = int(labels[b, t])
            if y == -100:
                assert logp[b, t] == 0 and ent[b, t] == 0
                continue
            assert logp[b, t].item() == pytest.approx(row[y] - lse, abs=1e-12)
            h = -sum(math.exp(v - lse) * (v - lse) for v in row if v != -math.inf)
            assert ent[b, t].item() == pytest.approx(h, abs=1e-12)
    assert torch.allclose(R.entropy(logits[2:], temperature=temperature), ent[2:])


def test_logprobs_bad_label_is_nan_not_oob():
    logits = torch.randn(3, 5)
    logp = R.logprobs(logits, torch.tensor([5, -1, 2]))
    assert logp[0].isnan() and logp[1].isnan() and logp[2].isfinite()


def test_sequence_logprobs_sum_mean_and_empty_row():
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 4))
    labels[0, 1] = -100
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    tok = R.logprobs(logits, labels)
    s = R.sequence_logprobs(logits, labels, mask)
    a = R.sequence_logprobs(logits, labels, mask, average=True)
    for b in range(3):
        ts = [t for t in range(4) if mask[b, t] and labels[b, t] != -100]
        total = sum(tok[b, t].item() for t in ts)
        assert s[b].item() == pytest.approx(total, abs=1e-12)
        assert a[b].item() == pytest.approx(total / len(ts) if ts else 0.0, abs=1e-12)


def test_linear_logprobs_equals_matmul_then_logprobs():
    h, w, bias = torch.randn(5, 8), torch.randn(11, 8), torch.randn(11)
    y = torch.randint(0, 11, (5,))
    assert torch.allclose(R.linear_logprobs(h, w, y, bias=bias), R.logprobs(h @ w.T + bias, y), atol=1e-5)


# ---------------------------------------------------------------------------------- KL, rewards


@pytest.mark.parametrize("kind", ["k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"])
def test_kl_penalty_loop(kind):
    lp, ref = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out = R.kl_penalty(lp, ref, kind)
    for i in range(6):
        d = lp[i].item() - ref[i].item()
        want = {"k1": d, "kl": d, "k2": 0.5 * d * d, "mse": 0.5 * d * d, "abs": abs(d)}.get(kind)
        if want is None:
            want = math.exp(-d) + d - 1
        assert out[i].item() == pytest.approx(want, abs=1e-12)
    clamped = R.kl_penalty(lp * 50, ref, kind, clamp=0.5)
    assert clamped.abs().max() <= 0.5


def test_shape_rewards_loop():
    B, T = 3, 5
    lp, ref = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    scores = torch.tensor([2.0, 3.0, -1.0], dtype=torch.float64)
    out = R.shape_rewards(scores, lp, ref, mask, kl_coef=0.1)
    for b in range(B):
        last = max([t for t in range(T) if mask[b, t]], default=-1)
        for t in range(T):
            want = -0.1 * (lp[b, t].item() - ref[b, t].item()) if mask[b, t] else 0.0
            if t == last:
                want += scores[b].item()
            assert out[b, t].item() == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------- advantages


def _gae_oracle(r, v, m, gamma, lam):
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        nextvalue = lastgae = 0.0
        for t in range(T - 1, -1, -1):
            if m[b][t]:
                delta = r[b][t] + gamma * nextvalue - v[b][t]
                lastgae = delta + gamma * lam * lastgae
                nextvalue = v[b][t]
            adv[b][t] = lastgae
    return adv


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_gae_matches_scalar_loop(gamma, lam):
    B, T = 3, 9
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 3:5] = False  # a hole (multi-turn: tool output between turns)
    m[1] = False  # all masked
    m[2, -2:] = False  # right padding
    adv, ret = R.gae(r, v, m, gamma=gamma, lam=lam)
    want = _gae_oracle(r.tolist(), v.tolist(), m.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, adv + v)


def test_gae_hand_values():
    # One counted step then padding: adv = r - v; a full episode with gamma=lam=1: adv_t = sum r - v_t.
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.25, 0.125]], dtype=torch.float64)
    adv, _ = R.gae(r, v, torch.ones(1, 3))
    assert adv.tolist()[0] == pytest.approx([6 - 0.5, 5 - 0.25, 3 - 0.125])
    adv, _ = R.gae(r, v, torch.tensor([[1, 0, 0]]))
    assert adv.tolist()[0] == pytest.approx([0.5, 0.0, 0.0])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_discounted_returns_loop(gamma):
    r = torch.randn(2, 6, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    out = R.discounted_returns(r, m, gamma=gamma)
    for b in range(2):
        running = 0.0
        for t in range(5, -1, -1):
            if m[b, t]:
                running = r[b, t].item() + gamma * running
            assert out[b, t].item() == pytest.approx(running, abs=1e-12)


def test_masked_whiten_unbiased():
    x = torch.randn(3, 5, dtype=torch.float64)
    m = torch.randint(0, 2, (3, 5)).bool()
    m[0, 0] = m[0, 1] = True
    vals = [x[i, j].item() for i in range(3) for j in range(5) if m[i, j]]
    mean = sum(vals) / len(vals)
    var = sum((u - mean) ** 2 for u in vals) / (len(vals) - 1)
    out = R.masked_whiten(x, m, eps=0.0)
    assert out[0, 0].item() == pytest.approx((x[0, 0].item() - mean) / math.sqrt(var), abs=1e-10)
    out2 = R.masked_whiten(x, m, shift_mean=False, eps=0.0)
    assert out2[0, 0].item() == pytest.approx((x[0, 0].item() - mean) / math.sqrt(var) + mean, abs=1e-10)
    # Fewer than two counted tokens: finite.
    assert R.masked_whiten(x, torch.zeros(3, 5)).isfinite().all()


def test_group_advantages_loop():
    s = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    g = R.group_advantages(s, 3, method="grpo", eps=0.0)
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert g[:3].tolist() == pytest.approx([(u - mean) / std for u in (1, 2, 4)])
    assert R.group_advantages(s, 3, method="grpo")[3:].tolist() == [0, 0, 0]  # equal scores: 0, not NaN
    assert R.group_advantages(s, 3, method="dr_grpo")[:3].tolist() == pytest.approx([u - mean for u in (1, 2, 4)])
    assert R.group_advantages(s, 3, method="rloo")[:3].tolist() == pytest.approx([1 - 3, 2 - 2.5, 4 - 1.5])


# ---------------------------------------------------------------------------------- aggregation, PPO


def _agg_oracle(L, m, agg, horizon=None):
    B, T = len(L), len(L[0])
    if agg == "token-mean":
        n = sum(m[b][t] for b in range(B) for t in range(T))
        return sum(L[b][t] * m[b][t] for b in range(B) for t in range(T) if m[b][t]) / (n if n > 0 else 1)
    seqs = []
    for b in range(B):
        n = sum(m[b])
        if n == 0:
            continue
        s = sum(L[b][t] * m[b][t] for t in range(T) if m[b][t])
        seqs.append(s / n if agg == "seq-mean-token-mean" else s)
    out = sum(seqs) / max(len(seqs), 1)
    if agg == "seq-mean-token-sum-norm":
        out /= horizon if horizon is not None else T
    return out


@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_aggregate_loop(agg):
    L = torch.randn(4, 6, dtype=torch.float64)
    m = torch.randint(0, 2, (4, 6)).double()
    m[1] = 0
    L[1, 2] = math.nan  # an uncounted NaN must not leak
    got = R.aggregate(L, m, agg)
    assert got.item() == pytest.approx(_agg_oracle(L.tolist(), m.tolist(), agg), abs=1e-12)
    assert R.aggregate(L, torch.zeros(4, 6), agg).item() == 0.0
    if agg == "seq-mean-token-sum-norm":
        got = R.aggregate(L, m, agg, horizon=100)
        assert got.item() == pytest.approx(_agg_oracle(L.tolist(), m.tolist(), agg, 100), abs=1e-12)


def _ppo_oracle(lp, old, adv, m, eps_lo, eps_hi, c):
    B, T = len(lp), len(lp[0])
    L = [[0.0] * T for _ in range(B)]
    clipped = n = 0
    for b in range(B):
        for t in range(T):
            if not m[b][t]:
                continue
            r = math.exp(lp[b][t] - old[b][t])
            a = adv[b][t]
            l1, l2 = -a * r, -a * min(max(r, 1 - eps_lo), 1 + eps_hi)
            v = max(l1, l2)
            if c is not None and a < 0:
                v = min(v, -c * a)
            L[b][t] = v
            clipped += l2 > l1
            n += 1
    return L, clipped / max(n, 1)


@pytest.mark.parametrize("clip_eps_high", [None, 0.28])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_ppo_policy_loss_loop(clip_eps_high, dual_clip, agg):
    B, T = 3, 7
    lp = torch.randn(B, T, dtype=torch.float64) * 0.3
    old = lp + torch.randn(B, T, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, dtype=torch.float64)
    m = torch.randint(0, 2, (B, T))
    m[2] = 0
    lp_g = lp.clone().requires_grad_()
    loss, stats = R.ppo_policy_loss(lp_g, old, adv, m, clip_eps=0.2, clip_eps_high=clip_eps_high, dual_clip=dual_clip, agg=agg)
    L, clipfrac = _ppo_oracle(lp.tolist(), old.tolist(), adv.tolist(), m.tolist(), 0.2, clip_eps_high or 0.2, dual_clip)
    assert loss.item() == pytest.approx(_agg_oracle(L, m.tolist(), agg), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(clipfrac, abs=1e-12)
    cnt = m.bool()
    assert stats["approx_kl"].item() == pytest.approx((old - lp)[cnt].mean().item(), abs=1e-12)
    assert stats["ratio_max"].item() == pytest.approx((lp - old).exp()[cnt].max().item(), abs=1e-12)
    # Gradient by central differences of the oracle, one counted token.
    (g,) = torch.autograd.grad(loss, lp_g)
    b, t = [int(i) for i in cnt.nonzero()[0]]
    h = 1e-6
    lpp, lpm = lp.tolist(), lp.tolist()
    lpp[b][t] += h
    lpm[b][t] -= h
    fd = (
        _agg_oracle(_ppo_oracle(lpp, old.tolist(), adv.tolist(), m.tolist(), 0.2, clip_eps_high or 0.2, dual_clip)[0], m.tolist(), agg)
        - _agg_oracle(_ppo_oracle(lpm, old.tolist(), adv.tolist(), m.tolist(), 0.2, clip_eps_high or 0.2, dual_clip)[0], m.tolist(), agg)
    ) / (2 * h)
    assert g[b, t].item() == pytest.approx(fd, abs=1e-6)
    assert (g[~cnt] == 0).all()


def test_ppo_policy_loss_empty_mask_and_huge_masked_ratio():
    lp = torch.zeros(2, 3, requires_grad=True)
    old = torch.full((2, 3), -1e4)  # exp(lp - old) = inf, but nothing counts
    loss, stats = R.ppo_policy_loss(lp, old, -torch.ones(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0 and (lp.grad == 0).all() and stats["ratio_max"].item() == 0


def test_ppo_value_loss_loop():
    v, vo, R_ = (torch.randn(2, 5, dtype=torch.float64) for _ in range(3))
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]])
    loss, stats = R.ppo_value_loss(v, vo, R_, m, clip_eps=0.2)
    L = [[0.0] * 5 for _ in range(2)]
    n_clip = 0
    for b in range(2):
        for t in range(5):
            vc = min(max(v[b, t].item(), vo[b, t].item() - 0.2), vo[b, t].item() + 0.2)
            l1, l2 = (v[b, t].item() - R_[b, t].item()) ** 2, (vc - R_[b, t].item()) ** 2
            L[b][t] = max(l1, l2)
            n_clip += bool(m[b, t]) and l2 > l1
    assert loss.item() == pytest.approx(0.5 * _agg_oracle(L, m.tolist(), "token-mean"), abs=1e-12)
    assert stats["vf_clipfrac"].item() == pytest.approx(n_clip / 6, abs=1e-12)


def test_ppo_loss_from_logits_composes():
    B, T, V = 2, 4, 9
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, 0] = -100
    old, adv, ref = (torch.randn(B, T, dtype=torch.float64) for _ in range(3))
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    loss, stats = R.ppo_loss_from_logits(
        logits, labels, old, adv, m, ref_logprobs=ref, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01
    )
    lp, ent = R.logprobs(logits, labels, return_entropy=True)
    cm = m * (labels != -100)
    pl, _ = R.ppo_policy_loss(lp, old, adv, cm)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    want = pl + R.aggregate(0.05 * k3 - 0.01 * ent, cm)
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.equal(stats["logprobs"], lp)


# ---------------------------------------------------------------------------------- DPO


def _dpo_oracle(pc, pr, rc, rr, beta, t, ls=0.0, gamma=0.5, tau=0.05, batch_delta=None):
    lg = (pc - pr) - (rc - rr)
    x = beta * lg
    a, c = pc - rc, pr - rr
    if t == "sigmoid":
        return -_logsigmoid(x) * (1 - ls) - _logsigmoid(-x) * ls
    if t == "hinge":
        return max(0.0, 1 - x)
    if t == "ipo":
        return (lg - 1 / (2 * beta)) ** 2
    if t == "robust":
        return (-_logsigmoid(x) * (1 - ls) + _logsigmoid(-x) * ls) / (1 - 2 * ls)
    if t == "exo_pair":
        e = ls or 1e-3
        return _sigmoid(x) * (_logsigmoid(x) - math.log(1 - e)) + _sigmoid(-x) * (_logsigmoid(-x) - math.log(e))
    if t == "nca_pair":
        return -_logsigmoid(beta * a) - 0.5 * _logsigmoid(-beta * a) - 0.5 * _logsigmoid(-beta * c)
    if t == "bco_pair":
        return -_logsigmoid(beta * a - batch_delta) - _logsigmoid(-(beta * c - batch_delta))
    if t == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (c + 0.5 / beta) ** 2
    if t == "apo_zero":
        return (1 - _sigmoid(beta * a)) + _sigmoid(beta * c)
    if t == "apo_down":
        return _sigmoid(beta * a) + (1 - _sigmoid(x))
    if t == "discopop":
        mod = _sigmoid(x / tau)
        return -_logsigmoid(x) * (1 - mod) + (math.exp(-x) * mod if mod > 0 else 0.0)
    if t == "simpo":
        xs = beta * (pc - pr) - gamma
        return -_logsigmoid(xs) * (1 - ls) - _logsigmoid(-xs) * ls
    raise AssertionError(t)


@pytest.mark.parametrize("loss_type", R.DPO_LOSS_TYPES)
def test_dpo_loss_matches_formula(loss_type):
    B = 6
    pc, pr, rc, rr = (torch.randn(B, dtype=torch.float64) * 3 for _ in range(4))
    pc[0], pr[0], rc[0], rr[0] = 1e4, -1e4, 0.0, 0.0  # |beta * logits| = 2e3 at beta = 0.1
    pc[1], pr[1] = -1e4, 1e4
    pr[2], rr[2] = pc[2], rc[2]  # equal chosen and rejected
    losses, cr, rj = R.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    assert losses.isfinite().all() or loss_type in ("ipo", "sppo_hard")
    ref_free = loss_type == "simpo"
    delta = None
    if loss_type == "bco_pair":
        delta = (0.1 * torch.cat([pc - rc, pr - rr])).mean().item()
    for i in range(B):
        rci, rri = (0.0, 0.0) if ref_free else (rc[i].item(), rr[i].item())
        want = _dpo_oracle(pc[i].item(), pr[i].item(), rci, rri, 0.1, loss_type, batch_delta=delta)
        assert losses[i].item() == pytest.approx(want, rel=1e-10, abs=1e-10), i
    assert torch.allclose(cr, 0.1 * (pc - (0 if ref_free else rc)))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "simpo"])
def test_dpo_label_smoothing(loss_type):
    pc, pr, rc, rr = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    losses, _, _ = R.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=0.1)
    for i in range(4):
        rci, rri = (0.0, 0.0) if loss_type == "simpo" else (rc[i].item(), rr[i].item())
        want = _dpo_oracle(pc[i].item(), pr[i].item(), rci, rri, 0.5, loss_type, ls=0.1)
        assert losses[i].item() == pytest.approx(want, rel=1e-10)


def test_dpo_label_smoothing_rejected_where_meaningless():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        R.dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)


def test_dpo_reference_free_and_from_logits():
    pc, pr, rc, rr = (torch.randn(3, dtype=torch.float64) for _ in range(4))
    a, _, _ = R.dpo_loss(pc, pr, rc, rr, reference_free=True)
    b, _, _ = R.dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3))
    assert torch.allclose(a, b)
    logits = torch.randn(4, 3, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (4, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1]])
    loss, stats = R.dpo_loss_from_logits(logits, labels, mask, rc[:2], rr[:2], beta=0.2)
    seq = R.sequence_logprobs(logits, labels, mask)
    want, _, _ = R.dpo_loss(seq[:2], seq[2:], rc[:2], rr[:2], beta=0.2)
    assert loss.item() == pytest.approx(want.mean().item())
    assert stats["policy_rejected_logps"][0].item() == 0.0  # empty row


def test_entropy_gradient_finite_with_masked_vocabulary():
    x = torch.randn(3, 6, dtype=torch.float64)
    x[0, 2] = -math.inf
    x.requires_grad_()
    lp, ent = R.logprobs(x, torch.tensor([0, 1, 2]), return_entropy=True)
    (lp.sum() + ent.sum() + R.entropy(x).sum()).backward()
    assert x.grad.isfinite().all() and x.grad[0, 2] == 0


def test_value_loss_ignores_inf_at_uncounted_tokens():
    v = torch.tensor([[1.0, math.inf]], requires_grad=True)
    loss, _ = R.ppo_value_loss(v, torch.zeros(1, 2), torch.tensor([[0.0, math.nan]]), torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.isfinite() and v.grad.isfinite().all() and v.grad[0, 1] == 0


def test_fractional_masks_divide_by_their_sums():
    """A float mask weighs its tokens, and every mean divides by the weights' sum even where that
    sum is below 1 (verl's agg_loss, masked_mean, masked_whiten); by 1 only where it is 0."""
    L = torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m = torch.tensor([[0.5, 0.3, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert R.aggregate(L, m, "seq-mean-token-mean").item() == pytest.approx(1.5)  # (2 + 1) / 2
    assert R.aggregate(L[:1], m[:1], "token-mean").item() == pytest.approx(2.0)
    tiny = torch.rand(3, 5, dtype=torch.float64) * 0.05
    tiny[1] = 0  # an empty row
    Lr = torch.randn(3, 5, dtype=torch.float64)
    for agg in R.AGG_MODES:
        got = R.aggregate(Lr, tiny, agg).item()
        assert got == pytest.approx(_agg_oracle(Lr.tolist(), tiny.tolist(), agg), abs=1e-12), agg
    # masked_whiten: verl's masked_var scales the biased variance by n / (n - 1), n = sum(mask).
    x = torch.tensor([[1.0, 3.0, 5.0]], dtype=torch.float64)
    half = torch.full((1, 3), 0.5, dtype=torch.float64)
    want = [-2 / math.sqrt(8.0), 0.0, 2 / math.sqrt(8.0)]  # mean 3; var (0.5 * 4 * 2 / 1.5) * 1.5 / 0.5
    assert R.masked_whiten(x, half, eps=0.0)[0].tolist() == pytest.approx(want, abs=1e-12)
    # sequence_logprobs(average=True): the weighted sum over the weights' sum
    logits = torch.randn(1, 2, 7)
    labels = torch.tensor([[3, 5]])
    w = torch.tensor([[0.2, 0.1]])
    lp = R.logprobs(logits, labels)
    got = R.sequence_logprobs(logits, labels, w, average=True)
    torch.testing.assert_close(got, (lp * w).sum(-1) / 0.3)


def test_all_neg_inf_rows_give_zero_gradient_and_nan_stays_nan():
    """An all -inf logits row (padding) that is ignored or masked out must not poison the batch's
    gradient with logsumexp's 0 * NaN; a NaN logit must show as NaN entropy, not entropy 0."""
    V = 7
    x = torch.randn(2, 3, V)
    x[0, 1] = -math.inf  # masked out below
    x[1, 2] = -math.inf  # ignore_index label
    labels = torch.randint(0, V, (2, 3))
    labels[1, 2] = -100
    mask = torch.ones(2, 3)
    mask[0, 1] = 0
    for name, fn in {
        "logprobs+entropy": lambda z: sum(t.sum() for t in R.logprobs(z, labels, return_entropy=True)),
        "sequence_logprobs": lambda z: R.sequence_logprobs(z, labels, mask).sum(),
        "ppo_loss_from_logits": lambda z: R.ppo_loss_from_logits(
            z, labels, torch.full((2, 3), -2.0), torch.ones(2, 3), mask, entropy_coef=0.1
        )[0],
        "entropy": lambda z: R.entropy(z[1:, 2:]).sum(),
    }.items():
        z = x.clone().requires_grad_(True)
        out = fn(z)
        if name != "logprobs+entropy":  # there the masked -inf row's own log-prob is NaN (as the kernel's)
            assert torch.isfinite(out), name
        out.backward()
        assert torch.isfinite(z.grad).all(), name
        assert (z.grad[1, 2] == 0).all(), name
    lp, ent = R.logprobs(x, labels, return_entropy=True)
    assert torch.isnan(lp[0, 1]) and ent[0, 1] == 0  # a counted all -inf row: NaN log-prob, entropy 0
    nan_row = torch.tensor([[0.0, math.nan, 1.0]])
    assert torch.isnan(R.entropy(nan_row)).all()
    assert torch.isnan(R.logprobs(nan_row, torch.tensor([0]), return_entropy=True)[1]).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_trl_two_sided_clipping_delta_is_dual_clip(agg):
    """The README maps TRL GRPOTrainer's `delta` (coef_1 clamped to max=delta before
    -min(coef_1 A, coef_2 A)) onto dual_clip=delta: the same loss and gradient, written here from
    TRL's formula, with many tokens past delta at A < 0 (bnpo = token-mean, grpo =
    seq-mean-token-mean)."""
    g = torch.Generator().manual_seed(8)
    B, T = 8, 64
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2).requires_grad_()
    old = lp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    m = (torch.rand(B, T, generator=g) > 0.2).double()
    eps_lo, eps_hi, delta = 0.2, 0.28, 1.8
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    per_token = -torch.min(torch.clamp(coef_1, max=delta) * adv, coef_2 * adv)
    if agg == "token-mean":
        trl = (per_token * m).sum() / m.sum().clamp(min=1.0)
    else:
        trl = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    (trl_grad,) = torch.autograd.grad(trl, lp)
    assert ((coef_1 > delta) & (adv < 0) & (m > 0)).sum() > 20
    x = lp.detach().clone().requires_grad_()
    loss, _ = R.ppo_policy_loss(x, old, adv, m, clip_eps=eps_lo, clip_eps_high=eps_hi, dual_clip=delta, agg=agg)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, trl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_importance_sampling_weights_go_into_the_advantages(backend):
    """The README's recipe for a vLLM importance-sampling correction (TRL, verl, OpenRLHF weight the
    clipped per-token policy loss by w >= 0, then token-mean over the mask): advantages * w gives
    the same loss and gradient, dual clip included, while mask * w would change the divisor."""
    if backend == "triton" and not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip("needs the Triton kernels")
    g = torch.Generator().manual_seed(9)
    B, T = 6, 40
    lp = (torch.randn(B, T, generator=g) * 0.5 - 2).requires_grad_()
    old = lp.detach() + torch.randn(B, T, generator=g) * 0.4
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    m = (torch.rand(B, T, generator=g) > 0.2).float()
    w = torch.rand(B, T, generator=g).clamp(max=0.8) * 2  # truncated IS weights in [0, 1.6]
    eps_lo, eps_hi, dual = 0.2, 0.28, 3.0
    ratio = torch.exp(lp - old)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -dual * adv), per_token)
    want = (per_token * w * m).sum() / m.sum()
    (want_grad,) = torch.autograd.grad(want, lp)
    x = lp.detach().clone().requires_grad_()
    loss, _ = rlhf_fast.ppo_policy_loss(
        x.to(DEVICE), old.to(DEVICE), (adv * w).to(DEVICE), m.to(DEVICE), clip_eps=eps_lo, clip_eps_high=eps_hi,
        dual_clip=dual, backend=backend,
    )
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-5, atol=1e-7)
    wrong, _ = rlhf_fast.ppo_policy_loss(x.detach(), old, adv, m * w, clip_eps=eps_lo, clip_eps_high=eps_hi,
                                         dual_clip=dual, backend="reference")
    assert not torch.allclose(wrong, want, rtol=1e-3)


def test_zero_safe_exp_second_order_and_vmap():
    """The PPO ratio's and k3's exp give 0 (not 0 * inf = NaN) where an overflowed branch is not
    picked, one order up too (create_graph and forward mode), and stay usable under torch.func.vmap."""
    lp = torch.tensor([[-0.5, -0.1]], requires_grad=True)
    old = torch.tensor([[-100.0, -0.2]])  # log-ratio 99.5: fp32 exp overflows; the token is clipped
    adv, m = torch.ones(1, 2), torch.ones(1, 2)
    loss, _ = R.ppo_policy_loss(lp, old, adv, m)
    (g,) = torch.autograd.grad(loss, lp, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), lp)
    assert g[0, 0] == 0 and gg[0, 0] == 0 and torch.isfinite(gg).all()
    # Forward over reverse (torch.func.hessian) gives the reverse-over-reverse Hessian, 0 at the overflow.
    def policy_loss(t):
        return R.ppo_policy_loss(t, old, adv, m)[0]

    hessian = torch.func.hessian(policy_loss)(lp.detach())
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(policy_loss, lp))
    assert hessian.flatten()[:3].abs().max() == 0
    x = torch.tensor([-100.0, -1.0], requires_grad=True)
    kl = R.kl_penalty(x, torch.tensor([-5.0, -1.5]), "k3", clamp=10.0)
    (g,) = torch.autograd.grad(kl.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert g[0] == 0 and gg[0] == 0
    assert gg[1].item() == pytest.approx(math.exp(-1.5 + 1.0), rel=1e-5)  # d2 k3 / d logp2 = e^(ref-logp)
    batch = torch.randn(3, 1, 2) - 1.0
    per_sample = torch.func.vmap(torch.func.grad(lambda t: R.ppo_policy_loss(t, old, adv, m)[0]))(batch)
    for i in range(3):
        t = batch[i].clone().requires_grad_()
        (want,) = torch.autograd.grad(R.ppo_policy_loss(t, old, adv, m)[0], t)
        torch.testing.assert_close(per_sample[i], want)
    assert torch.autograd.gradgradcheck(R._expm1, (torch.randn(5, dtype=torch.float64, requires_grad=True),))
