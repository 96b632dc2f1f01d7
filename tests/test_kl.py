"""kl_penalty and shape_rewards: Triton kernels vs rlhf_fast.reference and a float64 loop oracle."""

import math

import pytest
import torch
from conftest import DEVICE, TOL

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.kl import _kl_penalty_backward_op, _kl_penalty_op, _shape_rewards_op

KINDS = ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]
ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+", "k2+": "k2", "mse+": "k2"}


# ----------------------------------------------------------------------------------------------
# float64 oracle, one element at a time, straight from the formulas


def oracle_kl(logp: float, ref: float, kind: str, clamp=None) -> tuple[float, float]:
    """(value, d value / d logp) in float64; d/dref is the negative."""
    d = logp - ref
    if kind.endswith("+"):  # straight-through: the base's (clamped) value, k2's gradient
        return oracle_kl(logp, ref, kind[:-1], clamp)[0], d
    if kind == "k1":
        v, g = d, 1.0
    elif kind == "k2":
        v, g = 0.5 * d * d, d
    elif kind == "k3":
        v, g = math.exp(ref - logp) - (ref - logp) - 1.0, 1.0 - math.exp(ref - logp)
    else:
        v, g = abs(d), (1.0 if d > 0 else (-1.0 if d < 0 else 0.0))
    if clamp is not None:
        if v < -clamp or v > clamp:
            g = 0.0
        v = min(max(v, -clamp), clamp)
    return v, g


def oracle_kl_tensor(logp, ref, kind, clamp=None):
    flat_l, flat_r = logp.double().flatten().tolist(), ref.double().flatten().tolist()
    vals, grads = zip(*(oracle_kl(a, b, kind, clamp) for a, b in zip(flat_l, flat_r)))
    shape = logp.shape
    f64 = torch.float64
    return torch.tensor(vals, dtype=f64).reshape(shape), torch.tensor(grads, dtype=f64).reshape(shape)


def oracle_shape_rewards(scores, logp, ref, mask, kl_coef, kind):
    B, T = logp.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = -1
        for t in range(T):
            m = float(mask[b, t])
            if m != 0.0:
                last = t
                out[b, t] = -kl_coef * oracle_kl(float(logp[b, t]), float(ref[b, t]), kind)[0] * m
        if last >= 0:
            out[b, last] += float(scores[b])
    return out


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(shape, generator=g) * 3.0).to(dtype)
    ref = (logp.float() + torch.randn(shape, generator=g) * 0.7).to(dtype)
    return logp.to(DEVICE), ref.to(DEVICE)


def _close(actual, expected, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# kl_penalty


@pytest.mark.parametrize("kind", KINDS + list(ALIASES))
@pytest.mark.parametrize("clamp", [None, 0.25])
def test_kl_penalty_matches_reference_and_oracle(kind, clamp):
    logp, ref = _inputs((3, 41))
    go = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 1.7
    logp_t, ref_t = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(logp_t, ref_t, kind, clamp=clamp, backend="triton")
    assert out.dtype == torch.float32 and out.shape == logp.shape
    gl, gr = torch.autograd.grad(out, (logp_t, ref_t), go)

    logp_r, ref_r = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    expected = reference.kl_penalty(logp_r, ref_r, kind, clamp=clamp)
    egl, egr = torch.autograd.grad(expected, (logp_r, ref_r), go)
    _close(out, expected)
    _close(gl, egl)
    _close(gr, egr)

    o_val, o_grad = oracle_kl_tensor(logp.cpu(), ref.cpu(), ALIASES.get(kind, kind), clamp)
    _close(out, o_val)
    _close(gl, o_grad * go.double().cpu())
    _close(gr, -o_grad * go.double().cpu())


@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_low_precision_and_mixed_dtypes(kind):
    # bf16 policy log-probs, fp16 reference: compare with the fp32 reference on the same (upcast) values.
    logp, ref = _inputs((5, 37), torch.bfloat16)
    ref = ref.to(torch.float16)
    logp_t, ref_t = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(logp_t, ref_t, kind, backend="triton")
    go = torch.full_like(out, 0.5)
    gl, gr = torch.autograd.grad(out, (logp_t, ref_t), go)
    assert out.dtype == torch.float32 and gl.dtype == torch.bfloat16 and gr.dtype == torch.float16

    logp32, ref32 = logp.float().requires_grad_(), ref.float().requires_grad_()
    expected = reference.kl_penalty(logp32, ref32, kind)
    egl, egr = torch.autograd.grad(expected, (logp32, ref32), go)
    _close(out, expected)
    _close(gl, egl, torch.bfloat16)
    _close(gr, egr, torch.float16)


def test_kl_penalty_shapes_strides_and_partial_grads():
    # 3-D and non-contiguous input; gradient wanted for one input only; empty tensor.
    base_l, base_r = _inputs((4, 9, 2 * 33))
    logp, ref = base_l[..., ::2], base_r[..., 1::2]
    assert not logp.is_contiguous()
    logp_t = logp.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(logp_t, ref, "k3", clamp=10.0, backend="triton")
    _close(out, reference.kl_penalty(logp, ref, "k3", clamp=10.0))
    (g,) = torch.autograd.grad(out.sum(), logp_t)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1.0
    _close(g, torch.where(k3 <= 10.0, 1.0 - torch.exp(ref - logp), 0.0))  # 0 where the clamp bites

    ref_t = ref.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(logp, ref_t, "k2", backend="triton")
    (g,) = torch.autograd.grad(out.sum(), ref_t)
    _close(g, -(logp - ref))

    empty = torch.empty(0, 7, device=DEVICE)
    assert rlhf_fast.kl_penalty(empty, empty, "k3", backend="triton").shape == (0, 7)


def test_kl_penalty_clamp_gradient_is_zero_outside():
    logp = torch.tensor([0.0, -5.0, 3.0, -0.1], device=DEVICE, requires_grad=True)
    ref = torch.zeros(4, device=DEVICE)
    out = rlhf_fast.kl_penalty(logp, ref, "k1", clamp=1.0, backend="triton")
    (g,) = torch.autograd.grad(out.sum(), logp)
    assert out.tolist() == pytest.approx([0.0, -1.0, 1.0, -0.1])
    assert g.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_k3_is_accurate_for_small_log_ratios():
    # exp(-d) + d - 1 evaluated as written in fp32 loses most of its digits for the small d of a
    # policy close to its reference (12 % error at |d| = 1e-3); the kernel's series does not.
    mags = torch.logspace(-6, math.log10(0.6), 60, dtype=torch.float64)
    d = torch.cat([mags, -mags]).float()  # both sides of the 1/4 switch to the series
    logp = d.to(DEVICE).requires_grad_(True)
    ref = torch.zeros_like(d, device=DEVICE)
    out = rlhf_fast.kl_penalty(logp, ref, "k3", backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), logp)
    x = -d.double()
    exact = (torch.expm1(x) - x).to(DEVICE)
    exact_grad = (-torch.expm1(x)).to(DEVICE)
    rel = ((out.double() - exact).abs() / exact).max().item()
    rel_grad = ((grad.double() - exact_grad).abs() / exact_grad.abs()).max().item()
    assert rel < 1e-5 and rel_grad < 1e-5, (rel, rel_grad)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_clamp_keeps_nan(kind):
    # torch.clamp keeps NaN (a NaN log-prob, or -inf - -inf); a clamp must not turn it into -c.
    nan, inf = float("nan"), float("inf")
    logp = torch.tensor([nan, -inf, 0.5, 0.0], device=DEVICE, requires_grad=True)
    ref = torch.tensor([0.0, -inf, nan, 0.0], device=DEVICE)
    out = rlhf_fast.kl_penalty(logp, ref, kind, clamp=10.0, backend="triton")
    x = logp.detach().clone().requires_grad_(True)
    want = reference.kl_penalty(x, ref, kind, clamp=10.0)
    assert want[:3].isnan().all()
    torch.testing.assert_close(out, want, equal_nan=True)
    # and the gradient (chain rule through torch.clamp: 0 * NaN = NaN where the KL is NaN)
    (g,) = torch.autograd.grad(out.sum(), logp)
    (want_g,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g, want_g, equal_nan=True)


def test_kl_penalty_opcheck_and_compile():
    logp, ref = _inputs((3, 17))
    logp.requires_grad_()
    for kind, clamp in [("k1", None), ("k3", 10.0), ("abs", 0.5), ("k2", None)]:
        torch.library.opcheck(_kl_penalty_op, (logp, ref, kind, clamp))
    go = torch.randn(3, 17, device=DEVICE)
    torch.library.opcheck(_kl_penalty_backward_op, (go, logp.detach(), ref, "k3", None, True, True))
    torch.library.opcheck(_kl_penalty_backward_op, (go, logp.detach(), ref, "k2", 1.0, True, False))

    def fn(a, b):
        return rlhf_fast.kl_penalty(a, b, "low_var_kl", clamp=10.0, backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(logp, ref)
    (g,) = torch.autograd.grad(out.sum(), logp)
    expected = reference.kl_penalty(logp, ref, "k3", clamp=10.0)
    (eg,) = torch.autograd.grad(expected.sum(), logp)
    _close(out, expected)
    _close(g, eg)


def test_kl_custom_op_and_eager_path_agree_bitwise():
    # Outside torch.compile kl_penalty uses an autograd.Function twin of the custom op.
    logp, ref = _inputs((4, 23))
    go = torch.randn(4, 23, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    a1, r1 = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    a2, r2 = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    out1 = _kl_penalty_op(a1, r1, "k3", 10.0)
    out2 = rlhf_fast.kl_penalty(a2, r2, "k3", clamp=10.0, backend="triton")
    g1 = torch.autograd.grad(out1, (a1, r1), go)
    g2 = torch.autograd.grad(out2, (a2, r2), go)
    assert torch.equal(out1, out2) and torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])


def test_kl_penalty_bad_inputs():
    logp, ref = _inputs((2, 5))
    with pytest.raises(ValueError, match="kind"):
        rlhf_fast.kl_penalty(logp, ref, "k4", backend="triton")
    with pytest.raises(ValueError, match="ref_logprobs"):
        rlhf_fast.kl_penalty(logp, ref[:, :4], backend="triton")
    with pytest.raises(ValueError, match="clamp"):
        rlhf_fast.kl_penalty(logp, ref, clamp=-1.0, backend="triton")
    with pytest.raises(TypeError, match="clamp"):
        rlhf_fast.kl_penalty(logp, ref, clamp="10", backend="triton")
    with pytest.raises(ValueError, match="logprobs"):
        rlhf_fast.kl_penalty(logp.to(torch.int64), ref, backend="triton")
    with pytest.raises(TypeError, match="ref_logprobs"):
        rlhf_fast.kl_penalty(logp, [1.0], backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rlhf_fast.kl_penalty(logp, ref, backend="cuda")
    with pytest.raises(ValueError, match="kl_penalty"):
        rlhf_fast.kl_penalty(logp, ref, backend="cpp")


# ----------------------------------------------------------------------------------------------
# shape_rewards


def _reward_case(B, T, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3.0
    ref = logp + torch.randn(B, T, generator=g) * 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, -1] = True  # the last token counts in row 0
    if B > 1:
        mask[1] = False  # a row with nothing counted
    if B > 2:
        mask[2, T // 2 :] = False  # right padding
    # Uncounted tokens may hold anything, including inf / NaN: they must not leak.
    logp = torch.where(mask, logp, torch.tensor(float("inf")))
    ref = torch.where(mask, ref, torch.tensor(float("nan")))
    if mask_kind == "float":
        mask = mask.float() * (0.5 + torch.rand(B, T, generator=g))
    elif mask_kind == "int":
        mask = mask.to(torch.int64)
    scores = torch.randn(B, generator=g)
    return scores.to(DEVICE), logp.to(DEVICE), ref.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("kind", KINDS + ["low_var_kl"])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int"])
def test_shape_rewards_matches_reference_and_oracle(kind, mask_kind):
    scores, logp, ref, mask = _reward_case(5, 23, mask_kind)
    out = rlhf_fast.shape_rewards(scores, logp, ref, mask, kl_coef=0.05, kind=kind, backend="triton")
    expected = reference.shape_rewards(scores, logp, ref, mask, kl_coef=0.05, kind=kind)
    assert out.dtype == torch.float32 and out.shape == (5, 23)
    assert torch.isfinite(out).all()
    _close(out, expected)
    canonical = ALIASES.get(kind, kind)
    _close(out, oracle_shape_rewards(scores.cpu(), logp.cpu(), ref.cpu(), mask.cpu(), 0.05, canonical))
    assert (out[1] == 0).all()  # no counted token: no KL, no score


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 2500)])
def test_shape_rewards_awkward_shapes(B, T):
    # T = 1, and T above the kernel's block so the row loop runs more than once.
    scores, logp, ref, mask = _reward_case(B, T, "bool", seed=3)
    out = rlhf_fast.shape_rewards(scores, logp, ref, mask, kl_coef=0.1, kind="k3", backend="triton")
    _close(out, reference.shape_rewards(scores, logp, ref, mask, kl_coef=0.1, kind="k3"))


def test_shape_rewards_bf16_strided_and_no_grad():
    scores, logp, ref, mask = _reward_case(4, 2 * 19, "bool", seed=5)
    logp = logp.to(torch.bfloat16)[:, ::2].requires_grad_()
    ref, mask = ref[:, ::2], mask[:, ::2]
    scores = scores.requires_grad_()
    out = rlhf_fast.shape_rewards(scores, logp, ref, mask, kl_coef=0.2, kind="k2", backend="triton")
    assert not out.requires_grad  # rewards are targets
    expected = reference.shape_rewards(scores.detach(), logp.detach().float(), ref, mask, kl_coef=0.2, kind="k2")
    _close(out, expected)


def test_shape_rewards_adaptive_kl_coef_under_compile_does_not_recompile_per_value():
    """An adaptive KL controller changes kl_coef every step: under torch.compile(fullgraph=True)
    that must not compile a graph per value (a custom op's float argument is a guard, and
    fullgraph fails after 8). 10 values; each result equals the eager kernel's bit for bit."""
    scores, logp, ref, mask = _reward_case(4, 19, "float", seed=7)
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(kl_coef):
        return rlhf_fast.shape_rewards(scores, logp, ref, mask, kl_coef=kl_coef, kind="k3", backend="triton")

    for k in range(1, 11):
        kl_coef = 0.013 * k
        out = step(kl_coef)
        eager = rlhf_fast.shape_rewards(scores, logp, ref, mask, kl_coef=kl_coef, kind="k3", backend="triton")
        assert torch.equal(out, eager)
        _close(out, reference.shape_rewards(scores, logp, ref, mask, kl_coef=kl_coef, kind="k3"))
    assert counter.frame_count <= 2  # the first value, then one graph with a symbolic kl_coef


def test_shape_rewards_opcheck_and_bad_inputs():
    scores, logp, ref, mask = _reward_case(3, 11, "bool")
    logp, ref = logp.nan_to_num(0.0), ref.nan_to_num(0.0)
    torch.library.opcheck(_shape_rewards_op, (scores, logp, ref, mask, 0.1, "k1"))
    torch.library.opcheck(_shape_rewards_op, (scores, logp, ref, mask.float(), 0.1, "k3"))
    coef_t = torch.tensor(0.1, device=DEVICE)
    torch.library.opcheck(_shape_rewards_op, (scores, logp, ref, mask, 0.0, "k3", coef_t))

    def call(**kw):
        args = {
            "scores": scores,
            "logprobs": logp,
            "ref_logprobs": ref,
            "mask": mask,
            "kl_coef": 0.1,
            "backend": "triton",
        }
        args.update(kw)
        s, lp, rf, m = args.pop("scores"), args.pop("logprobs"), args.pop("ref_logprobs"), args.pop("mask")
        return rlhf_fast.shape_rewards(s, lp, rf, m, **args)

    with pytest.raises(ValueError, match="scores"):
        call(scores=scores[:2])
    with pytest.raises(ValueError, match="mask"):
        call(mask=mask[:, :5])
    with pytest.raises(ValueError, match="ref_logprobs"):
        call(ref_logprobs=ref[:2])
    with pytest.raises(ValueError, match="kind"):
        call(kind="k5")
    with pytest.raises(TypeError, match="kl_coef"):
        call(kl_coef=None)
    with pytest.raises(ValueError, match="logprobs"):
        call(logprobs=logp[0], ref_logprobs=ref[0], mask=mask[0])


def test_shared_validators():
    # rlhf_fast._backend.check_float / check_int: used for every hyper-parameter of kl, ppo, dpo.
    from rlhf_fast._backend import check_float, check_int

    assert check_float("x", 3) == 3.0 and isinstance(check_float("x", 3), float)
    assert check_float("x", None, allow_none=True) is None
    assert check_float("x", 0.0, low=0.0) == 0.0 and check_float("x", 1.0, high=1.0) == 1.0
    for bad, err in ((True, TypeError), ("1", TypeError), (None, TypeError), (float("nan"), ValueError),
                     (float("inf"), ValueError), (-float("inf"), ValueError)):
        with pytest.raises(err, match="beta"):
            check_float("beta", bad)
    with pytest.raises(ValueError, match="beta must be > 0"):
        check_float("beta", 0.0, low=0.0, low_inclusive=False)
    with pytest.raises(ValueError, match="eps must be < 0.5"):
        check_float("eps", 0.5, high=0.5, high_inclusive=False)
    with pytest.raises(ValueError, match="eps must be <= 1"):
        check_float("eps", 1.5, high=1)
    assert check_int("n", 7, low=0) == 7
    for bad in (True, 1.0, "3", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_int("n", 0, low=1)
