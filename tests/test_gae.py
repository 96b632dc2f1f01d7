"""GAE and discounted returns: the rlhf_fast._C kernels (C++ on CPU, CUDA on GPU) against
rlhf_fast.reference, against an independent float64 element-by-element loop, and the public API
(rlhf_fast.gae / rlhf_fast.discounted_returns): dtypes, masks, edge cases, bad input, opcheck,
torch.compile.
"""

import itertools

import pytest
import torch
from conftest import HAS_CUDA

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast._backend import C_error, load_C

GAMMA_LAM = list(itertools.product([0.0, 0.5, 1.0], [0.0, 0.5, 1.0]))


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    # The extension is part of every install (setup.py always builds the C++ kernels): its absence
    # is a build failure, not a reason to skip.
    assert load_C() is not None, f"rlhf_fast._C did not load: {C_error()}"


def multi_turn_mask(B, T, *, seed=0, device="cpu"):
    """Bool [B, T] mask shaped like multi-turn rollouts: a prompt (0), then alternating response
    turns (1) and tool-output holes (0), then padding (0); row 0 has no counted token at all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(1, B):
        t = int(torch.randint(0, max(1, T // 4), (1,), generator=g))
        end = T - int(torch.randint(0, max(1, T // 4), (1,), generator=g))
        counted = True
        while t < end:
            run = int(torch.randint(1, max(2, T // 5), (1,), generator=g))
            mask[b, t : min(t + run, end)] = counted
            counted = not counted
            t += run
    return mask.to(device)


def random_inputs(B, T, *, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(B, T, generator=g).to(device=device, dtype=dtype)
    return rewards, values, multi_turn_mask(B, T, seed=seed, device=device)


def gae_oracle(rewards, values, mask, gamma, lam):
    """float64, one element at a time, straight from the recurrence (independent of reference.py)."""
    r, v, m = (x.double().cpu().tolist() for x in (rewards, values, mask))
    adv = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        next_value = last_gae = 0.0
        for t in reversed(range(len(r[b]))):
            delta = r[b][t] + gamma * next_value - v[b][t]
            gae_t = delta + gamma * lam * last_gae
            next_value = m[b][t] * v[b][t] + (1 - m[b][t]) * next_value
            last_gae = m[b][t] * gae_t + (1 - m[b][t]) * last_gae
            adv[b][t] = last_gae
    adv = torch.tensor(adv, dtype=torch.float64).reshape(rewards.shape)
    return adv, adv + values.double().cpu()


def returns_oracle(rewards, mask, gamma):
    r, m = (x.double().cpu().tolist() for x in (rewards, mask))
    out = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        running = 0.0
        for t in reversed(range(len(r[b]))):
            running = m[b][t] * (r[b][t] + gamma * running) + (1 - m[b][t]) * running
            out[b][t] = running
    return torch.tensor(out, dtype=torch.float64).reshape(rewards.shape)


def assert_close_scaled(actual, expected, rtol=1e-5):
    """fp32 scan vs float64: error relative to the largest magnitude in the row set."""
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------
# C++ (CPU) kernel vs the reference


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 37), (6, 1), (9, 64), (13, 301)])
def test_gae_cpp_matches_reference(B, T, gamma, lam):
    rewards, values, mask = random_inputs(B, T, seed=B * 1000 + T)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="cpp")
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32
    assert adv.shape == ret.shape == (B, T)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 37), (6, 1), (9, 64), (13, 301)])
def test_discounted_returns_cpp_matches_reference(B, T, gamma):
    rewards, _, mask = random_inputs(B, T, seed=B + T)
    out = rlhf_fast.discounted_returns(rewards, mask, gamma=gamma, backend="cpp")
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out, reference.discounted_returns(rewards, mask, gamma=gamma), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 23), (3, 4097)])
def test_gae_cpp_matches_float64_oracle(B, T, gamma, lam):
    rewards, values, mask = random_inputs(B, T, seed=7 * T)
    adv, ret = torch.ops.rlhf_fast.gae(rewards, values, mask, gamma, lam)
    oracle_adv, oracle_ret = gae_oracle(rewards, values, mask, gamma, lam)
    assert_close_scaled(adv, oracle_adv)
    assert_close_scaled(ret, oracle_ret)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 23), (3, 4097)])
def test_discounted_returns_cpp_matches_float64_oracle(B, T, gamma):
    rewards, _, mask = random_inputs(B, T, seed=11 * T)
    out = torch.ops.rlhf_fast.discounted_returns(rewards, mask, gamma)
    assert_close_scaled(out, returns_oracle(rewards, mask, gamma))


def test_gae_multi_turn_by_hand():
    # One row, T = 5, mask 1 0 1 0 0 (response, tool output, response, padding), gamma = 0.5, lam = 1.
    rewards = torch.tensor([[1.0, 100.0, 2.0, 100.0, 100.0]])
    values = torch.tensor([[0.5, 100.0, 1.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 0, 1, 0, 0]], dtype=torch.bool)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.5, lam=1.0, backend="cpp")
    # t = 4, 3: masked, nothing counted after them yet -> 0.
    # t = 2: delta = 2 + 0.5 * 0 - 1 = 1, gae = 1 + 0.5 * 0 = 1 -> A = 1; nextvalue = 1.
    # t = 1: masked: carries A = 1 (its own reward and value are ignored).
    # t = 0: delta = 1 + 0.5 * 1 - 0.5 = 1, gae = 1 + 0.5 * 1 = 1.5 -> A = 1.5.
    expected_adv = torch.tensor([[1.5, 1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=0, rtol=0)
    torch.testing.assert_close(ret, expected_adv + values, atol=0, rtol=0)
    returns = rlhf_fast.discounted_returns(rewards, mask, gamma=0.5, backend="cpp")
    torch.testing.assert_close(returns, torch.tensor([[2.0, 2.0, 2.0, 0.0, 0.0]]), atol=0, rtol=0)


def test_all_masked_rows():
    rewards, values, _ = random_inputs(4, 50, seed=3)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9, backend="cpp")
    assert torch.equal(adv, torch.zeros_like(adv))
    assert torch.equal(ret, values)
    assert torch.equal(rlhf_fast.discounted_returns(rewards, mask, backend="cpp"), torch.zeros(4, 50))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_low_precision_inputs(dtype, gamma, lam):
    rewards, values, mask = random_inputs(7, 129, dtype=dtype, seed=5)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="cpp")
    assert adv.dtype == ret.dtype == torch.float32
    # Same (already rounded) inputs, fp32 math: only fp32 rounding differs.
    ref_adv, ref_ret = reference.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)
    out = rlhf_fast.discounted_returns(rewards, mask, gamma=gamma, backend="cpp")
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, reference.discounted_returns(rewards.float(), mask, gamma=gamma), atol=1e-5, rtol=1e-5
    )


def test_mixed_dtypes():
    rewards, values, mask = random_inputs(5, 40, seed=9)
    adv, ret = rlhf_fast.gae(rewards, values.bfloat16(), mask, gamma=0.9, lam=0.8, backend="cpp")
    ref_adv, ref_ret = reference.gae(rewards, values.bfloat16().float(), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make_mask",
    [
        pytest.param(lambda m, g: m.float(), id="float-0/1"),
        pytest.param(lambda m, g: torch.rand(m.shape, generator=g), id="float-fractional"),
        pytest.param(lambda m, g: m.to(torch.uint8), id="uint8"),
        pytest.param(lambda m, g: m.long(), id="int64"),
        pytest.param(lambda m, g: m.to(torch.bfloat16), id="bf16"),
        pytest.param(lambda m, g: m.double(), id="float64"),
    ],
)
def test_mask_dtypes(make_mask):
    rewards, values, bool_mask = random_inputs(6, 77, seed=13)
    mask = make_mask(bool_mask, torch.Generator().manual_seed(0))
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.95, lam=0.9, backend="cpp")
    ref_adv, ref_ret = reference.gae(rewards, values, mask.float(), gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)
    out = rlhf_fast.discounted_returns(rewards, mask, gamma=0.95, backend="cpp")
    torch.testing.assert_close(
        out, reference.discounted_returns(rewards, mask.float(), gamma=0.95), atol=1e-5, rtol=1e-5
    )


def test_non_contiguous_inputs():
    rewards, values, mask = random_inputs(40, 12, seed=17)
    # [T, B] storage viewed as [B, T]; and a strided slice.
    r_t, v_t, m_t = (x.t().contiguous().t() for x in (rewards, values, mask))
    assert not r_t.is_contiguous()
    adv, ret = rlhf_fast.gae(r_t, v_t, m_t[:, :], gamma=0.9, lam=0.7, backend="cpp")
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=0.9, lam=0.7)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)
    big_r, big_v, big_m = random_inputs(40, 24, seed=17)
    adv2, _ = rlhf_fast.gae(big_r[:, ::2], big_v[:, ::2], big_m[:, ::2], gamma=0.9, lam=0.7, backend="cpp")
    ref2, _ = reference.gae(big_r[:, ::2], big_v[:, ::2], big_m[:, ::2], gamma=0.9, lam=0.7)
    torch.testing.assert_close(adv2, ref2, atol=1e-5, rtol=1e-5)


def test_rows_independent_of_batch():
    rewards, values, mask = random_inputs(19, 65, seed=21)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="cpp")
    for b in (0, 7, 18):
        adv_b, ret_b = rlhf_fast.gae(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1], gamma=0.99, lam=0.95)
        assert torch.equal(adv_b[0], adv[b]) and torch.equal(ret_b[0], ret[b])


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0), (0, 0)])
def test_empty(B, T):
    rewards = torch.zeros(B, T)
    adv, ret = rlhf_fast.gae(rewards, rewards, rewards, backend="cpp")
    assert adv.shape == ret.shape == (B, T) and adv.dtype == torch.float32
    assert rlhf_fast.discounted_returns(rewards, rewards, backend="cpp").shape == (B, T)


def test_outputs_carry_no_gradient():
    rewards, values, mask = random_inputs(3, 10)
    values.requires_grad_(True)
    for backend in ("cpp", "reference"):
        adv, ret = rlhf_fast.gae(rewards.requires_grad_(True), values, mask, backend=backend)
        assert not adv.requires_grad and not ret.requires_grad
        assert not rlhf_fast.discounted_returns(rewards, mask, backend=backend).requires_grad


def test_backends_agree_and_dispatch():
    rewards, values, mask = random_inputs(5, 33, seed=2)
    auto = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    ref = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.95, backend="reference")
    for a, b in zip(auto, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert b.dtype == torch.float32
    with pytest.raises(ValueError, match="Triton"):
        rlhf_fast.gae(rewards, values, mask, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rlhf_fast.discounted_returns(rewards, mask, backend="fast")


# ----------------------------------------------------------------------------------------------
# Bad input


def test_public_api_bad_input():
    r, v, m = random_inputs(4, 8)
    with pytest.raises(ValueError, match="values"):
        rlhf_fast.gae(r, v[:, :7], m)
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.gae(r, v, m[:3])
    with pytest.raises(ValueError, match="rewards"):
        rlhf_fast.gae(r[0], v[0], m[0])
    with pytest.raises(ValueError, match="rewards"):
        rlhf_fast.discounted_returns(r[0], m[0])
    with pytest.raises(ValueError, match="rewards"):
        rlhf_fast.gae(r.long(), v, m)
    with pytest.raises(ValueError, match="values"):
        rlhf_fast.gae(r, v.double(), m)
    with pytest.raises(TypeError, match="values"):
        rlhf_fast.gae(r, v.tolist(), m)
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.gae(r, v, m.to(torch.complex64))
    with pytest.raises(ValueError, match="mask"):  # wrong device
        rlhf_fast.gae(r, v, m.to("meta"))
    with pytest.raises(ValueError, match="values"):
        rlhf_fast.gae(r, v.to("meta"), m)
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma"):
            rlhf_fast.gae(r, v, m, gamma=bad)
        with pytest.raises(ValueError, match="lam"):
            rlhf_fast.gae(r, v, m, lam=bad)
        with pytest.raises(ValueError, match="gamma"):
            rlhf_fast.discounted_returns(r, m, gamma=bad)
    with pytest.raises(TypeError, match="gamma"):
        rlhf_fast.gae(r, v, m, gamma=torch.tensor(0.9))


def test_op_bad_input():
    """The compiled ops check their arguments themselves (torch.ops.rlhf_fast.* called directly)."""
    r, v, m = random_inputs(4, 8)
    with pytest.raises(RuntimeError, match="values shape"):
        torch.ops.rlhf_fast.gae(r, v[:, :7], m, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="mask shape"):
        torch.ops.rlhf_fast.discounted_returns(r, m[:, :7], 1.0)
    with pytest.raises(RuntimeError, match="rewards must be 2-D"):
        torch.ops.rlhf_fast.gae(r[0], v[0], m[0], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="mask must be 2-D"):
        torch.ops.rlhf_fast.gae(r, v, m[0], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="rewards must be float32, bfloat16 or float16"):
        torch.ops.rlhf_fast.gae(r.long(), v, m, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="values must be float32"):
        torch.ops.rlhf_fast.gae(r, v.double(), m, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="gamma"):
        torch.ops.rlhf_fast.gae(r, v, m, 1.5, 1.0)
    with pytest.raises(RuntimeError, match="lam"):
        torch.ops.rlhf_fast.gae(r, v, m, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="gamma"):
        torch.ops.rlhf_fast.discounted_returns(r, m, float("nan"))


# ----------------------------------------------------------------------------------------------
# torch.library checks and torch.compile


def _opcheck_cases():
    r, v, m = random_inputs(5, 19, seed=1)
    rb, vb, _ = random_inputs(3, 1, dtype=torch.bfloat16, seed=2)
    return [
        pytest.param((r, v, m, 0.99, 0.95), (r, m, 0.99), id="fp32-bool"),
        pytest.param((r, v, m.float(), 1.0, 1.0), (r, m.float(), 1.0), id="fp32-float-mask"),
        pytest.param(
            (rb, vb, torch.ones(3, 1), 0.5, 0.0), (rb, torch.ones(3, 1, dtype=torch.uint8), 0.0), id="bf16-T1"
        ),
        pytest.param((r.t().contiguous().t(), v, m, 0.9, 0.9), (r[:, ::2], m[:, ::2], 0.9), id="non-contiguous"),
    ]


@pytest.mark.parametrize("gae_args,returns_args", _opcheck_cases())
def test_opcheck(gae_args, returns_args):
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, gae_args)
    torch.library.opcheck(torch.ops.rlhf_fast.discounted_returns.default, returns_args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(rewards, values, mask):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        return adv * mask, ret, rlhf_fast.discounted_returns(rewards, mask, gamma=0.9)

    compiled = torch.compile(step, fullgraph=True)
    for B, T in [(4, 33), (2, 7)]:
        rewards, values, mask = random_inputs(B, T, seed=B + T)
        for got, want in zip(compiled(rewards, values, mask), step(rewards, values, mask)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# CUDA kernel vs the C++ kernel (rows are independent, so big cases compare a few rows)

GPU_SIZES = [(B, T) for B in (1, 3, 1024) for T in (1, 33, 1000, 5000)]


def _cuda_available_in_C():
    return HAS_CUDA and torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_fast::gae", "CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T", GPU_SIZES)
def test_cuda_matches_cpu(B, T, dtype):
    """CUDA kernel vs the C++ kernel, and both vs the float64 reference loop (on the GPU, for speed):
    the scan along T composes steps in a different order, so it is held to the exact answer."""
    assert _cuda_available_in_C(), f"rlhf_fast._C has no CUDA kernels (built with CUDA: {rlhf_fast._C.with_cuda()})"
    rewards, values, mask = random_inputs(B, T, dtype=dtype, seed=B * 7 + T)
    fractional = torch.rand(B, T, generator=torch.Generator().manual_seed(T))
    cases = [(1.0, 1.0, mask), (0.99, 0.95, fractional), (0.0, 0.5, mask.float())]
    for gamma, lam, m in cases:
        r_gpu, v_gpu, m_gpu = rewards.cuda(), values.cuda(), m.cuda()
        exact_adv, exact_ret = reference.gae(r_gpu.double(), v_gpu.double(), m_gpu.double(), gamma=gamma, lam=lam)
        cpu = torch.ops.rlhf_fast.gae(rewards, values, m, gamma, lam)
        gpu = torch.ops.rlhf_fast.gae(r_gpu, v_gpu, m_gpu, gamma, lam)
        for g, c, exact in zip(gpu, cpu, (exact_adv, exact_ret)):
            assert g.is_cuda and g.dtype == torch.float32 and g.shape == (B, T)
            assert_close_scaled(g, exact)
            assert_close_scaled(c, exact)
        exact_returns = reference.discounted_returns(r_gpu.double(), m_gpu.double(), gamma=gamma)
        assert_close_scaled(torch.ops.rlhf_fast.discounted_returns(r_gpu, m_gpu, gamma), exact_returns)
        assert_close_scaled(torch.ops.rlhf_fast.discounted_returns(rewards, m, gamma), exact_returns)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 6, 33, 1024, 4099])
def test_cuda_misaligned_and_strided(T):
    """Rows that do not start on a 16-byte boundary take the scalar-load path."""
    assert _cuda_available_in_C()
    B = 5
    rewards, values, mask = random_inputs(B, T, seed=T)
    flat = torch.zeros(B * T + 1, device="cuda")
    r_mis = flat[1:].view(B, T).copy_(rewards)  # contiguous, base pointer off by 4 bytes
    cpu = torch.ops.rlhf_fast.gae(rewards, values, mask, 0.99, 0.95)
    gpu = torch.ops.rlhf_fast.gae(r_mis, values.cuda(), mask.cuda(), 0.99, 0.95)
    for g, c in zip(gpu, cpu):
        assert_close_scaled(g, c.double())
    gpu_t = rlhf_fast.gae(rewards.t().contiguous().t().cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95)
    for g, c in zip(gpu_t, cpu):
        assert_close_scaled(g, c.double())


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4, 64, 128, 129, 256, 257, 512, 513, 1025])
def test_cuda_every_group_size_dtype_and_mask_kind(T):
    """T around each group-size boundary (32..256 threads per row, aligned T % 4 == 0 or not),
    fp16 inputs, uint8 masks, and discounted_returns on a misaligned base pointer, all against
    the float64 reference."""
    assert _cuda_available_in_C()
    B = 6
    rewards, values, mask = random_inputs(B, T, seed=1000 + T)
    r16, v16 = rewards.half().cuda(), values.half().cuda()
    m8 = mask.to(torch.uint8).cuda()
    exact_adv, exact_ret = reference.gae(r16.double(), v16.double(), m8.double(), gamma=0.99, lam=0.95)
    adv, ret = torch.ops.rlhf_fast.gae(r16, v16, m8, 0.99, 0.95)
    assert_close_scaled(adv, exact_adv)
    assert_close_scaled(ret, exact_ret)
    flat = torch.zeros(B * T + 1, device="cuda")
    r_mis = flat[1:].view(B, T).copy_(rewards)  # base pointer off by 4 bytes: scalar loads
    exact = reference.discounted_returns(rewards.double().cuda(), mask.double().cuda(), gamma=0.9)
    assert_close_scaled(torch.ops.rlhf_fast.discounted_returns(r_mis, mask.cuda(), 0.9), exact)
    assert_close_scaled(torch.ops.rlhf_fast.discounted_returns(rewards.cuda(), m8, 0.9), exact)


@pytest.mark.gpu
def test_cuda_long_rows_and_oracle():
    assert _cuda_available_in_C()
    rewards, values, mask = random_inputs(2, 100_000, seed=4)
    adv, ret = torch.ops.rlhf_fast.gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.999, 0.95)
    oracle_adv, oracle_ret = gae_oracle(rewards, values, mask, 0.999, 0.95)
    assert_close_scaled(adv, oracle_adv, rtol=1e-4)
    assert_close_scaled(ret, oracle_ret, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_public_api_and_compile():
    assert _cuda_available_in_C()
    rewards, values, mask = (x.cuda() for x in random_inputs(8, 300, seed=8))
    compiled = torch.compile(lambda r, v, m: rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95), fullgraph=True)
    for got, want in zip(compiled(rewards, values, mask), rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95)):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (rewards, values, mask, 0.99, 0.95))
    torch.library.opcheck(torch.ops.rlhf_fast.discounted_returns.default, (rewards, mask, 0.99))
    with pytest.raises((RuntimeError, ValueError), match="mask"):
        torch.ops.rlhf_fast.gae(rewards, values, mask.cpu(), 0.99, 0.95)
    with pytest.raises(ValueError, match="mask"):
        rlhf_fast.gae(rewards, values, mask.cpu())


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_int64_offsets():
    """B * T > 2**31: the last rows sit past int32 offsets. Rows are independent, so check a few
    against the C++ kernel run on just those rows."""
    assert _cuda_available_in_C()
    T = 16384
    B = (2**31) // T + 3
    g = torch.Generator(device="cuda").manual_seed(0)
    rewards = torch.randn(B, T, device="cuda", dtype=torch.bfloat16, generator=g)
    values = torch.randn(B, T, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.2
    adv, ret = torch.ops.rlhf_fast.gae(rewards, values, mask, 0.99, 0.95)
    returns = torch.ops.rlhf_fast.discounted_returns(rewards, mask, 0.99)
    for rows in (slice(0, 1), slice(B - 3, B)):
        cpu_adv, cpu_ret = torch.ops.rlhf_fast.gae(
            rewards[rows].cpu(), values[rows].cpu(), mask[rows].cpu(), 0.99, 0.95
        )
        assert_close_scaled(adv[rows], cpu_adv.double())
        assert_close_scaled(ret[rows], cpu_ret.double())
        cpu_returns = torch.ops.rlhf_fast.discounted_returns(rewards[rows].cpu(), mask[rows].cpu(), 0.99)
        assert_close_scaled(returns[rows], cpu_returns.double())
