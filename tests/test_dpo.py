"""DPO family: rlhf_fast.dpo_loss / dpo_loss_from_logits (Triton kernels) against the reference
(rlhf_fast.reference) and against an independent float64 oracle written here per element with
`math` (gradients by central differences of that oracle).

On CPU the kernels run under TRITON_INTERPRET=1 (conftest), so sizes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, TOL

from rlhf_fast import reference
from rlhf_fast.dpo import DPO_LOSS_TYPES, dpo_loss, dpo_loss_from_logits

DEVICE_ = DEVICE
LOSS_TYPES = DPO_LOSS_TYPES  # the 11 DPOTrainer types + simpo

# ----------------------------------------------------------------------------------------------
# Independent float64 oracle (one pair at a time, plain math)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _oracle_one(pc, pr, rc, rr, *, loss_type, beta, ls, gamma, tau, delta):
    """Loss of one pair in float64. rc = rr = 0 for reference-free; delta = bco_pair's batch mean."""
    a, b = pc - rc, pr - rr
    d = a - b
    x = beta * d
    if loss_type == "sigmoid":
        return -_logsig(x) * (1 - ls) - _logsig(-x) * ls
    if loss_type == "hinge":
        return max(0.0, 1 - x)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-_logsig(x) * (1 - ls) + _logsig(-x) * ls) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        e = ls if ls > 0 else 1e-3
        return _sig(x) * (_logsig(x) - math.log(1 - e)) + _sig(-x) * (_logsig(-x) - math.log(e))
    if loss_type == "nca_pair":
        return -_logsig(beta * a) - 0.5 * _logsig(-beta * a) - 0.5 * _logsig(-beta * b)
    if loss_type == "bco_pair":
        return -_logsig(beta * a - delta) - _logsig(-(beta * b - delta))
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - _sig(beta * a)) + _sig(beta * b)
    if loss_type == "apo_down":
        return _sig(beta * a) + (1 - _sig(x))
    if loss_type == "discopop":
        mod = _sig(x / tau)
        # exp(-x) * mod straight where float64 holds exp(-x); in the log domain beyond.
        blend = math.exp(-x) * mod if -x < 700 else math.exp(-x + _logsig(x / tau))
        return -_logsig(x) * (1 - mod) + blend
    if loss_type == "simpo":
        y = x - gamma
        return -_logsig(y) * (1 - ls) - _logsig(-y) * ls
    raise AssertionError(loss_type)


def oracle(pc, pr, rc, rr, *, loss_type, beta, ls=0.0, gamma=0.5, tau=0.05, reference_free=False, grad_out=None):
    """(losses, chosen_rewards, rejected_rewards, grads of sum(grad_out * losses) w.r.t. the 4 inputs)."""
    pc, pr, rc, rr = (t.double().tolist() for t in (pc, pr, rc, rr))
    if reference_free or loss_type == "simpo":
        rc = [0.0] * len(pc)
        rr = [0.0] * len(pc)
    n = len(pc)
    rewards = [beta * (pc[i] - rc[i]) for i in range(n)] + [beta * (pr[i] - rr[i]) for i in range(n)]
    delta = sum(rewards) / max(len(rewards), 1)  # bco_pair: detached batch mean (held fixed below)
    kw = dict(loss_type=loss_type, beta=beta, ls=ls, gamma=gamma, tau=tau, delta=delta)
    losses = [_oracle_one(pc[i], pr[i], rc[i], rr[i], **kw) for i in range(n)]
    grads = [[0.0] * n for _ in range(4)]
    g = [1.0] * n if grad_out is None else grad_out.double().tolist()
    for i in range(n):
        args = [pc[i], pr[i], rc[i], rr[i]]
        # Central differences; a larger step where the loss is huge (its rounding / h would swamp
        # the quotient): huge losses here are quadratics (exact for any step) or saturated and linear.
        h = 1e-5 * max(1.0, math.sqrt(abs(losses[i])))
        for k in range(4):
            up, dn = list(args), list(args)
            up[k] += h
            dn[k] -= h
            step = up[k] - dn[k]
            grads[k][i] = g[i] * (_oracle_one(*up, **kw) - _oracle_one(*dn, **kw)) / step
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_t(losses), as_t(rewards[:n]), as_t(rewards[n:]), [as_t(v) for v in grads]


# ----------------------------------------------------------------------------------------------
# Inputs


def random_pairs(B=33, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pc = -20 + 5 * torch.randn(B, generator=gen, dtype=torch.float64)
    pr = -22 + 5 * torch.randn(B, generator=gen, dtype=torch.float64)
    rc = pc + 2 * torch.randn(B, generator=gen, dtype=torch.float64)
    rr = pr + 2 * torch.randn(B, generator=gen, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE_) for t in (pc, pr, rc, rr)]


def extreme_pairs(dtype=torch.float32):
    """With beta = 0.1: beta*d = +-1e4 and +-2e4, d = 0 with huge a = b, equal chosen and rejected."""
    rows = [
        (0.0, -1e5, 0.0, 0.0),  # beta*d = +1e4, beta*b = -1e4
        (-1e5, 0.0, 0.0, 0.0),  # beta*d = -1e4, beta*a = -1e4
        (-5.0, -5.0, -7.0, -7.0),  # chosen == rejected, d = 0
        (-3.0, -3.0, -3.0, -3.0),  # everything equal
        (0.0, 0.0, -1e5, -1e5),  # a = b = +1e5, d = 0
        (-1e5, -1e5, 0.0, 0.0),  # a = b = -1e5, d = 0
        (0.0, -1e5, -1e5, 0.0),  # beta*d = +2e4
        (-1e5, 0.0, 0.0, -1e5),  # beta*d = -2e4
        (-1.5, -2.0, -1.0, -4.0),  # an ordinary pair beside them
    ]
    cols = list(zip(*rows))
    return [torch.tensor(c, dtype=torch.float64).to(dtype).to(DEVICE_) for c in cols]


def grad_out_like(B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(B, generator=gen)).to(DEVICE_)


def run(fn, inputs, grad_out, **kw):
    """Outputs and input gradients of fn(*inputs, **kw) with losses weighted by grad_out."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    losses, cr, rr = fn(*leaves, **kw)
    grads = torch.autograd.grad(losses, leaves, grad_out.to(losses.dtype), allow_unused=True)
    return losses, cr, rr, grads


def assert_close(actual, expected, atol, rtol, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite {actual}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_all(inputs, loss_type, beta, *, ls=0.0, gamma=0.5, tau=0.05, reference_free=False):
    B = inputs[0].shape[0]
    g = grad_out_like(B)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls, gamma=gamma, discopop_tau=tau,
              reference_free=reference_free)
    got = run(dpo_loss, inputs, g, backend="triton", **kw)
    ref = run(reference.dpo_loss, inputs, g, **kw)
    orc = oracle(*inputs, loss_type=loss_type, beta=beta, ls=ls, gamma=gamma, tau=tau,
                 reference_free=reference_free, grad_out=g)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert not got[1].requires_grad and not got[2].requires_grad
    atol, rtol = TOL[torch.float32]
    for k, name in enumerate(("losses", "chosen_rewards", "rejected_rewards")):
        assert_close(got[k], ref[k], atol, rtol, f"{loss_type} {name} vs reference")
        assert_close(got[k], orc[k], 1e-4, 1e-5, f"{loss_type} {name} vs float64 oracle")
    no_ref = reference_free or loss_type == "simpo"
    for k, name in enumerate(("d/d policy_chosen", "d/d policy_rejected", "d/d ref_chosen", "d/d ref_rejected")):
        if no_ref and k >= 2:
            assert got[3][k] is None, f"{loss_type}: reference-free loss gave a gradient to {name}"
            continue
        assert got[3][k] is not None, name
        assert got[3][k].dtype == inputs[k].dtype
        assert_close(got[3][k], ref[3][k], atol, rtol, f"{loss_type} {name} vs reference")
        assert_close(got[3][k], orc[3][k], 1e-4, 1e-4, f"{loss_type} {name} vs float64 oracle")


# ----------------------------------------------------------------------------------------------
# dpo_loss: every type, random and extreme inputs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", ["random", "extreme"])
def test_dpo_loss_matches_reference_and_oracle(loss_type, case):
    if case == "random":
        check_against_all(random_pairs(), loss_type, beta=0.5)
    else:
        check_against_all(extreme_pairs(), loss_type, beta=0.1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_reference_free(loss_type):
    inputs = random_pairs(B=9, seed=3)
    check_against_all(inputs, loss_type, beta=0.3, reference_free=True)
    # The reference log-probs are ignored: None gives the same result.
    with_ref = dpo_loss(*inputs, beta=0.3, loss_type=loss_type, reference_free=True, backend="triton")
    without = dpo_loss(inputs[0], inputs[1], None, None, beta=0.3, loss_type=loss_type, reference_free=True,
                       backend="triton")
    for x, y in zip(with_ref, without):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize(
    "loss_type,ls",
    [("sigmoid", 0.1), ("sigmoid", 1.0), ("robust", 0.2), ("robust", 0.45), ("exo_pair", 0.05),
     ("exo_pair", 0.0), ("simpo", 0.1)],
)
@pytest.mark.parametrize("case", ["random", "extreme"])
def test_label_smoothing(loss_type, ls, case):
    inputs, beta = (random_pairs(B=17, seed=5), 0.4) if case == "random" else (extreme_pairs(), 0.1)
    check_against_all(inputs, loss_type, beta, ls=ls)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("sigmoid", "robust", "exo_pair", "simpo")])
def test_label_smoothing_rejected_where_unused(loss_type):
    pc, pr, rc, rr = random_pairs(B=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=0.1, backend="triton")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss_from_logits(torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), None, rc[:1], rr[:1],
                             loss_type=loss_type, label_smoothing=0.1, backend="triton")


@pytest.mark.parametrize(
    "loss_type,ls", [("robust", 0.5), ("robust", 0.7), ("exo_pair", 1.0), ("sigmoid", -0.1), ("sigmoid", 1.5)]
)
def test_label_smoothing_out_of_range(loss_type, ls):
    pc, pr, rc, rr = random_pairs(B=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=ls, backend="triton")
    if loss_type == "robust":  # the ground truth refuses it too (1 - 2 ls <= 0)
        with pytest.raises(ValueError, match="label_smoothing"):
            reference.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=ls)


@pytest.mark.parametrize("gamma", [0.0, 1.3])
def test_simpo_gamma_and_rewards(gamma):
    inputs = random_pairs(B=11, seed=7)
    check_against_all(inputs, "simpo", beta=2.0, gamma=gamma)
    losses, cr, rr = dpo_loss(inputs[0], inputs[1], None, None, beta=2.0, loss_type="simpo", gamma=gamma,
                              backend="triton")
    torch.testing.assert_close(cr, 2.0 * inputs[0])  # SimPO rewards: beta * pi (no reference)
    torch.testing.assert_close(rr, 2.0 * inputs[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "discopop", "apo_down"])
def test_dpo_loss_low_precision(dtype, loss_type):
    inputs = random_pairs(B=21, seed=11, dtype=dtype)
    g = grad_out_like(21)
    got = run(dpo_loss, inputs, g, beta=0.2, loss_type=loss_type, backend="triton")
    ref = run(reference.dpo_loss, inputs, g, beta=0.2, loss_type=loss_type)
    # Both compute in fp32 from the same rounded inputs: fp32-level agreement of the outputs.
    atol, rtol = TOL[torch.float32]
    for k in range(3):
        assert got[k].dtype == torch.float32
        assert_close(got[k], ref[k], atol, rtol, f"{dtype} output {k}")
    atol, rtol = TOL[dtype]
    for k in range(4):
        assert got[3][k].dtype == dtype
        assert_close(got[3][k], ref[3][k], atol, rtol, f"{dtype} grad {k}")


def test_dpo_loss_mixed_dtypes():
    pc, pr, rc, rr = random_pairs(B=8, seed=2)
    inputs = [pc.bfloat16(), pr.bfloat16(), rc, rr.half()]
    g = grad_out_like(8)
    got = run(dpo_loss, inputs, g, loss_type="nca_pair", backend="triton")
    ref = run(reference.dpo_loss, inputs, g, loss_type="nca_pair")
    assert_close(got[0], ref[0], *TOL[torch.float32], "losses")
    for k in range(4):
        assert got[3][k].dtype == inputs[k].dtype
        assert_close(got[3][k], ref[3][k], *TOL[inputs[k].dtype], f"grad {k}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # tau > 1: the true value overflows
@pytest.mark.parametrize("tau", [0.05, 2.0])
def test_discopop_finite_where_trl_formula_is(tau):
    """TRL's formula exp(-x) * sigmoid(x / tau) gives inf * 0 = NaN for x << 0; ours is finite there
    and equal wherever TRL's fp32 value is finite."""
    x = torch.cat([torch.linspace(-300, 300, 121), torch.tensor([-1e4, -2e4, 1e4, 0.0])]).to(DEVICE_)
    beta = 0.1
    pc = x / beta
    zeros = torch.zeros_like(pc)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=beta, loss_type="discopop", discopop_tau=tau,
                            backend="triton")
    mod = torch.sigmoid(x / tau)
    trl = -torch.nn.functional.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
    finite = torch.isfinite(trl)
    assert (~finite).any()  # the sweep does reach TRL's breakdown
    assert torch.isfinite(losses[finite]).all()
    torch.testing.assert_close(losses[finite], trl[finite], atol=1e-5, rtol=1e-5)
    if tau < 1:  # the true value is finite everywhere: so is ours
        assert torch.isfinite(losses).all()


def test_discopop_gradient_finite_at_extremes():
    pc = torch.tensor([-1e5, -2e5, 1e5, 0.0], device=DEVICE_, requires_grad=True)
    zeros = torch.zeros(4, device=DEVICE_)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.1, loss_type="discopop", backend="triton")
    (grad,) = torch.autograd.grad(losses.sum(), [pc])
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()


def test_dpo_loss_empty_batch():
    e = torch.zeros(0, device=DEVICE_, requires_grad=True)
    losses, cr, rr = dpo_loss(e, e, e.detach(), e.detach(), loss_type="bco_pair", backend="triton")
    assert losses.shape == cr.shape == rr.shape == (0,)
    (grad,) = torch.autograd.grad(losses.sum(), [e])
    assert grad.shape == (0,)


def test_dpo_loss_deterministic():
    inputs = random_pairs(B=40, seed=9)
    a = dpo_loss(*inputs, loss_type="discopop", backend="triton")
    b = dpo_loss(*inputs, loss_type="discopop", backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_dpo_loss_reference_backend_is_reference():
    inputs = random_pairs(B=5)
    got = dpo_loss(*inputs, loss_type="exo_pair", backend="reference")
    exp = reference.dpo_loss(*inputs, loss_type="exo_pair")
    for x, y in zip(got, exp):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_dpo_loss_validation():
    pc, pr, rc, rr = random_pairs(B=4)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=float("nan"))
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta="0.1")
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(pc[None], pr, rc, rr)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(TypeError, match="ref_chosen_logps"):
        dpo_loss(pc, pr, [0.0] * 4, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(pc, pr, None, None)
    with pytest.raises(ValueError, match="backend"):
        dpo_loss(pc, pr, rc, rr, backend="cuda")
    with pytest.raises(ValueError, match="no C\\+\\+"):
        dpo_loss(pc, pr, rc, rr, backend="cpp")


# ----------------------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile


@pytest.mark.parametrize("loss_type,with_ref", [("sigmoid", True), ("bco_pair", True), ("discopop", True),
                                                ("simpo", False), ("apo_down", False)])
def test_opcheck(loss_type, with_ref):
    pc, pr, rc, rr = random_pairs(B=6, seed=4)
    leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    refs = (leaves[2], leaves[3]) if with_ref else (None, None)
    args = (leaves[0], leaves[1], *refs, 0.2, loss_type, 0.0, 0.5, 0.05)
    torch.library.opcheck(torch.ops.rlhf_fast.dpo_pair_loss.default, args)
    g = grad_out_like(6)
    bwd_args = (g, pc, pr, rc if with_ref else None, rr if with_ref else None, 0.2, loss_type, 0.0, 0.5, 0.05)
    torch.library.opcheck(torch.ops.rlhf_fast.dpo_pair_loss_bwd.default, bwd_args)


def test_compile_fullgraph_dpo_loss():
    inputs = random_pairs(B=10, seed=6)

    def fn(pc, pr, rc, rr):
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="bco_pair", backend="triton")
        return (losses * torch.arange(1, 11, device=pc.device)).sum(), (cr - rj).mean()

    compiled = torch.compile(fn, fullgraph=True)
    leaves_e = [t.clone().requires_grad_() for t in inputs]
    leaves_c = [t.clone().requires_grad_() for t in inputs]
    out_e = fn(*leaves_e)
    out_c = compiled(*leaves_c)
    torch.testing.assert_close(out_c[0], out_e[0])
    torch.testing.assert_close(out_c[1], out_e[1])
    out_e[0].backward()
    out_c[0].backward()
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_compile_fullgraph_from_logits():
    logits, labels, mask, rc, rr = logits_case(torch.float32, seed=8)

    def fn(z):
        loss, stats = dpo_loss_from_logits(z, labels, mask, rc, rr, beta=0.2, backend="triton")
        return loss, stats["reward_accuracy"]

    compiled = torch.compile(fn, fullgraph=True)
    z_e = logits.clone().requires_grad_()
    z_c = logits.clone().requires_grad_()
    loss_e, acc_e = fn(z_e)
    loss_c, acc_c = compiled(z_c)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(acc_c, acc_e)
    (0.7 * loss_e).backward()
    (0.7 * loss_c).backward()
    torch.testing.assert_close(z_c.grad, z_e.grad)


# ----------------------------------------------------------------------------------------------
# dpo_loss_from_logits


def logits_case(dtype, *, B=2, T=5, V=1271, seed=0, empty_rows=(), ignore=True):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2 * B, T, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    mask = torch.rand(2 * B, T, generator=gen) > 0.3
    mask[:, 0] = True
    if ignore:
        labels[0, -1] = -100  # an ignored token inside the mask
    for r in empty_rows:
        mask[r] = False
    rc = -30 + 5 * torch.randn(B, generator=gen)
    rr = -30 + 5 * torch.randn(B, generator=gen)
    return logits.to(DEVICE_), labels.to(DEVICE_), mask.to(DEVICE_), rc.to(DEVICE_), rr.to(DEVICE_)


def composed_reference(logits, labels, mask, rc, rr, *, average=False, temperature=1.0, **kw):
    seq = reference.sequence_logprobs(logits, labels, mask, average=average, temperature=temperature)
    B = seq.shape[0] // 2
    losses, _, _ = reference.dpo_loss(seq[:B], seq[B:], rc, rr, **kw)
    return losses.mean()


def from_logits_grads(fn, logits, rc, rr, *args, **kw):
    z = logits.clone().requires_grad_()
    rcl = rc.clone().requires_grad_()
    rrl = rr.clone().requires_grad_()
    out = fn(z, *args, rcl, rrl, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    gz, grc, grr = torch.autograd.grad(0.7 * loss, [z, rcl, rrl], allow_unused=True)
    return loss, gz, grc, grr, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "loss_type,average,temperature",
    [("sigmoid", False, 1.0), ("ipo", True, 1.0), ("bco_pair", False, 0.7), ("simpo", True, 1.0),
     ("apo_zero", False, 1.0)],
)
def test_from_logits_matches_reference(dtype, loss_type, average, temperature):
    logits, labels, mask, rc, rr = logits_case(dtype, seed=1)
    kw = dict(beta=0.2, loss_type=loss_type)

    def ours(z, lab, m, a, b, **k):
        return dpo_loss_from_logits(z, lab, m, a, b, average=average, temperature=temperature, backend="triton", **k)

    def theirs(z, lab, m, a, b, **k):
        return composed_reference(z, lab, m, a, b, average=average, temperature=temperature, **k)

    loss, gz, grc, grr, (_, stats) = from_logits_grads(ours, logits, rc, rr, labels, mask, **kw)
    loss_r, gz_r, grc_r, grr_r, _ = from_logits_grads(theirs, logits, rc, rr, labels, mask, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gz.dtype == dtype
    atol, rtol = TOL[torch.float32]
    assert_close(loss, loss_r, atol, rtol, "loss")
    assert_close(gz, gz_r, *TOL[dtype], "grad logits")
    if loss_type == "simpo":
        assert grc is None and grr is None
    else:
        assert_close(grc, grc_r, atol, rtol, "grad ref_chosen")
        assert_close(grr, grr_r, atol, rtol, "grad ref_rejected")
    # The stats equal the reference's.
    loss_full, stats_r = reference.dpo_loss_from_logits(
        logits, labels, mask, rc, rr, average=average, temperature=temperature, **kw
    )
    assert set(stats) == set(stats_r)
    for key in stats:
        assert not stats[key].requires_grad
        assert_close(stats[key], stats_r[key], 1e-5, 1e-5, key)


def test_from_logits_empty_rows_and_empty_mask():
    """Rows with no counted token (one chosen, one rejected) and a fully masked batch: finite, 0 grad rows."""
    logits, labels, mask, rc, rr = logits_case(torch.float32, B=2, seed=2, empty_rows=(1, 2))
    loss, gz, _, _, (_, stats) = from_logits_grads(
        lambda z, lab, m, a, b, **k: dpo_loss_from_logits(z, lab, m, a, b, backend="triton", **k),
        logits, rc, rr, labels, mask, loss_type="sigmoid",
    )
    loss_r, gz_r, _, _, _ = from_logits_grads(composed_reference, logits, rc, rr, labels, mask, loss_type="sigmoid")
    assert torch.isfinite(loss) and torch.isfinite(gz).all()
    assert_close(loss, loss_r, 1e-5, 1e-5, "loss")
    assert_close(gz, gz_r, 1e-5, 1e-5, "grad")
    assert torch.count_nonzero(gz[1]) == 0 and torch.count_nonzero(gz[2]) == 0
    assert stats["policy_chosen_logps"][1] == 0 and stats["policy_rejected_logps"][0] == 0

    mask = torch.zeros_like(mask)
    loss, gz, _, _, _ = from_logits_grads(
        lambda z, lab, m, a, b, **k: dpo_loss_from_logits(z, lab, m, a, b, backend="triton", average=True, **k),
        logits, rc, rr, labels, mask, loss_type="ipo",
    )
    loss_r = composed_reference(logits, labels, mask, rc, rr, average=True, loss_type="ipo")
    assert torch.isfinite(loss) and torch.count_nonzero(gz) == 0
    assert_close(loss, loss_r, 1e-5, 1e-5, "empty-mask loss")


def test_from_logits_no_mask_and_ignore_index():
    logits, labels, _, rc, rr = logits_case(torch.float32, seed=3, ignore=False)
    labels[1, 2:] = 7  # a custom ignore index
    loss, gz, grc, grr, _ = from_logits_grads(
        lambda z, lab, m, a, b, **k: dpo_loss_from_logits(z, lab, m, a, b, ignore_index=7, backend="triton", **k),
        logits, rc, rr, labels, None, loss_type="hinge", beta=0.05,
    )
    seq = reference.sequence_logprobs(logits, labels, None, ignore_index=7)
    exp = reference.dpo_loss(seq[:2], seq[2:], rc, rr, loss_type="hinge", beta=0.05)[0].mean()
    assert_close(loss, exp, 1e-5, 1e-5, "loss")
    assert torch.count_nonzero(gz[1, 2:]) == 0


@pytest.mark.parametrize("loss_type", ["hinge", "sigmoid"])
def test_from_logits_bad_label_gives_nan(loss_type):
    # -100 is not the ignore index here: an out-of-range label, NaN for its pair as in the reference.
    logits, labels, mask, rc, rr = logits_case(torch.float32, seed=3)
    mask[0, -1] = True  # the token with label -100 counts
    loss, _ = dpo_loss_from_logits(logits, labels, mask, rc, rr, ignore_index=7, loss_type=loss_type,
                                   backend="triton")
    loss_r, _ = reference.dpo_loss_from_logits(logits, labels, mask, rc, rr, ignore_index=7, loss_type=loss_type)
    assert torch.isnan(loss) and torch.isnan(loss_r)


def test_from_logits_reference_free():
    logits, labels, mask, _, _ = logits_case(torch.float32, seed=4)
    loss, stats = dpo_loss_from_logits(logits, labels, mask, None, None, reference_free=True, loss_type="nca_pair",
                                       backend="triton")
    seq = reference.sequence_logprobs(logits, labels, mask)
    exp = reference.dpo_loss(seq[:2], seq[2:], None, None, reference_free=True, loss_type="nca_pair")[0].mean()
    assert_close(loss, exp, 1e-5, 1e-5, "loss")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_from_logits_validation(backend):
    """Every check runs before the backend is chosen: the reference path (CPU's default) must not
    silently accept what the kernel path rejects (a negative temperature negated the logits)."""
    logits, labels, mask, rc, rr = logits_case(torch.float32, seed=5)
    f = lambda *a, **k: dpo_loss_from_logits(*a, backend=backend, **k)  # noqa: E731
    for temperature in (-1.0, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            f(logits, labels, mask, rc, rr, temperature=temperature)
    with pytest.raises(TypeError, match="ignore_index"):
        f(logits, labels, mask, rc, rr, ignore_index=1.5)
    with pytest.raises(ValueError, match="labels must have dtype"):
        f(logits, labels.float(), mask, rc, rr)
    with pytest.raises(ValueError, match="even"):
        f(logits[:3], labels[:3], mask[:3], rc, rr)
    with pytest.raises(ValueError, match="even"):
        f(logits[:0], labels[:0], mask[:0], rc[:0], rr[:0])
    with pytest.raises(ValueError, match="logits"):
        f(logits[0], labels, mask, rc, rr)
    with pytest.raises(ValueError, match="vocabulary"):
        f(logits[..., :0], labels, mask, rc, rr)  # V = 0: nothing to gather a label from
    with pytest.raises(ValueError, match="labels"):
        f(logits, labels[:, :3], mask, rc, rr)
    with pytest.raises(ValueError, match="mask"):
        f(logits, labels, mask[:2], rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        f(logits, labels, mask, rc[:1], rr)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        f(logits, labels, mask, rc, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        f(logits, labels, mask, None, rr)
    with pytest.raises(ValueError, match="loss_type"):
        f(logits, labels, mask, rc, rr, loss_type="orpo")


@pytest.mark.gpu
@pytest.mark.slow
def test_from_logits_large_gpu():
    """Real sizes on a GPU: 2B x T x V past 2**31 elements (int64 offsets), bf16."""
    B, T, V = 4, 2048, 151936
    torch.manual_seed(0)
    logits = torch.randn(2 * B, T, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (2 * B, T), device="cuda")
    mask = torch.ones(2 * B, T, device="cuda", dtype=torch.bool)
    rc = -T * 12 + torch.randn(B, device="cuda")
    rr = -T * 12 + torch.randn(B, device="cuda")
    z = logits.clone().requires_grad_()
    loss, _ = dpo_loss_from_logits(z, labels, mask, rc, rr, backend="triton")
    loss.backward()
    exp = composed_reference(logits, labels, mask, rc, rr)
    assert_close(loss, exp, 1e-4, 1e-4, "loss")
    assert torch.isfinite(z.grad).all()
