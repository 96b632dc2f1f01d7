"""Public advantage helpers that run the reference path: rlhf_fast.masked_whiten and
rlhf_fast.group_advantages, against rlhf_fast.reference and against independent float64 formulas,
with edge cases and bad input."""

import statistics

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference


def _x_and_mask(shape, *, dtype=torch.float32, seed=0, p=0.7):
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(shape, generator=g) + 1.5).to(dtype)
    mask = torch.rand(shape, generator=g) < p
    return x, mask


def _whiten_oracle(x, mask, shift_mean, eps):
    """float64, straight from the definition: mean and Bessel variance over counted entries."""
    values = [float(a) for a, m in zip(x.double().flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(values) / len(values)
    var = sum((a - mean) ** 2 for a in values) / (len(values) - 1)
    out = (x.double() - mean) / (var + eps) ** 0.5
    return out if shift_mean else out + mean


# ----------------------------------------------------------------------------------------------
# masked_whiten


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(6, 17), (1, 5), (40,), (2, 3, 9)])
def test_masked_whiten_matches_reference_and_oracle(shape, shift_mean):
    x, mask = _x_and_mask(shape, seed=len(shape))
    mask.view(-1)[:2] = True  # at least two counted entries
    out = rlhf_fast.masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, reference.masked_whiten(x, mask, shift_mean=shift_mean), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), _whiten_oracle(x, mask, shift_mean, 1e-8), atol=1e-5, rtol=1e-5)
    if shift_mean:  # counted entries come out with mean 0 and unbiased variance ~1
        counted = out[mask].double()
        assert abs(counted.mean().item()) < 1e-5
        assert abs(counted.var(unbiased=True).item() - 1.0) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_whiten_low_precision(dtype):
    x, mask = _x_and_mask((8, 33), dtype=dtype, seed=3)
    out = rlhf_fast.masked_whiten(x, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.masked_whiten(x.float(), mask), atol=1e-5, rtol=1e-5)


def test_masked_whiten_float_mask_and_eps():
    x, mask = _x_and_mask((5, 20), seed=4)
    out = rlhf_fast.masked_whiten(x, mask.float(), eps=1e-2)
    torch.testing.assert_close(out, reference.masked_whiten(x, mask, eps=1e-2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), _whiten_oracle(x, mask, True, 1e-2), atol=1e-5, rtol=1e-5)


def test_masked_whiten_ignores_uncounted_values():
    x, mask = _x_and_mask((4, 12), seed=5)
    poisoned = torch.where(mask, x, torch.full_like(x, 1e6))
    torch.testing.assert_close(
        rlhf_fast.masked_whiten(poisoned, mask)[mask], rlhf_fast.masked_whiten(x, mask)[mask], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("n_counted", [0, 1])
def test_masked_whiten_degenerate_masks(n_counted):
    x, _ = _x_and_mask((3, 7), seed=6)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask.view(-1)[:n_counted] = True
    out = rlhf_fast.masked_whiten(x, mask, eps=1e-4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.masked_whiten(x, mask, eps=1e-4))
    if n_counted == 1:
        assert out.view(-1)[0].item() == 0.0  # the one counted entry is its own mean


def test_masked_whiten_no_gradient_and_compile():
    x, mask = _x_and_mask((4, 9), seed=7)
    x.requires_grad_(True)
    assert not rlhf_fast.masked_whiten(x, mask).requires_grad
    compiled = torch.compile(lambda a, m: rlhf_fast.masked_whiten(a, m, shift_mean=False), fullgraph=True)
    torch.testing.assert_close(compiled(x.detach(), mask), rlhf_fast.masked_whiten(x, mask, shift_mean=False))


def test_masked_whiten_bad_input():
    x, mask = _x_and_mask((4, 9))
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.masked_whiten(x, mask[:, :8])
    with pytest.raises(TypeError, match="mask"):
        rlhf_fast.masked_whiten(x, mask.tolist())
    with pytest.raises(TypeError, match="x"):
        rlhf_fast.masked_whiten(x.tolist(), mask)
    with pytest.raises(ValueError, match="x"):
        rlhf_fast.masked_whiten(x.long(), mask)
    with pytest.raises(ValueError, match="x"):
        rlhf_fast.masked_whiten(x[0, 0], mask[0, 0])  # 0-d
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.masked_whiten(x, mask.to("meta"))
    with pytest.raises(ValueError, match="eps"):
        rlhf_fast.masked_whiten(x, mask, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        rlhf_fast.masked_whiten(x, mask, eps=float("nan"))
    with pytest.raises(TypeError, match="shift_mean"):
        rlhf_fast.masked_whiten(x, mask, shift_mean="yes")
    with pytest.raises(ValueError, match="C\\+\\+"):
        rlhf_fast.masked_whiten(x, mask, backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        rlhf_fast.masked_whiten(x, mask, backend="gpu")


# ----------------------------------------------------------------------------------------------
# group_advantages


def _group_oracle(scores, group_size, method, eps):
    s = scores.double().tolist()
    out = []
    for start in range(0, len(s), group_size):
        group = s[start : start + group_size]
        mean = sum(group) / len(group)
        for i, r in enumerate(group):
            if method == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + eps))
            elif method == "dr_grpo":
                out.append(r - mean)
            else:
                out.append(r - (sum(group) - r) / (len(group) - 1))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("group_size", [2, 4, 16])
def test_group_advantages_matches_reference_and_oracle(method, group_size):
    g = torch.Generator().manual_seed(group_size)
    scores = torch.randn(32, generator=g)
    out = rlhf_fast.group_advantages(scores, group_size, method=method)
    assert out.dtype == torch.float32 and out.shape == (32,)
    torch.testing.assert_close(out, reference.group_advantages(scores, group_size, method=method), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), _group_oracle(scores, group_size, method, 1e-6), atol=1e-5, rtol=1e-5)


def test_group_advantages_binary_rewards_and_constant_groups():
    # Verifiable rewards: 0/1 per response. A group where all agree has no signal: advantage 0, not NaN.
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    for method in ("grpo", "dr_grpo", "rloo"):
        out = rlhf_fast.group_advantages(scores, 4, method=method)
        assert torch.isfinite(out).all()
        assert torch.equal(out[4:], torch.zeros(8))
        torch.testing.assert_close(out, reference.group_advantages(scores, 4, method=method))
    # rloo with group size 2 is r - the other response's score.
    out = rlhf_fast.group_advantages(torch.tensor([3.0, 1.0]), 2, method="rloo")
    assert torch.equal(out, torch.tensor([2.0, -2.0]))


def test_group_advantages_dr_grpo_group_of_one():
    scores = torch.tensor([0.3, -1.0, 2.0])
    assert torch.equal(rlhf_fast.group_advantages(scores, 1, method="dr_grpo"), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_advantages_low_precision(dtype):
    scores = torch.randn(16, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = rlhf_fast.group_advantages(scores, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.group_advantages(scores.float(), 4), atol=1e-6, rtol=1e-6)


def test_group_advantages_eps_and_no_gradient():
    scores = torch.randn(8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = rlhf_fast.group_advantages(scores, 4, eps=0.5)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), _group_oracle(scores.detach(), 4, "grpo", 0.5), atol=1e-6, rtol=1e-6)


def test_group_advantages_compile():
    scores = torch.randn(12, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda s: rlhf_fast.group_advantages(s, 3, method="rloo"), fullgraph=True)
    torch.testing.assert_close(compiled(scores), rlhf_fast.group_advantages(scores, 3, method="rloo"))


def test_group_advantages_reference_refuses_bad_groups_as_the_op_does():
    """rlhf_fast.reference.group_advantages, called directly, gave NaN (and a torch warning) for a
    grpo / rloo group of one and reshaped errors for a size that does not divide: it now raises
    what the public op raises."""
    scores = torch.randn(12)
    for group_size, method in ((1, "grpo"), (1, "rloo"), (5, "grpo"), (0, "dr_grpo"), (4, "ppo"), (4.0, "grpo")):
        errors = []
        for fn in (rlhf_fast.group_advantages, reference.group_advantages):
            with pytest.raises((ValueError, TypeError)) as info:
                fn(scores, group_size, method=method)
            errors.append((info.type, str(info.value)))
        assert errors[0] == errors[1], (group_size, method, errors)


def test_group_advantages_bad_input():
    scores = torch.randn(12)
    with pytest.raises(ValueError, match="group_size"):
        rlhf_fast.group_advantages(scores, 5)
    with pytest.raises(ValueError, match="group_size"):
        rlhf_fast.group_advantages(scores, 0)
    with pytest.raises(ValueError, match="group_size"):
        rlhf_fast.group_advantages(scores, 1, method="grpo")
    with pytest.raises(ValueError, match="group_size"):
        rlhf_fast.group_advantages(scores, 1, method="rloo")
    with pytest.raises(TypeError, match="group_size"):
        rlhf_fast.group_advantages(scores, 4.0)
    with pytest.raises(TypeError, match="group_size"):
        rlhf_fast.group_advantages(scores, True)
    with pytest.raises(ValueError, match="method"):
        rlhf_fast.group_advantages(scores, 4, method="ppo")
    with pytest.raises(ValueError, match="scores"):
        rlhf_fast.group_advantages(scores.view(3, 4), 4)
    with pytest.raises(ValueError, match="scores"):
        rlhf_fast.group_advantages(scores.long(), 4)
    with pytest.raises(TypeError, match="scores"):
        rlhf_fast.group_advantages(scores.tolist(), 4)
    with pytest.raises(ValueError, match="eps"):
        rlhf_fast.group_advantages(scores, 4, eps=-1e-6)
    with pytest.raises(ValueError, match="Triton"):
        rlhf_fast.group_advantages(scores, 4, backend="triton")
