"""ppo_policy_loss and ppo_value_loss: Triton kernels vs rlhf_fast.reference and a float64 loop oracle."""

import math
import os

import pytest
import torch
from conftest import DEVICE, TOL

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.ppo import _ppo_policy_op, _ppo_value_op, _scale_grad_op

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
# The interpreter runs kernels in numpy: exp() overflowing at uncounted tokens (on purpose) warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


# ----------------------------------------------------------------------------------------------
# float64 oracle, one token at a time, straight from the formulas


def oracle_weights(mask, agg, horizon=None):
    """w[b][t] with loss = sum w L (the aggregation modes written out per token)."""
    B, T = mask.shape
    m = [[float(mask[b, t]) for t in range(T)] for b in range(B)]
    per_seq = [sum(row) for row in m]
    total = sum(per_seq)
    # verl divides by the mask sums themselves (a fractional mask may sum to < 1); 1 only where 0.
    n_seqs = max(sum(1 for c in per_seq if c > 0), 1)
    h = T if horizon is None else horizon
    w = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if m[b][t] == 0.0:
                continue
            if agg == "token-mean":
                w[b][t] = m[b][t] / total
            elif agg == "seq-mean-token-sum":
                w[b][t] = m[b][t] / n_seqs
            elif agg == "seq-mean-token-mean":
                w[b][t] = m[b][t] / (per_seq[b] * n_seqs)
            else:
                w[b][t] = m[b][t] / (n_seqs * h)
    return w, m


def _masked_mean(values, m):
    total = sum(mi for row in m for mi in row)
    acc = sum(v * mi for vrow, mrow in zip(values, m) for v, mi in zip(vrow, mrow) if mi != 0.0)
    return acc / (total if total > 0 else 1.0)


def oracle_policy(logp, old, adv, mask, eps_low, eps_high, dual_clip, agg, horizon=None):
    """(loss, dloss/dlogp [B, T] float64, stats) in float64."""
    B, T = logp.shape
    w, m = oracle_weights(mask, agg, horizon)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    clipped = [[0.0] * T for _ in range(B)]
    dual = [[0.0] * T for _ in range(B)]
    kl = [[0.0] * T for _ in range(B)]
    ratios = [[0.0] * T for _ in range(B)]
    ratio_max = -math.inf
    for b in range(B):
        for t in range(T):
            if m[b][t] == 0.0:
                continue
            lp, o, a = float(logp[b, t]), float(old[b, t]), float(adv[b, t])
            r = math.exp(lp - o)
            rc = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
            l_plain, l_clip = -a * r, -a * rc
            L = max(l_plain, l_clip)
            dL = 0.0 if l_clip > l_plain else -a * r
            clipped[b][t] = float(l_clip > l_plain)
            if dual_clip is not None and a < 0:
                bound = -dual_clip * a
                if L > bound:
                    L, dL, dual[b][t] = bound, 0.0, 1.0
            loss += w[b][t] * L
            grad[b, t] = w[b][t] * dL
            kl[b][t] = o - lp
            ratios[b][t] = r
            ratio_max = max(ratio_max, r)
    stats = {
        "clipfrac": _masked_mean(clipped, m),
        "approx_kl": _masked_mean(kl, m),
        "ratio_mean": _masked_mean(ratios, m),
        "ratio_max": 0.0 if ratio_max == -math.inf else ratio_max,
    }
    if dual_clip is not None:
        stats["dual_clipfrac"] = _masked_mean(dual, m)
    return loss, grad, stats


def oracle_value(values, old_values, returns, mask, eps, agg, horizon=None):
    B, T = values.shape
    w, m = oracle_weights(mask, agg, horizon)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    clipped = [[0.0] * T for _ in range(B)]
    vs = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if m[b][t] == 0.0:
                continue
            v, vo, R = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            vc = min(max(v, vo - eps), vo + eps)
            sq, sq_c = (v - R) ** 2, (vc - R) ** 2
            loss += w[b][t] * 0.5 * max(sq, sq_c)
            grad[b, t] = w[b][t] * (0.0 if sq_c > sq else v - R)
            clipped[b][t] = float(sq_c > sq)
            vs[b][t] = v
    return loss, grad, {"vf_clipfrac": _masked_mean(clipped, m), "vpred_mean": _masked_mean(vs, m)}


# ----------------------------------------------------------------------------------------------
# helpers


def _policy_case(B, T, seed=0, dtype=torch.float32, mask_kind="bool", huge_masked=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 2.0
    old = logp + torch.randn(B, T, generator=g) * 0.3  # ratios spread across the clip range
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if B > 1:
        mask[1] = False  # an all-masked row
    if B > 2:
        mask[2, T // 2 :] = False  # right padding
    if huge_masked:
        # exp(logp - old) overflows to inf at uncounted tokens: must contribute exactly 0.
        logp = torch.where(mask, logp, torch.tensor(80.0))
        old = torch.where(mask, old, torch.tensor(-1e4))
    if mask_kind == "float":
        mask = mask.float() * (0.5 + torch.rand(B, T, generator=g))
    elif mask_kind == "tiny":  # weights whose sums (per row and in all) stay below 1
        mask = mask.float() * (0.5 + torch.rand(B, T, generator=g)) / (2 * B * T)
    elif mask_kind == "int":
        mask = mask.to(torch.int32)
    return logp.to(dtype).to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE)


def _close(actual, expected, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def _run_policy(logp, old, adv, mask, go, backend, **kw):
    x = logp.detach().clone().requires_grad_()
    loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss, stats, grad


def _opcheck_loss_op(op, args):
    # Not test_aot_dispatch_*: that test returns every output of the op from the traced graph, the
    # gradient buffer included, while the op's backward scales that buffer in place (the zero-cost
    # grad_output == 1 path). The public functions never let it escape; AOT dispatch of the real
    # use (forward + backward) is covered by the torch.compile tests.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _check_stats(stats, expected, dtype=torch.float32):
    assert set(stats) == set(expected)
    for name, value in stats.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name
        _close(value, expected[name], dtype)


# ----------------------------------------------------------------------------------------------
# policy loss


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize(
    "clip", [{}, {"clip_eps": 0.1, "clip_eps_high": 0.28}, {"clip_eps": 0.2, "dual_clip": 3.0}], ids=str
)
def test_policy_loss_matches_reference_and_oracle(agg, clip):
    logp, old, adv, mask = _policy_case(5, 29)
    go = torch.tensor(1.7, device=DEVICE)
    loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, **clip)
    e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, **clip)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(grad).all() and (grad[~mask.bool()] == 0).all()
    _close(loss, e_loss)
    _close(grad, e_grad)
    _check_stats(stats, e_stats)

    eps_low = clip.get("clip_eps", 0.2)
    eps_high = clip.get("clip_eps_high", eps_low)
    o_loss, o_grad, o_stats = oracle_policy(
        logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), eps_low, eps_high, clip.get("dual_clip"), agg
    )
    _close(loss, o_loss)
    _close(grad, o_grad * 1.7)
    _check_stats(stats, o_stats)


@pytest.mark.parametrize("agg,horizon", [("seq-mean-token-sum-norm", 64.0), ("seq-mean-token-sum-norm", 7)])
def test_policy_loss_horizon(agg, horizon):
    logp, old, adv, mask = _policy_case(4, 13, seed=1)
    go = torch.tensor(-0.6, device=DEVICE)
    loss, _, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, horizon=horizon)
    e_loss, _, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, horizon=horizon)
    _close(loss, e_loss)
    _close(grad, e_grad)
    o_loss, o_grad, _ = oracle_policy(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), 0.2, 0.2, None, agg, horizon)
    _close(loss, o_loss)
    _close(grad, -0.6 * o_grad)


@pytest.mark.parametrize("mask_kind", ["float", "int", "tiny"])
def test_policy_loss_float_and_int_masks(mask_kind):
    """Weighted masks, "tiny" ones included: their sums (per row and in all) are below 1, and the
    means still divide by those sums, as verl's agg_loss does (not by max(sum, 1))."""
    logp, old, adv, mask = _policy_case(4, 21, seed=2, mask_kind=mask_kind)
    if mask_kind == "tiny":
        assert 0 < mask.sum() < 1
    go = torch.tensor(0.9, device=DEVICE)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=2.5)
        e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, dual_clip=2.5)
        _close(loss, e_loss)
        _close(grad, e_grad)
        _check_stats(stats, e_stats)
        o_loss, o_grad, o_stats = oracle_policy(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), 0.2, 0.2, 2.5, agg)
        _close(loss, o_loss)
        _close(grad, 0.9 * o_grad)
        _check_stats(stats, o_stats)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_empty_mask_is_zero_not_nan(agg):
    logp, old, adv, mask = _policy_case(3, 9, seed=4)
    mask = torch.zeros_like(mask)
    logp = torch.full_like(logp, 1e4)  # ratio = inf everywhere, none of it counted
    go = torch.tensor(2.0, device=DEVICE)
    loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0)
    assert loss.item() == 0.0
    assert (grad == 0).all()
    assert all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_nan_at_a_counted_token_gives_nan_loss_and_stats(dual_clip):
    # As in the reference (torch.maximum / torch.clamp propagate NaN): a NaN log-prob (or value)
    # where the mask counts makes the loss and the means NaN, never a finite clipped value; a NaN
    # where the mask does not count changes nothing.
    logp, old, adv, mask = _policy_case(3, 40, seed=21)
    mask[1, 7] = True
    logp[1, 7] = float("nan")
    go = torch.tensor(1.0, device=DEVICE)
    loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", dual_clip=dual_clip)
    e_loss, e_stats, _ = _run_policy(logp, old, adv, mask, go, "reference", dual_clip=dual_clip)
    assert torch.isnan(e_loss) and torch.isnan(loss)
    for key in ("approx_kl", "ratio_mean", "ratio_max"):
        assert torch.isnan(e_stats[key]) and torch.isnan(stats[key]), key
    assert torch.isnan(grad[1, 7])
    mask[1, 7] = False
    loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", dual_clip=dual_clip)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())

    values, old_values, returns, vmask = _value_case(3, 40, seed=22)
    vmask[2, 3] = True
    values[2, 3] = float("nan")
    v_loss, _ = rlhf_fast.ppo_value_loss(values, old_values, returns, vmask, backend="triton")
    e_v_loss, _ = rlhf_fast.ppo_value_loss(values, old_values, returns, vmask, backend="reference")
    assert torch.isnan(e_v_loss) and torch.isnan(v_loss)


@pytest.mark.parametrize("B,T", [(1, 1), (7, 1), (2, 2100), (33, 3), (1100, 2)])
def test_policy_loss_awkward_shapes(B, T, monkeypatch):
    # T = 1 (several rows per program), T over a 2048-wide tile (several tiles per row; the tile
    # is pinned so this holds whatever _TILE the GPU tuning picked), B over the 1024 lanes of the
    # row-scale reduction.
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setattr(ppo_kernels, "_TILE", 2048)  # read at each launch (the tile is an argument)
    logp, old, adv, mask = _policy_case(B, T, seed=5)
    go = torch.tensor(1.3, device=DEVICE)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, clip_eps_high=0.3)
        e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, clip_eps_high=0.3)
        _close(loss, e_loss)
        _close(grad, e_grad)
        _check_stats(stats, e_stats)


def test_policy_loss_multi_block_reductions(monkeypatch):
    # The last-program reductions (row scales over B, finalize over the tiles) loop in blocks of
    # _REDUCE_BLOCK / _FINALIZE_BLOCK lanes; tiny blocks make small inputs take several iterations.
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setattr(ppo_kernels, "_REDUCE_BLOCK", 4)
    monkeypatch.setattr(ppo_kernels, "_FINALIZE_BLOCK", 4)
    monkeypatch.setattr(ppo_kernels, "_TILE", 2048)  # 2 tiles per row whatever the tuned tile
    logp, old, adv, mask = _policy_case(11, 2100, seed=15)  # 11 rows, 22 tiles
    go = torch.tensor(0.7, device=DEVICE)
    for agg in AGGS:
        loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0)
        e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, dual_clip=3.0)
        _close(loss, e_loss)
        _close(grad, e_grad)
        _check_stats(stats, e_stats)


def test_second_backward_raises_and_grad_output_one_is_free():
    logp, old, adv, mask = _policy_case(4, 19, seed=16)
    x = logp.clone().requires_grad_()
    loss, _ = rlhf_fast.ppo_policy_loss(x, old, adv, mask, backend="triton")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    _, _, e_grad = _run_policy(logp, old, adv, mask, torch.tensor(1.0), "reference")
    _close(first, e_grad)

    # The custom op (torch.compile's path) detects it too.
    y = logp.clone().requires_grad_()
    op_loss, _, _ = _ppo_policy_op(y, old, adv, mask, 0.2, 0.2, None, "token-mean", 19.0, True, 1.0)
    op_loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        op_loss.backward()

    # Gradients accumulate normally over separate forwards (the first .grad takes over the buffer).
    v, old_v, ret, vmask = _value_case(4, 19, seed=16)
    z = v.clone().requires_grad_()
    for scale in (1.0, 2.5):
        loss_v, _ = rlhf_fast.ppo_value_loss(z, old_v, ret, vmask, backend="triton")
        (loss_v * scale).backward()
    _, _, e_grad_v = _run_value(v, old_v, ret, vmask, torch.tensor(3.5), "reference")
    _close(z.grad, e_grad_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_low_precision(dtype):
    logp, old, adv, mask = _policy_case(4, 25, seed=6, dtype=dtype, huge_masked=False)
    old, adv = old.to(dtype), adv.to(dtype)
    go = torch.tensor(1.5, device=DEVICE)
    loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", dual_clip=3.0)
    assert grad.dtype == dtype
    # fp32 reference on the same (upcast) values
    e_loss, e_stats, e_grad = _run_policy(logp.float(), old.float(), adv.float(), mask, go, "reference", dual_clip=3.0)
    _close(loss, e_loss)
    _close(grad, e_grad, dtype)
    _check_stats(stats, e_stats)


def test_policy_loss_strided_inputs_and_grads_only_to_logprobs():
    logp, old, adv, mask = _policy_case(6, 2 * 15, seed=7)
    logp, old, mask = logp[:, ::2], old[:, ::2], mask[:, ::2]
    adv = adv.t().contiguous().t()[:, ::2]  # column-major then strided
    assert not logp.is_contiguous() and not adv.is_contiguous()
    x = logp.clone().requires_grad_()
    old_t, adv_t = old.clone().requires_grad_(), adv.clone().requires_grad_()
    loss, _ = rlhf_fast.ppo_policy_loss(x, old_t, adv_t, mask, backend="triton", agg="seq-mean-token-sum")
    g_x, g_old, g_adv = torch.autograd.grad(loss, (x, old_t, adv_t), allow_unused=True)
    assert g_old is None and g_adv is None
    e_loss, _, e_grad = _run_policy(logp, old, adv, mask, torch.tensor(1.0), "reference", agg="seq-mean-token-sum")
    _close(loss, e_loss)
    _close(g_x, e_grad)


def test_policy_loss_no_grad_and_determinism():
    logp, old, adv, mask = _policy_case(5, 40, seed=8)
    with torch.no_grad():
        loss, _stats = rlhf_fast.ppo_policy_loss(logp.requires_grad_(), old, adv, mask, backend="triton")
    assert not loss.requires_grad
    e_loss, _e_stats = reference.ppo_policy_loss(logp.detach(), old, adv, mask)
    _close(loss, e_loss)
    a = _run_policy(logp, old, adv, mask, torch.tensor(1.0), "triton", agg="seq-mean-token-mean")
    b = _run_policy(logp, old, adv, mask, torch.tensor(1.0), "triton", agg="seq-mean-token-mean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", ["policy", "value"])
def test_loss_scale_scales_the_loss_and_gradient_not_the_stats(loss, agg):
    """loss_scale = 1/k (gradient accumulation) gives the loss and gradient of (loss / k).backward()
    with loss.backward(); the stats stay as they are; the reference agrees."""
    if loss == "policy":
        x0, a, b, mask = _policy_case(4, 37, seed=21, mask_kind="float")
        fn, ref_fn, kw = rlhf_fast.ppo_policy_loss, reference.ppo_policy_loss, dict(dual_clip=2.5, agg=agg)
    else:
        x0, a, b, mask = _value_case(4, 37, seed=21, mask_kind="float")
        fn, ref_fn, kw = rlhf_fast.ppo_value_loss, reference.ppo_value_loss, dict(agg=agg)
    x1 = x0.clone().requires_grad_()
    loss1, stats1 = fn(x1, a, b, mask, backend="triton", **kw)
    (loss1 * 0.125).backward()
    x2 = x0.clone().requires_grad_()
    loss2, stats2 = fn(x2, a, b, mask, backend="triton", loss_scale=0.125, **kw)
    loss2.backward()
    _close(loss2, loss1 * 0.125)
    _close(x2.grad, x1.grad)
    assert torch.count_nonzero(x2.grad) > 0
    for key in stats1:
        _close(stats2[key], stats1[key])
    xr = x0.clone().requires_grad_()
    loss_r, _ = ref_fn(xr, a, b, mask, loss_scale=0.125, **kw)
    loss_r.backward()
    _close(loss2, loss_r)
    _close(x2.grad, xr.grad)
    for bad in (0.0, 1e-40, 1e40):  # out of what an fp32 weight holds
        with pytest.raises(ValueError, match="loss_scale"):
            fn(x0, a, b, mask, loss_scale=bad, backend="triton")


def test_loss_scale_under_compile_does_not_recompile_per_value():
    """A scale that changes every micro-batch must not compile a graph per value (a custom op's
    float argument is a guard; fullgraph=True fails after 8): 10 values, fullgraph, one compile."""
    logp, old, adv, mask = _policy_case(3, 13, seed=23)

    @torch.compile(fullgraph=True)
    def step(x, scale):
        loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, backend="triton", loss_scale=scale)
        return loss, stats["clipfrac"]

    for k in range(1, 11):
        x = logp.clone().requires_grad_()
        loss, clipfrac = step(x, 1.0 / k)
        loss.backward()
        xr = logp.clone().requires_grad_()
        loss_r, stats_r = reference.ppo_policy_loss(xr, old, adv, mask, dual_clip=3.0, loss_scale=1.0 / k)
        loss_r.backward()
        _close(loss, loss_r)
        _close(x.grad, xr.grad)
        _close(clipfrac, stats_r["clipfrac"])


def test_policy_loss_opcheck_and_compile():
    logp, old, adv, mask = _policy_case(3, 11, seed=9)
    x = logp.clone().requires_grad_()
    opcheck = _opcheck_loss_op
    opcheck(_ppo_policy_op, (x, old, adv, mask, 0.2, 0.2, None, "token-mean", 11.0, True, 1.0))
    opcheck(_ppo_policy_op, (x, old, adv, mask.float(), 0.2, 0.28, 3.0, "seq-mean-token-mean", 11.0, True, 1.0))
    opcheck(_ppo_policy_op, (x.detach(), old, adv, mask, 0.2, 0.2, None, "seq-mean-token-sum-norm", 4.0, False, 1.0))
    opcheck(_ppo_policy_op, (x, old, adv, mask, 0.2, 0.2, None, "seq-mean-token-sum", 11.0, True, 0.125))
    opcheck = torch.library.opcheck
    for go in (1.0, 1.5):
        g = torch.randn(3, 11, device=DEVICE).to(torch.bfloat16)
        opcheck(_scale_grad_op, (g, torch.tensor(go, device=DEVICE)))

    def fn(a, b, c, d):
        return rlhf_fast.ppo_policy_loss(a, b, c, d, clip_eps_high=0.28, dual_clip=3.0, backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    loss, stats = compiled(x, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(0.7, device=DEVICE))
    e_loss, e_stats, e_grad = _run_policy(
        logp, old, adv, mask, torch.tensor(0.7), "reference", clip_eps_high=0.28, dual_clip=3.0
    )
    _close(loss, e_loss)
    _close(grad, e_grad)
    _check_stats(stats, e_stats)


def test_custom_ops_and_eager_path_agree_bitwise():
    # Outside torch.compile the public functions use an autograd.Function twin of the custom ops.
    logp, old, adv, mask = _policy_case(4, 19, seed=10)
    go = torch.tensor(1.3, device=DEVICE)
    x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    op_loss, op_stats, _ = _ppo_policy_op(x1, old, adv, mask, 0.2, 0.28, 3.0, "seq-mean-token-mean", 19.0, True, 1.0)
    (g1,) = torch.autograd.grad(op_loss, x1, go)
    loss, stats = rlhf_fast.ppo_policy_loss(
        x2, old, adv, mask, clip_eps_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean", backend="triton"
    )
    (g2,) = torch.autograd.grad(loss, x2, go)
    assert torch.equal(op_loss, loss) and torch.equal(g1, g2)
    for i, name in enumerate(["clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac", "ratio_max"]):
        assert torch.equal(op_stats[i], stats[name]), name

    values, old_values, returns, vmask = _value_case(4, 19, seed=10)
    v1, v2 = values.clone().requires_grad_(), values.clone().requires_grad_()
    op_loss, op_stats, _ = _ppo_value_op(v1, old_values, returns, vmask, 0.2, "token-mean", 19.0, True, 1.0)
    (g1,) = torch.autograd.grad(op_loss, v1, go)
    loss, stats = rlhf_fast.ppo_value_loss(v2, old_values, returns, vmask, backend="triton")
    (g2,) = torch.autograd.grad(loss, v2, go)
    assert torch.equal(op_loss, loss) and torch.equal(g1, g2)
    assert torch.equal(op_stats[0], stats["vf_clipfrac"]) and torch.equal(op_stats[1], stats["vpred_mean"])


def test_policy_loss_bad_inputs():
    logp, old, adv, mask = _policy_case(2, 5)

    def call(**kw):
        args = {"logprobs": logp, "old_logprobs": old, "advantages": adv, "mask": mask, "backend": "triton"}
        args.update(kw)
        a, b, c, d = (args.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask"))
        return rlhf_fast.ppo_policy_loss(a, b, c, d, **args)

    with pytest.raises(ValueError, match="old_logprobs"):
        call(old_logprobs=old[:, :4])
    with pytest.raises(ValueError, match="advantages"):
        call(advantages=adv[:1])
    with pytest.raises(ValueError, match="mask"):
        call(mask=mask[:, :3])
    with pytest.raises(ValueError, match="logprobs"):
        call(logprobs=logp[0], old_logprobs=old[0], advantages=adv[0], mask=mask[0])
    with pytest.raises(ValueError, match="clip_eps"):
        call(clip_eps=-0.1)
    with pytest.raises(ValueError, match="clip_eps_high"):
        call(clip_eps_high=float("nan"))
    with pytest.raises(ValueError, match="dual_clip"):
        call(dual_clip=1.0)
    with pytest.raises(TypeError, match="dual_clip"):
        call(dual_clip="3")
    with pytest.raises(ValueError, match="agg"):
        call(agg="sum")
    with pytest.raises(ValueError, match="horizon"):
        call(horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        call(agg="seq-mean-token-sum-norm", horizon=0)
    with pytest.raises(ValueError, match="logprobs"):
        call(logprobs=logp.to(torch.int64))


# ----------------------------------------------------------------------------------------------
# value loss


def _value_case(B, T, seed=0, dtype=torch.float32, mask_kind="bool"):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g)
    old_values = values + torch.randn(B, T, generator=g) * 0.3
    returns = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if B > 1:
        mask[1] = False
    if mask_kind == "float":
        mask = mask.float() * (0.5 + torch.rand(B, T, generator=g))
    return values.to(dtype).to(DEVICE), old_values.to(DEVICE), returns.to(DEVICE), mask.to(DEVICE)


def _poison_uncounted(values, returns, mask):
    """inf / NaN at uncounted tokens: the kernel must give the same result as on clean inputs.
    (The reference's backward is not NaN-safe there for the value loss, so it gets clean inputs.)"""
    counted = mask != 0
    return (
        torch.where(counted, values, torch.tensor(float("inf"), dtype=values.dtype, device=values.device)),
        torch.where(counted, returns, torch.tensor(float("nan"), device=returns.device)),
    )


def _run_value(values, old_values, returns, mask, go, backend, **kw):
    x = values.detach().clone().requires_grad_()
    loss, stats = rlhf_fast.ppo_value_loss(x, old_values, returns, mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss, stats, grad


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
def test_value_loss_matches_reference_and_oracle(agg, clip_eps):
    values, old_values, returns, mask = _value_case(5, 27)
    go = torch.tensor(-1.3, device=DEVICE)
    dirty_values, dirty_returns = _poison_uncounted(values, returns, mask)
    kw = {"clip_eps": clip_eps, "agg": agg}
    loss, stats, grad = _run_value(dirty_values, old_values, dirty_returns, mask, go, "triton", **kw)
    e_loss, e_stats, e_grad = _run_value(values, old_values, returns, mask, go, "reference", clip_eps=clip_eps, agg=agg)
    assert torch.isfinite(grad).all()
    _close(loss, e_loss)
    _close(grad, e_grad)
    _check_stats(stats, e_stats)
    o_loss, o_grad, o_stats = oracle_value(values.cpu(), old_values.cpu(), returns.cpu(), mask.cpu(), clip_eps, agg)
    _close(loss, o_loss)
    _close(grad, -1.3 * o_grad)
    _check_stats(stats, o_stats)


def test_value_loss_float_mask_bf16_horizon_and_empty():
    values, old_values, returns, mask = _value_case(4, 19, seed=2, dtype=torch.bfloat16, mask_kind="float")
    go = torch.tensor(0.8, device=DEVICE)
    kw = {"agg": "seq-mean-token-sum-norm", "horizon": 32}
    dirty_values, dirty_returns = _poison_uncounted(values, returns, mask)
    loss, stats, grad = _run_value(dirty_values, old_values, dirty_returns, mask, go, "triton", **kw)
    assert grad.dtype == torch.bfloat16
    e_loss, e_stats, e_grad = _run_value(values.float(), old_values, returns, mask, go, "reference", **kw)
    _close(loss, e_loss)
    _close(grad, e_grad, torch.bfloat16)
    _check_stats(stats, e_stats)

    empty = torch.zeros_like(mask)
    loss, stats, grad = _run_value(values, old_values, returns, empty, go, "triton")
    assert loss.item() == 0.0 and (grad == 0).all() and all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_unclipped(agg):
    """clip_eps=None: OpenRLHF's ValueLoss(clip_eps=None), 0.5 (v - R)^2 aggregated; old_values
    is not read (NaN there changes nothing; None is accepted, as the docstring says), vf_clipfrac
    is 0; eager and compiled."""
    values, old_values, returns, mask = _value_case(4, 23, seed=5)
    nan_old = torch.full_like(old_values, float("nan"))
    go = torch.tensor(0.7, device=DEVICE)
    x = values.detach().clone().requires_grad_()
    want = 0.5 * rlhf_fast.reference.aggregate((x - returns) ** 2, mask, agg)
    (want_grad,) = torch.autograd.grad(want, x, go)
    compiled = torch.compile(
        lambda a, b, c, d: rlhf_fast.ppo_value_loss(a, b, c, d, clip_eps=None, agg=agg, backend="triton"),
        fullgraph=True,
    )
    for old in (nan_old, None):
        for backend in ("triton", "reference", "compiled"):
            x = values.detach().clone().requires_grad_()
            if backend == "compiled":
                loss, stats = compiled(x, old, returns, mask)
            else:
                loss, stats = rlhf_fast.ppo_value_loss(x, old, returns, mask, clip_eps=None, agg=agg, backend=backend)
            (grad,) = torch.autograd.grad(loss, x, go)
            _close(loss, want.detach())
            _close(grad, want_grad)
            assert stats["vf_clipfrac"].item() == 0.0, backend
    with pytest.raises(ValueError, match="old_values is required unless clip_eps=None"):
        rlhf_fast.ppo_value_loss(values, None, returns, mask)
    # a clip range wider than any difference gives the same numbers
    wide = _run_value(values, old_values, returns, mask, go, "triton", clip_eps=1e6, agg=agg)
    _close(wide[0], want.detach())


def test_value_loss_opcheck_compile_and_bad_inputs():
    values, old_values, returns, mask = _value_case(3, 10, seed=3)
    x = values.clone().requires_grad_()
    _opcheck_loss_op(_ppo_value_op, (x, old_values, returns, mask, 0.2, "token-mean", 10.0, True, 1.0))
    _opcheck_loss_op(_ppo_value_op, (x, old_values, returns, mask, 0.1, "seq-mean-token-mean", 10.0, True, 0.5))

    compiled = torch.compile(lambda a, b, c, d: rlhf_fast.ppo_value_loss(a, b, c, d, backend="triton"), fullgraph=True)
    loss, _ = compiled(x, old_values, returns, mask)
    (grad,) = torch.autograd.grad(loss, x)
    e_loss, _, e_grad = _run_value(values, old_values, returns, mask, torch.tensor(1.0), "reference")
    _close(loss, e_loss)
    _close(grad, e_grad)

    with pytest.raises(ValueError, match="old_values"):
        rlhf_fast.ppo_value_loss(values, old_values[:2], returns, mask, backend="triton")
    with pytest.raises(ValueError, match="returns"):
        rlhf_fast.ppo_value_loss(values, old_values, returns[:, :3], mask, backend="triton")
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.ppo_value_loss(values, old_values, returns, mask[:1], backend="triton")
    with pytest.raises(ValueError, match="clip_eps"):
        rlhf_fast.ppo_value_loss(values, old_values, returns, mask, clip_eps=-1.0, backend="triton")
    with pytest.raises(ValueError, match="agg"):
        rlhf_fast.ppo_value_loss(values, old_values, returns, mask, agg="mean", backend="triton")


# ----------------------------------------------------------------------------------------------
# GPU: the benchmark size against the reference


@pytest.mark.gpu
def test_policy_loss_large_gpu():
    logp, old, adv, mask = _policy_case(1024, 8192, seed=11)
    go = torch.tensor(1.0, device=DEVICE)
    for agg in AGGS:
        loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0)
        e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference", agg=agg, dual_clip=3.0)
        torch.testing.assert_close(loss, e_loss, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad, e_grad, atol=1e-9, rtol=1e-4)
        for k in e_stats:
            torch.testing.assert_close(stats[k], e_stats[k], atol=1e-5, rtol=1e-4)
    # The row scales and the loss are reduced by the last program to arrive (an arrival counter,
    # no second launch); on a GPU the arrival order changes from run to run, the bits must not.
    for agg in ("token-mean", "seq-mean-token-mean"):
        first = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0)
        for _ in range(10):
            again = _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0)
            assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[2])
            assert all(torch.equal(again[1][k], first[1][k]) for k in first[1])


# ----------------------------------------------------------------------------------------------
# Launch schedules (kernels/ppo.py: fused cooperative launch, pdl, split): same bits every way


def test_launch_schedule_switch(monkeypatch):
    """CPU tensors and the interpreter always run split (the interpreter runs programs one after
    another: a grid-wide wait would hang and griddepcontrol does not exist); on CUDA the default
    is split (the schedule that has run on a GPU), RLHF_FAST_PPO_LAUNCH picks fused or pdl, pdl
    needs sm_90+, and a bad value is an error."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    cuda0 = torch.device("cuda", 0)
    monkeypatch.delenv(ppo_kernels.LAUNCH_ENV, raising=False)
    assert ppo_kernels.launch_schedule(torch.device("cpu")) == "split"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for schedule in ppo_kernels.SCHEDULES:
        with ppo_kernels.launch_mode(schedule):
            assert ppo_kernels.launch_schedule(cuda0) == "split"  # decided before asking the device
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ppo_kernels, "_device_capability", lambda index: (8, 0))
    assert ppo_kernels.launch_schedule(cuda0) == "split"
    for auto in ("", "auto"):
        with ppo_kernels.launch_mode(auto):
            assert ppo_kernels.launch_schedule(cuda0) == "split"
    with ppo_kernels.launch_mode("fused"):
        assert ppo_kernels.launch_schedule(cuda0) == "fused"
    with ppo_kernels.launch_mode("pdl"):
        assert ppo_kernels.launch_schedule(cuda0) == "split"  # no griddepcontrol before sm_90
        monkeypatch.setattr(ppo_kernels, "_device_capability", lambda index: (9, 0))
        assert ppo_kernels.launch_schedule(cuda0) == "pdl"
        assert os.environ[ppo_kernels.LAUNCH_ENV] == "pdl"
    assert ppo_kernels.LAUNCH_ENV not in os.environ
    with ppo_kernels.launch_mode("split"):
        assert ppo_kernels.launch_schedule(cuda0) == "split"
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm: Triton drops the cooperative flag silently
    assert ppo_kernels.launch_schedule(cuda0) == "split"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(ppo_kernels, "_NO_FUSED", {0})  # the driver refused a cooperative launch
    with ppo_kernels.launch_mode("fused"):
        assert ppo_kernels.launch_schedule(cuda0) == "split"
    # The fused launch counts the mask with its own warps: the row counts (so the row scales and
    # the gradient) are the split launches' bits only while those are the count pass's warps.
    assert ppo_kernels._FUSED_WARPS == ppo_kernels._COUNT_WARPS
    with ppo_kernels.launch_mode("cooperative"), pytest.raises(ValueError, match="RLHF_FAST_PPO_LAUNCH"):
        ppo_kernels.launch_schedule(torch.device("cpu"))


def _both_losses(policy_case, value_case, go, agg):
    """(policy, value) results, each (loss, stats, grad), through the Triton backend."""
    return (
        _run_policy(*policy_case, go, "triton", agg=agg, dual_clip=3.0),
        _run_value(*value_case, go, "triton", agg=agg),
    )


def _assert_same_bits(got, want, what):
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0]) and torch.equal(g[2], w[2]), what
        assert all(torch.equal(g[1][k], w[1][k]) for k in w[1]), what


class _SmallGrid:
    """Stands in for kernels/ppo.py's _ppo_fwd_kernel and launches the real one with at most
    `n_programs` programs, so every program runs several iterations of the grid-stride loops."""

    def __init__(self, kernel, n_programs):
        self.kernel, self.n_programs = kernel, n_programs

    def __getitem__(self, grid):
        return self.kernel[(min(grid[0], self.n_programs),)]


@pytest.mark.parametrize("n_programs", [1, 3])
def test_results_do_not_depend_on_the_grid(n_programs, monkeypatch):
    """Both phases are grid-stride loops and every sum has one owner and a fixed order, so the
    fused launch (as many programs as fit on the GPU) and the split one (one per work item) must
    give the same bits. Here: 1 or 3 programs for 5 row blocks and 10 tiles against the split grid."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setattr(ppo_kernels, "_TILE", 64)
    monkeypatch.setattr(ppo_kernels, "_COUNT_TILE", 64)  # 2 rows per row block: 5 blocks for B = 9
    policy_case = _policy_case(9, 70, seed=31, mask_kind="float")
    value_case = _value_case(9, 70, seed=32)
    go = torch.tensor(0.7, device=DEVICE)
    for agg in AGGS:
        split = _both_losses(policy_case, value_case, go, agg)
        with monkeypatch.context() as patch:
            patch.setattr(ppo_kernels, "_ppo_fwd_kernel", _SmallGrid(ppo_kernels._ppo_fwd_kernel, n_programs))
            small = _both_losses(policy_case, value_case, go, agg)
        _assert_same_bits(small, split, agg)
        e_loss, _, e_grad = _run_policy(*policy_case, go, "reference", agg=agg, dual_clip=3.0)
        _close(small[0][0], e_loss)
        _close(small[0][2], e_grad)


def test_fused_kernel_whole_in_one_program(monkeypatch):
    """The fused launch's kernel itself (count, row scales and flag, each program's first tile
    loaded before its wait, the rest of the tiles, finalize) under the interpreter: with ONE
    program it never waits on another, so it runs here. Same bits as the split launches with the
    same tile."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setattr(ppo_kernels, "_TILE", 64)
    monkeypatch.setattr(ppo_kernels, "_FUSED_TILE", 64)
    monkeypatch.setattr(ppo_kernels, "_FUSED_WARPS", ppo_kernels._WARPS)
    monkeypatch.setattr(ppo_kernels, "_COUNT_TILE", 64)
    policy_case = _policy_case(9, 70, seed=34, mask_kind="float")
    value_case = _value_case(9, 70, seed=35)
    go = torch.tensor(0.7, device=DEVICE)
    for agg in AGGS:
        split = _both_losses(policy_case, value_case, go, agg)
        with monkeypatch.context() as patch:
            # CPU tensors stand in for a 1-SM CUDA device that takes the fused launch
            patch.setattr(ppo_kernels, "launch_schedule", lambda device: "fused")
            patch.setattr(ppo_kernels, "_device_index", lambda device: 0)
            patch.setattr(ppo_kernels, "_sm_count", lambda index: 1)
            patch.setattr(ppo_kernels, "_FUSED_PROGRAMS_PER_SM", {})
            fused = _both_losses(policy_case, value_case, go, agg)
            assert set(ppo_kernels._FUSED_PROGRAMS_PER_SM.values()) == {1}  # it ran fused, 1 program
        _assert_same_bits(fused, split, agg)


class _CooperativeLimit:
    """Stands in for _ppo_fwd_kernel on a GPU whose cooperative launches take at most `limit`
    programs: a bigger fused (PHASES=BOTH) launch raises `error` as Triton's launcher does; a
    fused launch that fits runs as the real kernel's two phases over the same grid (the
    interpreter cannot run the grid-wide wait, the phases' results are the same). Records the
    fused grids it was given."""

    def __init__(self, kernel, limit, error="Triton Error [CUDA]: too many blocks in cooperative launch"):
        self.kernel, self.limit, self.error, self.fused_grids = kernel, limit, error, []

    def __getitem__(self, grid):
        from rlhf_fast.kernels import ppo as ppo_kernels

        def launch(*args, PHASES, launch_cooperative_grid=False, num_warps=4, **kwargs):
            if PHASES != ppo_kernels.BOTH:
                return self.kernel[grid](*args, PHASES=PHASES, num_warps=num_warps, **kwargs)
            assert launch_cooperative_grid and not kwargs["PDL"]
            self.fused_grids.append(grid[0])
            if grid[0] > self.limit:
                raise RuntimeError(self.error)
            for phases in (ppo_kernels.COUNT, ppo_kernels.LOSS_PASS):
                self.kernel[grid](*args, PHASES=phases, num_warps=num_warps, **kwargs)
            return None  # no compiled-kernel handle: the launcher learns 1 per SM

        return launch


def test_fused_launch_shrinks_its_grid_then_falls_back_to_split(monkeypatch):
    """The fused launch asks for (SMs x programs per SM) programs; a launch the driver refuses as
    too large (nothing ran) is retried with one fewer per SM, and where even one per SM is refused,
    or the device has no cooperative launch, the device runs split from then on. Any other error
    is raised. Results match the reference every way."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setattr(ppo_kernels, "_FUSED_TILE", 64)  # 2 tiles per row, 18 in all
    # The CPU tensors stand in for CUDA device 7 with 2 SMs, fused until the driver refuses it.
    monkeypatch.setattr(ppo_kernels, "_device_index", lambda device: 7)
    monkeypatch.setattr(
        ppo_kernels, "launch_schedule", lambda device: "split" if 7 in ppo_kernels._NO_FUSED else "fused"
    )
    monkeypatch.setattr(ppo_kernels, "_sm_count", lambda index: 2)
    monkeypatch.setattr(ppo_kernels, "_NO_FUSED", set())
    monkeypatch.setattr(ppo_kernels, "_FUSED_PROGRAMS_PER_SM", {})
    monkeypatch.setattr(ppo_kernels, "_FUSED_LAUNCHED", set())
    logp, old, adv, mask = _policy_case(9, 70, seed=33)
    go = torch.tensor(1.0, device=DEVICE)
    e_loss, e_stats, e_grad = _run_policy(logp, old, adv, mask, go, "reference")

    def run(limit, **kw):
        fake = _CooperativeLimit(ppo_kernels._ppo_fwd_kernel, limit, **kw)
        with monkeypatch.context() as patch:
            patch.setattr(ppo_kernels, "_ppo_fwd_kernel", fake)
            loss, stats, grad = _run_policy(logp, old, adv, mask, go, "triton")
        _close(loss, e_loss)
        _close(grad, e_grad)
        for k in e_stats:
            _close(stats[k], e_stats[k])
        return fake.fused_grids

    assert run(limit=64) == [2]  # first call: one program per SM (always resident)
    (key,) = ppo_kernels._FUSED_PROGRAMS_PER_SM
    assert ppo_kernels._FUSED_LAUNCHED == {key}  # learned 1 (no compiled kernel here), launched
    ppo_kernels._FUSED_PROGRAMS_PER_SM[key] = 8  # as learned from a compiled kernel
    ppo_kernels._FUSED_LAUNCHED.clear()
    assert run(limit=64) == [16]  # 2 SMs x 8, under the 18 tiles
    assert ppo_kernels._FUSED_LAUNCHED == {key}
    assert run(limit=64) == [16]
    assert run(limit=5) == [16, 14, 12, 10, 8, 6, 4]  # refused 6 times, then 2 per SM fits
    assert ppo_kernels._FUSED_PROGRAMS_PER_SM[key] == 2 and ppo_kernels._FUSED_LAUNCHED == {key}
    assert run(limit=0) == [4, 2]  # even one per SM refused: split from now on
    assert ppo_kernels._NO_FUSED == {7}
    assert run(limit=64) == []

    # No cooperative launch on the device at all: split at once.
    ppo_kernels._NO_FUSED.clear()
    assert run(limit=0, error="Triton Error [CUDA]: operation not supported") == [2]
    assert ppo_kernels._NO_FUSED == {7}

    # Any other error, from the driver or not, is the caller's: raised as it is, nothing marked.
    for error in ("Triton Error [CUDA]: an illegal memory access was encountered", "a compile error, say"):
        ppo_kernels._NO_FUSED.clear()
        with monkeypatch.context() as patch:
            patch.setattr(ppo_kernels, "_ppo_fwd_kernel", _CooperativeLimit(ppo_kernels._ppo_fwd_kernel, 0, error))
            with pytest.raises(RuntimeError, match=error.split(": ")[-1]):
                _run_policy(logp, old, adv, mask, go, "triton")
        assert not ppo_kernels._NO_FUSED and ppo_kernels._FUSED_PROGRAMS_PER_SM[key] == 1

    # Under CUDA graph capture a refusal would invalidate the capture: only a count that has
    # launched is used (else 1 per SM), a refusal is raised, and nothing is learned.
    monkeypatch.setattr(ppo_kernels, "_capturing", lambda: True)
    ppo_kernels._FUSED_PROGRAMS_PER_SM[key] = 3
    ppo_kernels._FUSED_LAUNCHED.clear()
    assert run(limit=64) == [2]
    assert ppo_kernels._FUSED_PROGRAMS_PER_SM[key] == 3 and not ppo_kernels._FUSED_LAUNCHED
    with monkeypatch.context() as patch:
        patch.setattr(ppo_kernels, "_ppo_fwd_kernel", _CooperativeLimit(ppo_kernels._ppo_fwd_kernel, 0))
        with pytest.raises(RuntimeError, match="too many blocks"):
            _run_policy(logp, old, adv, mask, go, "triton")
    assert not ppo_kernels._NO_FUSED and ppo_kernels._FUSED_PROGRAMS_PER_SM[key] == 3


def test_resident_programs_per_sm(monkeypatch):
    """Programs per SM: the driver's occupancy where it can be asked, else an estimate from the
    device properties (registers per warp in units of 256, threads, shared memory)."""
    from types import SimpleNamespace

    from rlhf_fast.kernels import ppo as ppo_kernels

    h100 = SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: h100)

    def compiled(n_regs, warps=8, shared=0):
        return SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(num_warps=warps, shared=shared))

    assert ppo_kernels._estimated_occupancy(compiled(63), 0) == 4  # 64 regs x 256 threads = 16K of 64K
    assert ppo_kernels._estimated_occupancy(compiled(72), 0) == 3
    assert ppo_kernels._estimated_occupancy(compiled(32), 0) == 8  # then 2048 threads bind
    assert ppo_kernels._estimated_occupancy(compiled(32, shared=60000), 0) == 3
    assert ppo_kernels._estimated_occupancy(compiled(255, warps=16), 0) == 1  # never below 1
    assert ppo_kernels._driver_occupancy(compiled(63)) is None  # no CUfunction to ask about
    assert ppo_kernels._resident_programs_per_sm(compiled(63), 0) == 4
    monkeypatch.setattr(ppo_kernels, "_driver_occupancy", lambda compiled: 2)
    assert ppo_kernels._resident_programs_per_sm(compiled(63), 0) == 2


@pytest.mark.gpu
def test_launch_schedules_agree_bitwise_gpu(monkeypatch):
    """fused (one cooperative launch, a grid-wide wait), pdl (sm_90+) and split must give the same
    bits with the same tile, run after run (the arrival order of the programs changes, the sums'
    order does not); with the fused launch's own tile, the same gradient bits and the loss and
    stats to rounding."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    policy_case = _policy_case(512, 4100, seed=21, mask_kind="float")
    value_case = _value_case(512, 4100, seed=22)
    go = torch.tensor(0.7, device=DEVICE)
    dev = torch.device(DEVICE)
    monkeypatch.setattr(ppo_kernels, "_FUSED_PROGRAMS_PER_SM", {})
    monkeypatch.setattr(ppo_kernels, "_FUSED_LAUNCHED", set())
    occupancy = []  # (driver, estimate) for each compiled kernel whose programs per SM were learned
    resident = ppo_kernels._resident_programs_per_sm

    def spy(compiled, index):
        occupancy.append((ppo_kernels._driver_occupancy(compiled), ppo_kernels._estimated_occupancy(compiled, index)))
        return resident(compiled, index)

    monkeypatch.setattr(ppo_kernels, "_resident_programs_per_sm", spy)
    split = {}
    for agg in AGGS:
        with ppo_kernels.launch_mode("split"):
            assert ppo_kernels.launch_schedule(dev) == "split"
            split[agg] = _both_losses(policy_case, value_case, go, agg)
        with ppo_kernels.launch_mode("fused"):
            for _ in range(2):  # the second call runs with the programs per SM the first learned
                got = _run_policy(*policy_case, go, "triton", agg=agg, dual_clip=3.0)
                assert torch.equal(got[2], split[agg][0][2]), agg
                torch.testing.assert_close(got[0], split[agg][0][0], atol=1e-7, rtol=1e-5)
                for k in got[1]:
                    torch.testing.assert_close(got[1][k], split[agg][0][1][k], atol=1e-7, rtol=1e-5)
    # The fused launches ran as such (none refused and run split), with the programs per SM the
    # driver computes for the compiled kernel (which the estimate from the properties matches).
    assert not ppo_kernels._NO_FUSED
    assert len(occupancy) == len(AGGS) and all(driver is not None for driver, _ in occupancy), occupancy
    assert sorted(ppo_kernels._FUSED_PROGRAMS_PER_SM.values()) == sorted(d for d, _ in occupancy)
    assert all(driver == estimate for driver, estimate in occupancy), occupancy
    assert set(ppo_kernels._FUSED_LAUNCHED) == set(ppo_kernels._FUSED_PROGRAMS_PER_SM)

    monkeypatch.setattr(ppo_kernels, "_FUSED_TILE", ppo_kernels._TILE)
    monkeypatch.setattr(ppo_kernels, "_FUSED_WARPS", ppo_kernels._WARPS)
    for agg in AGGS:
        for schedule in ("fused", "pdl"):
            if schedule == "pdl" and torch.cuda.get_device_capability()[0] < 9:
                continue
            with ppo_kernels.launch_mode(schedule):
                assert ppo_kernels.launch_schedule(dev) == schedule
                for _ in range(5):
                    _assert_same_bits(_both_losses(policy_case, value_case, go, agg), split[agg], (schedule, agg))
    assert not ppo_kernels._NO_FUSED


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["auto", "fused"])
def test_launch_schedule_in_a_cuda_graph_gpu(schedule, monkeypatch):
    """The default (split) and the fused (cooperative) forward, with the backward, captured in a
    CUDA graph and replayed on new inputs give the eager results of the same schedule."""
    logp, old, adv, mask = _policy_case(256, 3000, seed=41)
    x = logp.detach().clone().requires_grad_()
    static = [x, old.clone(), adv.clone(), mask.clone()]

    def step():
        x.grad = None
        loss, stats = rlhf_fast.ppo_policy_loss(*static, agg="seq-mean-token-mean", backend="triton")
        loss.backward()
        return loss, stats["clipfrac"]

    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setenv(ppo_kernels.LAUNCH_ENV, schedule)
    launched = []  # (capturing, fused launch accepted)
    launch_fused = ppo_kernels._launch_fused

    def spy(*args, **kwargs):
        launched.append((ppo_kernels._capturing(), launch_fused(*args, **kwargs)))
        return launched[-1][1]

    monkeypatch.setattr(ppo_kernels, "_launch_fused", spy)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile, and learn the programs per SM outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss, clipfrac = step()
    for seed in (42, 43):
        new = _policy_case(256, 3000, seed=seed)
        with torch.no_grad():
            for buf, value in zip(static, new):
                buf.copy_(value)
        graph.replay()
        e_loss, e_stats, e_grad = _run_policy(
            *new, torch.tensor(1.0, device=DEVICE), "triton", agg="seq-mean-token-mean"
        )
        assert torch.equal(loss, e_loss) and torch.equal(clipfrac, e_stats["clipfrac"])
        assert torch.equal(x.grad, e_grad)
    if schedule == "fused":
        assert (True, True) in launched and all(ok for _, ok in launched), launched  # in the capture too
    else:
        assert launched == []  # the default never tries the cooperative launch
    assert not ppo_kernels._NO_FUSED


@pytest.mark.gpu
def test_fused_launch_under_reduce_overhead_compile_gpu(monkeypatch):
    """torch.compile(mode="reduce-overhead") with RLHF_FAST_PPO_LAUNCH=fused: cudagraph trees warm
    up ONCE, then capture, so the capture sees a kernel whose programs-per-SM count was learned but
    never launched (it then captures at 1 per SM). Each replay on new inputs equals the eager loss,
    stats and gradient."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    monkeypatch.setenv(ppo_kernels.LAUNCH_ENV, "fused")
    torch._dynamo.reset()

    def step(x, old, adv, mask):
        loss, stats = rlhf_fast.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", backend="triton")
        return loss, stats["clipfrac"]

    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(50, 55):
        logp, old, adv, mask = _policy_case(256, 3000, seed=seed)
        x = logp.detach().clone().requires_grad_()
        loss, clipfrac = compiled(x, old, adv, mask)
        loss.backward()
        # (clones: the next replay overwrites the graphs' output buffers)
        loss, clipfrac, grad = loss.detach().clone(), clipfrac.clone(), x.grad.clone()
        e_loss, e_stats, e_grad = _run_policy(
            logp, old, adv, mask, torch.tensor(1.0, device=DEVICE), "triton", agg="seq-mean-token-mean"
        )
        _close(loss, e_loss)
        _close(clipfrac, e_stats["clipfrac"])
        _close(grad, e_grad)
    assert not ppo_kernels._NO_FUSED


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("B", "T", "dtype", "mask_kind", "write_grad"),
    [
        (3, 5, torch.float32, "bool", True),  # fewer tiles than SMs
        (1, 50000, torch.bfloat16, "float", True),  # one row, many tiles
        (2000, 37, torch.float32, "bool", False),  # B > 1024: the row-scale loop runs twice
        (300, 1, torch.float16, "float", True),  # T = 1
    ],
)
def test_fused_launch_odd_shapes_gpu(B, T, dtype, mask_kind, write_grad):
    """The fused launch at shapes where programs get no tile, one tile or many, against the split
    launches (same gradient bits) and the reference, for both losses."""
    from rlhf_fast.kernels import ppo as ppo_kernels

    logp, old, adv, mask = _policy_case(B, T, seed=51, dtype=dtype, mask_kind=mask_kind)
    values, old_values, returns, vmask = _value_case(B, T, seed=52, dtype=dtype, mask_kind=mask_kind)
    go = torch.tensor(1.0, device=DEVICE)
    for agg in ("token-mean", "seq-mean-token-mean"):
        results = {}
        for schedule in ("fused", "split"):
            with ppo_kernels.launch_mode(schedule):
                assert ppo_kernels.launch_schedule(torch.device(DEVICE)) == schedule
                if write_grad:
                    results[schedule] = (
                        _run_policy(logp, old, adv, mask, go, "triton", agg=agg, dual_clip=3.0),
                        _run_value(values, old_values, returns, vmask, go, "triton", agg=agg),
                    )
                else:
                    with torch.no_grad():
                        results[schedule] = (
                            rlhf_fast.ppo_policy_loss(logp, old, adv, mask, agg=agg, backend="triton"),
                            rlhf_fast.ppo_value_loss(values, old_values, returns, vmask, agg=agg, backend="triton"),
                        )
        fused, split = results["fused"], results["split"]
        if write_grad:
            assert torch.equal(fused[0][2], split[0][2]) and torch.equal(fused[1][2], split[1][2]), agg
        for got, want in zip(fused, split):
            torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
            for k in want[1]:
                torch.testing.assert_close(got[1][k], want[1][k], atol=1e-6, rtol=1e-5)
        e_loss, _ = reference.ppo_policy_loss(
            logp.float(), old, adv, mask, agg=agg, dual_clip=3.0 if write_grad else None
        )
        _close(fused[0][0], e_loss, dtype)
    assert not ppo_kernels._NO_FUSED
