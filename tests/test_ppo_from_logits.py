"""rlhf_fast.ppo_loss_from_logits: the fused Triton kernel against the reference composition.

Expected values are built from the reference pieces (logprobs -> ppo_policy_loss, kl_penalty and
entropy terms through aggregate) and also checked against reference.ppo_loss_from_logits: loss,
every stat, and the gradient w.r.t. the logits. Low-precision logits are compared with the fp32
reference on the same (already rounded) logits, at conftest.TOL. On CPU the kernels run under
TRITON_INTERPRET=1, so the sizes stay small (V = 1271: not a power of two, not a multiple of 128).
"""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, TOL

from rlhf_fast import PPOLoss, reference
from rlhf_fast.kernels import _terms
from rlhf_fast.kernels import ppo_from_logits as pfl_kernels
from rlhf_fast.kernels._rows import row_config
from rlhf_fast.ppo_from_logits import ppo_loss_from_logits

# The interpreter evaluates both sides of tl.where on masked lanes (exp(-inf) * -inf ...): numpy
# warns about values the kernel then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

V = 1271
STAT_KEYS = ("entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max", "kl", "policy_loss")


def make_inputs(B=2, T=6, dtype=torch.float32, *, seed=0, holes=True, ignore=True, noise=0.5, temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 2.0).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    if holes:
        mask[0, 1] = 0
        mask[-1, 3:5] = 0
    if ignore:
        labels[0, 2] = -100
        labels[-1, -1] = -100
    # old / ref log-probs near the new ones, so ratios spread over both sides of the clip range.
    logp = reference.logprobs(logits.float(), labels, temperature=temperature)
    old = logp + noise * torch.randn(B, T, generator=gen)
    ref = logp + noise * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    # Every batch has a dual-clipped token (r ~ e, A < 0) and one far below the clip range.
    old[:, 0] = logp[:, 0] - 1.0
    adv[:, 0] = -adv[:, 0].abs() - 0.1
    if T > 1:
        old[:, 1] = logp[:, 1] + 1.0
    to = dict(device=DEVICE)
    return logits.to(**to), labels.to(**to), old.to(**to), adv.to(**to), mask.to(**to), ref.to(**to)


def expected_from_pieces(logits, labels, old, adv, mask, *, temperature=1.0, clip_eps=0.2, clip_eps_high=None,
                         dual_clip=None, ref_logprobs=None, kl_coef=0.0, kl_kind="k3", kl_clamp=None,
                         entropy_coef=0.0, agg="token-mean", horizon=None, ignore_index=-100):
    """(loss, stats) composed from reference.logprobs, ppo_policy_loss, kl_penalty, aggregate."""
    logp, ent = reference.logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=True)
    counted = (mask != 0) & (labels != ignore_index)
    m = torch.where(counted, mask.float(), 0.0)
    policy, stats = reference.ppo_policy_loss(logp, old, adv, m, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                              dual_clip=dual_clip, agg=agg, horizon=horizon)
    loss = policy
    kl_mean = torch.zeros(())
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = reference.kl_penalty(logp, ref_logprobs, kl_kind, clamp=kl_clamp)
        loss = loss + kl_coef * reference.aggregate(kl, m, agg, horizon=horizon)
        kl_mean = reference.aggregate(kl, m, "token-mean").detach()
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * reference.aggregate(ent, m, agg, horizon=horizon)
    stats.update(logprobs=logp.detach(), entropy=reference.aggregate(ent, m, "token-mean").detach(), kl=kl_mean,
                 policy_loss=policy.detach())
    return loss, stats


def run_both(logits, labels, old, adv, mask, *, grad_scale=1.0, **kw):
    """Kernel result and reference-composition result (fp32 upcast logits), each with its grad."""
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton", **kw)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    xr = logits.detach().float().clone().requires_grad_(True)
    loss_r, stats_r = expected_from_pieces(xr, labels, old, adv, mask, **kw)
    (loss_r * grad_scale).backward()
    return (loss, stats, x.grad), (loss_r, stats_r, xr.grad)


def assert_close(actual, expected, dtype=torch.float32, **kw):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, **kw)


def check_all(got, want, grad_dtype=torch.float32):
    (loss, stats, grad), (loss_r, stats_r, grad_r) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_r, msg="loss")
    assert set(stats) == set(stats_r), (sorted(stats), sorted(stats_r))
    for key in stats_r:
        assert stats[key].dtype == torch.float32
        assert not stats[key].requires_grad
        assert_close(stats[key], stats_r[key], msg=key)
    assert grad.dtype == grad_dtype
    # The gradient is rounded to the logits' dtype: compare at that dtype's tolerance.
    assert_close(grad, grad_r, grad_dtype, msg="grad")


# ----------------------------------------------------------------------------------------------
# Every option, fp32 and bf16


OPTIONS = {
    "default": dict(),
    "clip_eps_high": dict(clip_eps=0.1, clip_eps_high=0.28),
    "dual_clip": dict(dual_clip=1.5),
    "k1": dict(kl_kind="k1", kl_coef=0.3),
    "k2": dict(kl_kind="k2", kl_coef=0.3),
    "k3": dict(kl_kind="k3", kl_coef=0.3),
    "abs": dict(kl_kind="abs", kl_coef=0.3),
    "alias_low_var_kl": dict(kl_kind="low_var_kl", kl_coef=0.3),
    "alias_mse": dict(kl_kind="mse", kl_coef=0.3),
    "alias_kl": dict(kl_kind="kl", kl_coef=0.3),
    # clamps small enough that many tokens' KL lies outside (value clamped, gradient 0 there)
    "k3_clamp": dict(kl_kind="k3", kl_coef=0.3, kl_clamp=0.05),
    "k1_clamp": dict(kl_kind="k1", kl_coef=0.3, kl_clamp=0.3),
    # straight-through (verl low_var_kl+): clamped value, unclamped k2 gradient
    "k3_straight_through_clamp": dict(kl_kind="low_var_kl+", kl_coef=0.3, kl_clamp=0.05),
    "ref_but_no_coef": dict(kl_kind="k3", kl_coef=0.0),
    "entropy_coef": dict(entropy_coef=0.05),
    "seq-mean-token-sum": dict(agg="seq-mean-token-sum"),
    "seq-mean-token-mean": dict(agg="seq-mean-token-mean"),
    "seq-mean-token-sum-norm": dict(agg="seq-mean-token-sum-norm"),
    "seq-mean-token-sum-norm-horizon": dict(agg="seq-mean-token-sum-norm", horizon=4096),
    "temperature": dict(temperature=0.6),
    "everything": dict(temperature=1.3, clip_eps=0.15, clip_eps_high=0.3, dual_clip=2.0, kl_kind="k3",
                       kl_coef=0.1, kl_clamp=0.1, entropy_coef=0.02, agg="seq-mean-token-mean"),
}


BF16_OPTIONS = ("default", "dual_clip", "k3", "k3_clamp", "abs", "entropy_coef", "seq-mean-token-mean", "temperature",
                "everything")
CASES = [(name, torch.float32) for name in OPTIONS] + [(name, torch.bfloat16) for name in BF16_OPTIONS]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_matches_reference(name, dtype):
    kw = dict(OPTIONS[name])
    logits, labels, old, adv, mask, ref = make_inputs(dtype=dtype, seed=list(OPTIONS).index(name),
                                                      temperature=kw.get("temperature", 1.0))
    if "kl_coef" in kw:
        kw["ref_logprobs"] = ref
    got, want = run_both(logits, labels, old, adv, mask, **kw)
    check_all(got, want, grad_dtype=dtype)
    if name in ("default", "everything"):  # and the reference's own fused function
        xr = logits.detach().float().requires_grad_(True)
        loss_r, stats_r = reference.ppo_loss_from_logits(xr, labels, old, adv, mask, **kw)
        assert_close(got[0], loss_r)
        for key in stats_r:
            assert_close(got[1][key], stats_r[key], msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_scale_scales_the_loss_and_gradient_not_the_stats(dtype):
    """loss_scale = 1/k (gradient accumulation) gives the loss and logits gradient of
    (loss / k).backward() with loss.backward(); the stats stay unscaled; the reference agrees."""
    logits, labels, old, adv, mask, ref = make_inputs(dtype=dtype, seed=31)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.02, dual_clip=2.0, agg="seq-mean-token-mean")
    x1 = logits.clone().requires_grad_(True)
    loss1, stats1 = ppo_loss_from_logits(x1, labels, old, adv, mask, backend="triton", **kw)
    (loss1 * 0.25).backward()
    x2 = logits.clone().requires_grad_(True)
    loss2, stats2 = ppo_loss_from_logits(x2, labels, old, adv, mask, backend="triton", loss_scale=0.25, **kw)
    loss2.backward()
    assert_close(loss2, loss1 * 0.25)
    assert_close(x2.grad, x1.grad, dtype)
    assert not torch.equal(x2.grad, 4 * x2.grad)  # not a zero gradient
    for key in stats1:
        assert_close(stats2[key], stats1[key], msg=key)
    xr = logits.detach().float().clone().requires_grad_(True)
    loss_r, stats_r = reference.ppo_loss_from_logits(xr, labels, old, adv, mask, loss_scale=0.25, **kw)
    loss_r.backward()
    assert_close(loss_r, loss2)
    assert_close(stats_r["policy_loss"], stats2["policy_loss"])
    assert_close(x2.grad, xr.grad, dtype)
    # inplace_backward: the same scaled gradient, in the logits' storage
    base = logits.clone().requires_grad_(True)
    y = base * 1.0
    loss3, _ = ppo_loss_from_logits(y, labels, old, adv, mask, backend="triton", loss_scale=0.25,
                                    inplace_backward=True, **kw)
    loss3.backward()
    assert_close(loss3, loss2)
    assert_close(base.grad, x2.grad, dtype)
    for bad in (0.0, -1.0, float("nan"), 1e-40, 1e40):
        with pytest.raises(ValueError, match="loss_scale"):
            ppo_loss_from_logits(logits, labels, old, adv, mask, loss_scale=bad, backend="triton")


def test_loss_scale_under_compile_does_not_recompile_per_value():
    logits, labels, old, adv, mask, ref = make_inputs(seed=32)

    @torch.compile(fullgraph=True)
    def step(x, scale):
        loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                           backend="triton", loss_scale=scale)
        return loss, stats["policy_loss"]

    for k in range(1, 11):
        x = logits.clone().requires_grad_(True)
        loss, policy_loss = step(x, 1.0 / k)
        loss.backward()
        xr = logits.detach().clone().requires_grad_(True)
        loss_r, stats_r = reference.ppo_loss_from_logits(xr, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                         loss_scale=1.0 / k)
        loss_r.backward()
        assert_close(loss, loss_r)
        assert_close(policy_loss, stats_r["policy_loss"])
        assert_close(x.grad, xr.grad)


def test_kl_clamp_is_exercised():
    """The clamped options do clamp some tokens and leave others: not vacuous either way."""
    logits, labels, old, adv, mask, ref = make_inputs()
    logp = reference.logprobs(logits, labels)
    for kind, c in (("k3", 0.05), ("k1", 0.3)):
        kl = reference.kl_penalty(logp, ref, kind)[mask.bool() & (labels != -100)]
        outside = (kl.abs() > c).float().mean()
        assert 0.1 < float(outside) < 0.9, (kind, float(outside))


def test_clip_regions_are_exercised():
    """The inputs above do clip (both sides) and dual-clip: the comparisons are not vacuous."""
    logits, labels, old, adv, mask, _ = make_inputs()
    _, stats = ppo_loss_from_logits(logits, labels, old, adv, mask, dual_clip=1.5, backend="triton")
    assert 0.0 < float(stats["clipfrac"]) < 1.0
    assert float(stats["dual_clipfrac"]) > 0.0


def test_fp16_and_float_mask():
    logits, labels, old, adv, mask, ref = make_inputs(B=3, T=5, dtype=torch.float16, seed=5)
    mask = mask * torch.linspace(0.25, 1.0, 5, device=DEVICE)  # float weights per token
    got, want = run_both(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, entropy_coef=0.01,
                         agg="seq-mean-token-sum")
    check_all(got, want, grad_dtype=torch.float16)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_tiny_float_mask_divides_by_its_sum(agg):
    """Mask weights that sum to < 1 (per row and in all): the loss and the stats divide by the
    sums themselves, as verl's agg_loss does, not by max(sum, 1)."""
    logits, labels, old, adv, mask, ref = make_inputs(B=3, T=5, seed=7)
    mask = mask * torch.linspace(0.01, 0.05, 5, device=DEVICE)
    assert 0 < mask.sum() < 1
    got, want = run_both(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, entropy_coef=0.01, agg=agg)
    check_all(got, want)
    _, stats, _ = got
    w = torch.where(labels != -100, mask, 0.0)
    assert_close(stats["approx_kl"], (w * (old - stats["logprobs"])).sum() / w.sum())


@pytest.mark.parametrize("scale", [1.0, 3.7, -0.5, 0.0])
def test_grad_output(scale):
    logits, labels, old, adv, mask, ref = make_inputs(seed=11)
    got, want = run_both(logits, labels, old, adv, mask, grad_scale=scale, ref_logprobs=ref, kl_coef=0.1,
                         entropy_coef=0.01)
    check_all(got, want)


def test_grad_output_through_autograd_grad():
    logits, labels, old, adv, mask, _ = make_inputs(seed=12)
    x = logits.clone().requires_grad_(True)
    loss, _ = ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton")
    (g,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(2.5, device=DEVICE))
    xr = logits.clone().requires_grad_(True)
    loss_r, _ = expected_from_pieces(xr, labels, old, adv, mask)
    (g_r,) = torch.autograd.grad(loss_r * 2.5, xr)
    assert_close(g, g_r)


# ----------------------------------------------------------------------------------------------
# Edge cases


def test_mask_holes_ignore_index_and_empty_rows():
    logits, labels, old, adv, mask, ref = make_inputs(B=3, T=7, seed=3)
    mask[1] = 0  # a whole sequence masked out
    labels[2, :] = -100  # a whole sequence of ignored labels
    labels[0, 4] = -100
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        got, want = run_both(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, entropy_coef=0.03,
                             agg=agg)
        check_all(got, want)
        grad = got[2]
        assert torch.all(grad[1] == 0) and torch.all(grad[2] == 0) and torch.all(grad[0, 4] == 0)
    assert torch.all(got[1]["logprobs"][2] == 0)  # ignore_index tokens: log-prob 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_all_masked_gives_zero_loss_and_grad(agg):
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=5, seed=4)
    old = old + 1e4  # garbage targets at uncounted tokens must not leak (exp(huge) = inf)
    for m, lab in ((torch.zeros_like(mask), labels), (mask, torch.full_like(labels, -100))):
        x = logits.clone().requires_grad_(True)
        loss, stats = ppo_loss_from_logits(x, lab, old, adv, m, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.1,
                                           dual_clip=3.0, agg=agg, backend="triton")
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert torch.all(x.grad == 0)
        for key in STAT_KEYS + ("dual_clipfrac",):
            assert float(stats[key]) == 0.0, key


def test_T1_and_single_token():
    logits, labels, old, adv, mask, _ = make_inputs(B=3, T=1, seed=6, holes=False, ignore=False)
    check_all(*run_both(logits, labels, old, adv, mask, entropy_coef=0.1))


def test_neg_inf_logits():
    """Masked vocabulary entries (-inf) give finite loss, stats and gradient (0 there)."""
    logits, labels, old, adv, mask, ref = make_inputs(seed=7)
    banned = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    banned[::3] = True
    banned[labels.clamp_min(0).flatten()] = False
    logits = logits.masked_fill(banned, float("-inf"))
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.05,
                                       backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[..., banned] == 0)
    # Reference on a finite stand-in (exp underflows to exactly 0 at -1e4, like at -inf).
    xr = torch.where(torch.isinf(logits), torch.full_like(logits, -1e4), logits).requires_grad_(True)
    loss_r, stats_r = expected_from_pieces(xr, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                           entropy_coef=0.05)
    loss_r.backward()
    assert_close(loss, loss_r)
    for key in stats_r:
        assert_close(stats[key], stats_r[key], msg=key)
    assert_close(x.grad, xr.grad)


def test_nan_logits_poison_the_loss_and_only_their_row():
    logits, labels, old, adv, mask, ref = make_inputs(seed=9, holes=False, ignore=False)
    logits[0, 1, V // 2] = float("nan")
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.05,
                                       backend="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(stats["logprobs"][0, 1]) and torch.isnan(stats["entropy"])
    assert torch.isnan(x.grad[0, 1]).all()
    others = torch.ones(x.shape[:2], dtype=torch.bool, device=DEVICE)
    others[0, 1] = False
    assert torch.isfinite(stats["logprobs"][others]).all() and torch.isfinite(x.grad[others]).all()


def test_nan_old_logprob_under_dual_clip_gives_nan_not_zero():
    # A NaN ratio with A < 0 and dual clip on: a NaN-skipping max would see the clipped loss,
    # the dual clip would then zero the gradient and drop the NaN from the loss.
    logits, labels, old, adv, mask, _ = make_inputs(seed=10, holes=False, ignore=False)
    old[1, 2] = float("nan")
    adv[1, 2] = -1.0
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, dual_clip=3.0, backend="triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(stats["policy_loss"])
    assert torch.isnan(x.grad[1, 2]).all()
    rest = torch.ones(x.shape[:2], dtype=torch.bool, device=DEVICE)
    rest[1, 2] = False
    assert torch.isfinite(x.grad[rest]).all()


def test_bad_label_gives_nan_without_reading_out_of_bounds():
    logits, labels, old, adv, mask, _ = make_inputs(seed=8, holes=False, ignore=False)
    labels[0, 0] = V + 5
    labels[1, 1] = -7
    mask[1, 1] = 0  # a bad label at an uncounted token does not poison the loss
    _, stats = ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton")
    logp = stats["logprobs"]
    assert torch.isnan(logp[0, 0]) and torch.isnan(logp[1, 1])
    assert torch.isfinite(logp[0, 1:]).all()
    # The counted bad label at [0, 0] poisons the loss and every stat it enters (as in the
    # reference: torch.maximum propagates NaN, the kernels' min/max must too).
    loss, stats = ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton")
    assert torch.isnan(loss)
    for key in ("policy_loss", "approx_kl", "ratio_mean", "ratio_max"):
        assert torch.isnan(stats[key]), key
    labels[0, 0] = 3
    loss, _ = ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton")
    assert torch.isfinite(loss)


def test_bad_label_raises_when_checking(monkeypatch):
    logits, labels, old, adv, mask, _ = make_inputs(seed=8)
    labels[0, 0] = V
    monkeypatch.setenv("RLHF_FAST_CHECK", "1")
    with pytest.raises(ValueError, match="labels"):
        ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton")


def test_strided_logits_slice_and_int32_labels():
    """logits[:, :-1] of a bigger tensor is used in place (two row strides), labels may be int32."""
    big, labels, old, adv, mask, _ = make_inputs(B=2, T=6, seed=9)
    logits = big[:, :-1]
    labels, old, adv, mask = labels[:, 1:], old[:, 1:], adv[:, 1:], mask[:, 1:]
    assert not logits.is_contiguous()
    x_big = big.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x_big[:, :-1], labels.to(torch.int32), old, adv, mask, entropy_coef=0.05,
                                       backend="triton")
    loss.backward()
    xr = big.clone().requires_grad_(True)
    loss_r, stats_r = expected_from_pieces(xr[:, :-1], labels, old, adv, mask, entropy_coef=0.05)
    loss_r.backward()
    assert_close(loss, loss_r)
    assert_close(stats["logprobs"], stats_r["logprobs"])
    assert_close(x_big.grad, xr.grad)


def test_deterministic_and_row_independent():
    logits, labels, old, adv, mask, ref = make_inputs(B=3, T=5, seed=10)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, backend="triton")
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
        loss.backward()
        runs.append((loss, stats["logprobs"], x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, stats_one = ppo_loss_from_logits(logits[1:2], labels[1:2], old[1:2], adv[1:2], mask[1:2],
                                        ref_logprobs=ref[1:2], kl_coef=0.1, entropy_coef=0.01, backend="triton")
    assert torch.equal(stats_one["logprobs"][0], runs[0][1][1])


# ----------------------------------------------------------------------------------------------
# Backward mechanics: retain_graph, inplace_backward


def test_second_backward_raises():
    logits, labels, old, adv, mask, _ = make_inputs(seed=13)
    x = logits.clone().requires_grad_(True)
    loss, _ = ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 3.7])
def test_inplace_backward_same_grad(dtype, scale):
    logits, labels, old, adv, mask, ref = make_inputs(seed=14, dtype=dtype)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.02, dual_clip=2.0, backend="triton")
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
    (loss * scale).backward()

    # A non-leaf logits tensor (as out of an lm_head): the gradient reaches the leaf behind it.
    base = logits.clone().requires_grad_(True)
    y = base * 1.0
    loss_i, stats_i = ppo_loss_from_logits(y, labels, old, adv, mask, inplace_backward=True, **kw)
    assert not torch.equal(y.detach(), logits)  # the logits were overwritten (by the gradient)
    (loss_i * scale).backward()
    assert torch.equal(loss_i, loss)
    for key in stats:
        assert torch.equal(stats_i[key], stats[key]), key
    assert torch.equal(base.grad, x.grad)

    # A leaf works too; its .grad then lives in its own storage.
    leaf = logits.clone().requires_grad_(True)
    loss_l, _ = ppo_loss_from_logits(leaf, labels, old, adv, mask, inplace_backward=True, **kw)
    (loss_l * scale).backward()
    assert torch.equal(leaf.grad, x.grad)


def test_inplace_backward_on_expanded_logits_uses_a_new_buffer():
    """An expanded (self-overlapping) logits tensor: the in-place path would read rows that an
    aliased row has already overwritten; it falls back to a new buffer instead."""
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=4, seed=9)
    row = logits[0, 0].clone()
    got, want = [], []
    for backend, out in (("triton", got), ("reference", want)):
        leaf = row.clone().requires_grad_(True)
        x = leaf.expand(2, 4, V)
        if backend == "triton":
            loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                               backend="triton", inplace_backward=True)
        else:
            loss, stats = expected_from_pieces(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
        loss.backward()
        out += [loss.detach(), leaf.grad]
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_inplace_backward_detects_saved_logits_and_second_backward():
    logits, labels, old, adv, mask, _ = make_inputs(seed=15)
    base = logits.clone().requires_grad_(True)
    y = torch.tanh(base)  # tanh's backward needs its output, which the gradient overwrites
    loss, _ = ppo_loss_from_logits(y, labels, old, adv, mask, inplace_backward=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    leaf = logits.clone().requires_grad_(True)
    loss, _ = ppo_loss_from_logits(leaf, labels, old, adv, mask, inplace_backward=True, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# Custom ops: opcheck, torch.compile


def _op_args(dtype=torch.float32, with_ref=True):
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=3, dtype=dtype, seed=16)
    counted = (mask != 0) & (labels != -100)
    m = torch.where(counted, mask, 0.0)
    w = m / m.sum()
    return (logits, labels, old, adv, w, m, ref if with_ref else None, 0.9, 0.2, 0.25, 2.0, 0.1, "k3", 10.0, 0.01, -100)


@pytest.mark.parametrize("with_ref,write_grad", [(True, True), (False, True), (True, False)])
def test_opcheck_fwd(with_ref, write_grad):
    args = list(_op_args(with_ref=with_ref)) + [write_grad]
    args[0] = args[0].requires_grad_(write_grad)
    # Not test_aot_dispatch_*: that test returns every output of the op from the traced graph,
    # grad_logits included, while our backward scales grad_logits in place (the zero-cost
    # grad_output == 1 path). The public function never lets grad_logits escape; AOT dispatch of
    # that real use (forward + backward) is covered by the torch.compile tests below.
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_loss_from_logits_fwd.default, tuple(args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_no_grad_skips_the_gradient_pass():
    logits, labels, old, adv, mask, ref = make_inputs(seed=20)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, backend="triton")
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
    with torch.no_grad():
        loss_ng, stats_ng = ppo_loss_from_logits(x, labels, old, adv, mask, inplace_backward=True, **kw)
    loss_nr, _ = ppo_loss_from_logits(logits, labels, old, adv, mask, **kw)  # logits without grad
    assert torch.equal(x, logits)  # nothing written, even with inplace_backward
    assert torch.equal(loss_ng, loss.detach()) and torch.equal(loss_nr, loss.detach())
    assert not loss_ng.requires_grad and not loss_nr.requires_grad
    for key in stats:
        assert torch.equal(stats_ng[key], stats[key]), key


def test_opcheck_inplace_and_scale_ops():
    args = _op_args(dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.rlhf_fast.ppo_loss_from_logits_fwd_inplace.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    grad = torch.randn(2, 3, V, device=DEVICE).to(torch.bfloat16)
    for g in (1.0, 0.5):
        torch.library.opcheck(torch.ops.rlhf_fast.ppo_loss_from_logits_scale_grad_.default,
                              (grad, torch.tensor(g, device=DEVICE)))


@pytest.mark.parametrize("inplace,dynamic", [(False, False), (True, False), (False, True)])
def test_torch_compile_fullgraph(inplace, dynamic):
    logits, labels, old, adv, mask, ref = make_inputs(seed=17)

    def step(x, labels, old, adv, mask, ref):
        loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                           entropy_coef=0.01, dual_clip=2.0, inplace_backward=inplace,
                                           backend="triton")
        return loss * 2.0, stats["clipfrac"], stats["logprobs"]

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    x = logits.clone().requires_grad_(True)
    loss, clipfrac, logp = compiled(x, labels, old, adv, mask, ref)
    loss.backward()
    x_e = logits.clone().requires_grad_(True)
    loss_e, clipfrac_e, logp_e = step(x_e, labels, old, adv, mask, ref)
    loss_e.backward()
    assert_close(loss, loss_e)
    assert_close(clipfrac, clipfrac_e)
    assert_close(logp, logp_e)
    assert_close(x.grad, x_e.grad)


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (kernels/_terms.py, kernels/_rows.py)


@triton.jit
def _terms_probe_kernel(logp_ptr, old_ptr, adv_ptr, ref_ptr, out_ptr, N, eps_low, eps_high, dual_clip,
                        HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0)
    loss, d_loss, ratio, clipped, dual = _terms.ppo_clip_term(logp - old, adv, eps_low, eps_high, dual_clip, HAS_DUAL)
    kl, d_kl = _terms.kl_term(logp - ref, KL_KIND)
    outs = (loss, d_loss, ratio, clipped.to(tl.float32), dual.to(tl.float32), kl, d_kl,
            _terms.kl_value(logp, ref, KL_KIND), _terms.kl_dlogp(logp, ref, KL_KIND))
    for i in tl.static_range(9):
        tl.store(out_ptr + i * N + offs, outs[i], mask=valid)
    # Scalars too (the fused kernel calls the helpers on per-row scalars).
    s_loss, s_d_loss, _, _, _ = _terms.ppo_clip_term(tl.load(logp_ptr) - tl.load(old_ptr), tl.load(adv_ptr),
                                                     eps_low, eps_high, dual_clip, HAS_DUAL)
    s_kl, s_d_kl = _terms.kl_term(tl.load(logp_ptr) - tl.load(ref_ptr), KL_KIND)
    tl.store(out_ptr + 9 * N, s_loss)
    tl.store(out_ptr + 9 * N + 1, s_d_loss)
    tl.store(out_ptr + 9 * N + 2, s_kl)
    tl.store(out_ptr + 9 * N + 3, s_d_kl)


def _probe_terms(logp, old, adv, ref, *, eps_low, eps_high, dual_clip, kind):
    N = logp.numel()
    out = torch.full((9 * N + 4,), float("nan"), device=DEVICE)
    code = _terms.KL_NONE if kind is None else _terms.KL_CODES[kind]
    _terms_probe_kernel[(1,)](logp, old, adv, ref, out, N, eps_low, eps_high, 0.0 if dual_clip is None else dual_clip,
                              HAS_DUAL=dual_clip is not None, KL_KIND=code, BLOCK=triton.next_power_of_2(N))
    return out[: 9 * N].view(9, N), out[9 * N:]


def test_kl_codes_cover_the_reference_names():
    assert set(_terms.KL_CODES) == set(reference.KL_KINDS)
    for name, canonical in reference.KL_KINDS.items():
        assert _terms.KL_CODES[name] == _terms.KL_CODES[canonical]
    assert len({_terms.KL_CODES[c] for c in set(reference.KL_KINDS.values())} | {_terms.KL_NONE}) == 8
    assert pfl_kernels.KL_CODES is _terms.KL_CODES


@pytest.mark.parametrize("dual_clip", [None, 1.7])
@pytest.mark.parametrize("kind", [None, "k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "abs+"])
def test_shared_terms_match_reference(kind, dual_clip):
    """ppo_clip_term / kl_term against the reference per-token terms and autograd derivatives."""
    gen = torch.Generator().manual_seed(31)
    N = 50
    logp = (-torch.rand(N, generator=gen) * 3.0).to(DEVICE)
    old = (logp + torch.randn(N, generator=gen, device="cpu").to(DEVICE) * 0.5).contiguous()
    adv = torch.randn(N, generator=gen).to(DEVICE)
    ref = (logp + torch.randn(N, generator=gen).to(DEVICE) * 0.7).contiguous()
    eps_low, eps_high = 0.15, 0.28
    out, scalars = _probe_terms(logp, old, adv, ref, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                                kind=kind)

    x = logp.clone().requires_grad_(True)
    loss, ratio, clipped, dual = reference._ppo_policy_terms(x, old, adv, torch.ones(N, device=DEVICE), eps_low,
                                                             eps_high, dual_clip)
    (d_loss,) = torch.autograd.grad(loss.sum(), x)
    assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(out[0], loss.detach())
    torch.testing.assert_close(out[1], d_loss)
    torch.testing.assert_close(out[2], ratio.detach())
    assert torch.equal(out[3].bool(), clipped)
    if dual_clip is None:
        assert not out[4].bool().any()
    else:
        assert dual.any() and torch.equal(out[4].bool(), dual)
    torch.testing.assert_close(scalars[:2], torch.stack([out[0, 0], out[1, 0]]))

    if kind is None:
        assert (out[5:9] == 0).all()
        return
    x = logp.clone().requires_grad_(True)
    kl = reference.kl_penalty(x, ref, kind)
    (d_kl,) = torch.autograd.grad(kl.sum(), x)
    for row in (5, 7):
        torch.testing.assert_close(out[row], kl.detach())
    for row in (6, 8):
        torch.testing.assert_close(out[row], d_kl)
    torch.testing.assert_close(scalars[2:], torch.stack([out[5, 0], out[6, 0]]))


def test_kl_k1_derivative_is_one_at_infinite_diff():
    inf = float("inf")
    logp = torch.tensor([inf, -inf, 0.5, -inf], device=DEVICE)
    ref = torch.tensor([0.0, 0.0, 0.25, 0.0], device=DEVICE)
    zeros = torch.zeros(4, device=DEVICE)
    out, scalars = _probe_terms(logp, zeros, zeros, ref, eps_low=0.2, eps_high=0.2, dual_clip=None, kind="k1")
    assert torch.equal(out[6], torch.ones(4, device=DEVICE))  # not 1 + 0 * inf = NaN
    assert torch.equal(out[8], torch.ones(4, device=DEVICE))
    assert scalars[3] == 1.0


def test_row_config_is_one_table_for_both_kernels():
    """Both launchers take (BLOCK_V, num_warps) from _rows.row_config: V and dtype only."""
    for V in (1, 7, 300, 1271, 9000, 128256):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            block, warps = row_config(V, dtype)
            assert block & (block - 1) == 0 and 16 <= block <= 4096 and warps in (2, 4, 8)
            assert block >= min(V, 2048)
    # The configuration ANCHORS.md calibrated on an H100 (2048-wide blocks, 8 warps) for wide rows.
    assert row_config(128256, torch.bfloat16) == (2048, 8) and row_config(128256, torch.float32) == (2048, 8)
    assert not hasattr(pfl_kernels, "_row_config")


@pytest.mark.parametrize("counted", [False, True])
def test_all_neg_inf_row_entropy_is_zero(counted):
    """A row of only -inf logits: entropy 0 (the reference's), never NaN; uncounted, the loss and the
    gradient stay finite; counted, the entropy stat matches the reference (logp is NaN in both)."""
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=3, seed=21, holes=False, ignore=False)
    logits[1, 2] = float("-inf")
    mask[1, 2] = 1.0 if counted else 0.0
    w = mask / mask.sum()
    grad = torch.empty_like(logits)
    loss, logp, ent, stats = pfl_kernels.ppo_from_logits_fwd(
        logits, labels, old, adv, w, mask, ref, grad, temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=None,
        kl_coef=0.1, kl_kind="k3", entropy_coef=0.05, ignore_index=-100)
    assert ent[1, 2] == 0.0
    assert torch.isfinite(ent).all()
    _, stats_r = reference.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                entropy_coef=0.05)
    entropy_stat = stats[pfl_kernels.STAT_NAMES.index("entropy")]
    assert torch.isfinite(entropy_stat)
    assert_close(entropy_stat, stats_r["entropy"])
    if not counted:
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[1, 2] == 0).all()
    else:
        assert torch.isnan(logp[1, 2]) and torch.isnan(stats_r["logprobs"][1, 2])


_SELF_COPY = (
    # C++ (CPU) inductor kernels: a value loaded from in_out_ptr0 stored back unchanged.
    r"auto (tmp\d+) = [^;]*in_out_ptr0[^;]*;\s*\1\.store\(in_out_ptr0",
    r"auto (tmp\d+) = in_out_ptr0\[[^\]]*\];\s*in_out_ptr0\[[^\]]*\] = \1;",
    # Triton (GPU) inductor kernels.
    r"(tmp\d+) = tl\.load\(in_out_ptr0[^\n]*\n\s*tl\.store\(in_out_ptr0[^,]*, \1\b",
)


def test_torch_compile_backward_has_no_self_copy():
    """Inductor's output code: grad_output is folded in by one fused multiply, with no copy of the
    [N, V] gradient into itself (what functionalizing the in-place scale op gave) and no call of
    the mutating op."""
    import re

    from torch._inductor.utils import run_and_get_code

    logits, labels, old, adv, mask, _ = make_inputs(B=2, T=3, seed=22)

    def step(x):
        loss, _ = ppo_loss_from_logits(x * 1.5, labels, old, adv, mask, backend="triton")
        return loss * 2.0

    x = logits.clone().requires_grad_(True)
    x_e = logits.clone().requires_grad_(True)
    step(x_e).backward()
    # Caches off: a cached graph would replay code traced before any change to the backward.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(step, fullgraph=True)
        _, codes = run_and_get_code(lambda: compiled(x).backward())
    code = "\n".join(codes)
    assert "ppo_loss_from_logits_fwd" in code and len(codes) >= 2  # forward and backward captured
    assert "ppo_loss_from_logits_scale_grad_" not in code
    for pattern in _SELF_COPY:
        assert not re.search(pattern, code), pattern
    assert_close(x.grad, x_e.grad)


# ----------------------------------------------------------------------------------------------
# Dispatch and bad input


def test_stat_layout_matches_kernel():
    from rlhf_fast.kernels import ppo_from_logits as kernels

    import rlhf_fast.ppo_from_logits as mod

    assert mod._STAT_NAMES == kernels.STAT_NAMES and mod._N_STATS == kernels.N_STATS


def test_reference_backend_dispatch():
    logits, labels, old, adv, mask, ref = make_inputs(seed=18)
    loss, stats = ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                       backend="reference")
    loss_r, stats_r = reference.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert torch.equal(loss, loss_r)
    assert set(stats) == set(stats_r)


def test_bad_input_raises():
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=3, seed=19)

    def call(**over):
        kw = dict(logits=logits, labels=labels, old_logprobs=old, advantages=adv, mask=mask)
        kw.update(over)
        args = [kw.pop(k) for k in ("logits", "labels", "old_logprobs", "advantages", "mask")]
        return ppo_loss_from_logits(*args, backend="triton", **kw)

    with pytest.raises(ValueError, match="logits"):
        call(logits=logits[0])
    with pytest.raises(ValueError, match="vocabulary"):
        call(logits=logits[..., :0])  # V = 0: the label gather would read out of bounds
    with pytest.raises(ValueError, match="logits"):
        call(logits=logits.double())
    with pytest.raises(ValueError, match="labels"):
        call(labels=labels[:, :2])
    with pytest.raises(ValueError, match="labels"):
        call(labels=labels.float())
    with pytest.raises(ValueError, match="old_logprobs"):
        call(old_logprobs=old[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        call(advantages=adv[:1])
    with pytest.raises(ValueError, match="mask"):
        call(mask=mask[:, :1])
    with pytest.raises(ValueError, match="ref_logprobs"):
        call(ref_logprobs=ref[:, :1], kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_kind"):
        call(ref_logprobs=ref, kl_coef=0.1, kl_kind="k4")
    with pytest.raises(ValueError, match="dual_clip"):
        call(dual_clip=1.0)
    with pytest.raises(ValueError, match="kl_clamp"):
        call(ref_logprobs=ref, kl_coef=0.1, kl_clamp=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="clip_eps"):
        call(clip_eps=-0.1)
    with pytest.raises(ValueError, match="agg"):
        call(agg="sum")
    with pytest.raises(ValueError, match="horizon"):
        call(horizon=10)
    with pytest.raises(ValueError, match="backend"):
        ppo_loss_from_logits(logits, labels, old, adv, mask, backend="cuda")
    with pytest.raises(ValueError, match="C\\+\\+"):
        ppo_loss_from_logits(logits, labels, old, adv, mask, backend="cpp")


def test_kl_coef_without_ref_logprobs_raises_on_every_path():
    """kl_coef != 0 with no ref_logprobs used to mean "no KL term", silently: a forgotten argument
    trained without its penalty. Every path (kernel, reference, PPOLoss) raises; kl_coef=0 with no
    reference stays the plain clipped loss."""
    logits, labels, old, adv, mask, _ = make_inputs(B=2, T=3, seed=19)
    calls = {
        "triton": lambda **kw: ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton", **kw),
        "reference": lambda **kw: ppo_loss_from_logits(logits, labels, old, adv, mask, backend="reference", **kw),
        "rlhf_fast.reference": lambda **kw: reference.ppo_loss_from_logits(logits, labels, old, adv, mask, **kw),
        "PPOLoss": lambda **kw: PPOLoss(backend="triton", **kw)(logits, labels, old, adv, mask),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="kl_coef=0.05 needs ref_logprobs"):
            call(kl_coef=0.05)
        loss, stats = call(kl_coef=0.0)
        assert torch.isfinite(loss) and stats["kl"].item() == 0.0, where


# ----------------------------------------------------------------------------------------------
# GPU only: int64 offsets (N * V > 2**31)


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_big():
    """Rows whose offsets pass 2**31 elements: log-probs and gradient rows against the reference."""
    B, T, Vb = 1, 16900, 128256  # 2.17e9 bf16 elements
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, T, Vb, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, Vb, (B, T), device="cuda", generator=gen)
    mask = torch.ones(B, T, device="cuda")
    old = torch.full((B, T), -12.0, device="cuda")
    adv = torch.randn(B, T, device="cuda", generator=gen)
    last = slice(T - 2, T)  # rows past 2**31 elements
    rows = logits[:, last].float().clone()
    x = logits.requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, entropy_coef=0.01, inplace_backward=True)
    loss.backward()
    grad_rows = x.grad[:, last].float()
    del x, logits
    xr = rows.requires_grad_(True)
    loss_r, stats_r = expected_from_pieces(xr, labels[:, last], old[:, last], adv[:, last], mask[:, last],
                                           entropy_coef=0.01)
    loss_r.backward()
    assert_close(stats["logprobs"][:, last], stats_r["logprobs"])
    # token-mean: the kernel's weight is 1/T per token, the 2-row reference's 1/2.
    assert_close(grad_rows * (T / 2.0), xr.grad, torch.bfloat16)


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_allocates_no_logits_sized_fill(inplace):
    """The fused op returns its saved gradient as a (non-differentiable) output; autograd used to
    hand backward a zeros_like of it: a memset of [B, T, V] and a second logits-sized buffer in
    every step (1.27 ms and 4.2 GB at 8 x 2048 x 128256 bf16 on an H100)."""
    logits, labels, old, adv, mask, ref = make_inputs(B=2, T=5)
    x = logits.clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(
        x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, inplace_backward=inplace,
        backend="triton",
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        (2.0 * loss).backward()
    logits_sized = [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::zeros_like", "aten::zeros", "aten::zero_", "aten::fill_", "aten::empty_like")
        and any(list(s) == list(logits.shape) for s in e.input_shapes if s)
    ]
    assert logits_sized == [], logits_sized
    expected, _ = expected_from_pieces(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                       entropy_coef=0.01)
    x_ref = logits.clone().requires_grad_(True)
    exp_loss, _ = expected_from_pieces(x_ref, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                       entropy_coef=0.01)
    (2.0 * exp_loss).backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
