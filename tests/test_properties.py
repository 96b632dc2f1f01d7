"""Property-based tests (hypothesis): kernels equal the reference on shapes, masks and values
drawn at random, including the awkward ones (T = 1, empty rows, holes, huge |beta * delta|).
Example counts stay small because on CPU the Triton kernels run under the interpreter."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlhf_fast
from conftest import DEVICE
from rlhf_fast import reference
from rlhf_fast.aggregation import AGG_MODES, aggregation_weights

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON = "triton"


@st.composite
def masked_batch(draw, max_b=6, max_t=40):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < density
    return B, T, g, mask


@SETTINGS
@given(batch=masked_batch(), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_cpp_equals_reference(batch, gamma, lam):
    B, T, g, mask = batch
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    adv, ret = rlhf_fast.gae(r, v, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = reference.gae(r, v, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, want_adv, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ret, want_ret, atol=1e-4, rtol=1e-5)
    ret2 = rlhf_fast.discounted_returns(r, mask, gamma=gamma)
    torch.testing.assert_close(ret2, reference.discounted_returns(r, mask, gamma=gamma), atol=1e-4, rtol=1e-5)


@SETTINGS
@given(batch=masked_batch(), agg=st.sampled_from(AGG_MODES))
def test_aggregation_weights_are_the_reference_aggregate(batch, agg):
    B, T, g, mask = batch
    L = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = aggregation_weights(mask, agg).double()
    assert math.isclose((w * L).sum().item(), reference.aggregate(L, mask, agg).item(), rel_tol=1e-5, abs_tol=1e-6)


@SETTINGS
@given(
    n=st.integers(1, 5),
    V=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([1.0, 0.5, 1.7]),
    with_ignored=st.booleans(),
)
def test_logprobs_kernel_equals_reference_and_is_batch_invariant(n, V, seed, temperature, with_ignored):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 4).to(DEVICE)
    labels = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    if with_ignored:
        labels[0] = -100
    logp, ent = rlhf_fast.logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=TRITON)
    want_logp, want_ent = reference.logprobs(logits, labels, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    alone = rlhf_fast.logprobs(logits[-1:], labels[-1:], temperature=temperature, backend=TRITON)
    assert torch.equal(alone, logp[-1:])  # bitwise: a row's result does not depend on its batch


DPO_PAIR_VALUES = st.one_of(st.floats(-50.0, 50.0), st.sampled_from([-1e4, 1e4, 0.0]))


@SETTINGS
@given(
    values=st.lists(st.tuples(DPO_PAIR_VALUES, DPO_PAIR_VALUES, DPO_PAIR_VALUES, DPO_PAIR_VALUES), min_size=1, max_size=6),
    loss_type=st.sampled_from(reference.DPO_LOSS_TYPES),
    beta=st.sampled_from([0.01, 0.1, 1.0]),
)
def test_dpo_kernel_equals_reference(values, loss_type, beta):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float32, device=DEVICE) for col in zip(*values))
    pc.requires_grad_()
    losses, cr, rj = rlhf_fast.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, backend=TRITON)
    pc_ref = pc.detach().clone().requires_grad_()
    want, want_cr, want_rj = reference.dpo_loss(pc_ref, pr, rc, rr, beta=beta, loss_type=loss_type)
    finite = want.isfinite()
    assert torch.equal(losses.isfinite(), finite)
    if loss_type not in ("ipo", "sppo_hard"):  # squared losses legitimately reach 1e8 at |delta| = 2e4
        assert finite.all()
    torch.testing.assert_close(losses[finite], want[finite], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cr, want_cr)
    (g,) = torch.autograd.grad(losses.sum(), pc)
    (g_ref,) = torch.autograd.grad(want.sum(), pc_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(reference.KL_KINDS))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 200), scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_kl_kernel_equals_reference(kind, seed, n, scale):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(n, generator=g) * scale).to(DEVICE)
    ref = (torch.randn(n, generator=g) * scale).to(DEVICE)
    got = rlhf_fast.kl_penalty(lp, ref, kind, backend=TRITON)
    want = reference.kl_penalty(lp, ref, kind)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
