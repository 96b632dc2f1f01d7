"""Benchmarks: GAE and discounted returns over [B, T] fp32.

Peers per group:
  rlhf_fast      the compiled kernel (C++ on CPU, one CUDA launch on GPU), rlhf_fast.gae(backend="cpp")
  python_loop    the reverse loop over T with torch ops on [B] columns, as the common RL libraries
                 write it (TRL / OpenRLHF: rewards and values pre-multiplied by the mask, stack at the end)
  reference      rlhf_fast.reference.gae: the same kind of loop with verl's multi-turn masking
  copy           (GPU) a device-to-device copy of the floor's byte count, for the bandwidth reference
torch.compile of the loop is left out: ANCHORS.md measured 230 s to compile it at T = 1024.

    pytest bench/test_bench_gae.py --benchmark-only --benchmark-group-by=group

Sizes: 256 x 1024 everywhere (ANCHORS.md's CPU-comparable case), plus 1024 x 4096 on GPU.
extra_info: floor_bytes (read rewards, values, bool mask; write advantages, returns) and
floor_GBps = floor_bytes / mean time.
"""

import pytest
import torch
from bench_utils import DEVICE, HAS_CUDA, copy_step
from bench_utils import sync as _sync

import rlhf_fast
from rlhf_fast import reference

GAMMA, LAM = 0.99, 0.95
SIZES = [(256, 1024), (1024, 4096)] if HAS_CUDA else [(256, 1024)]
# (rounds, warmup) for the kernel and for the Python loops (tens to hundreds of ms per call)
FAST_ROUNDS = (100, 10) if HAS_CUDA else (20, 2)
LOOP_ROUNDS = (5, 1) if HAS_CUDA else (3, 1)


def _inputs(B, T):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rewards = torch.randn(B, T, device=DEVICE, generator=g)
    values = torch.randn(B, T, device=DEVICE, generator=g)
    # right padding of random length (the loop peers' masking is exact for this shape of mask)
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=DEVICE, generator=g)
    mask = torch.arange(T, device=DEVICE)[None, :] < lengths
    return rewards, values, mask


def _floor_bytes(B, T, with_values=True):
    reads = (2 if with_values else 1) * 4 * B * T + B * T  # fp32 inputs + bool mask
    writes = (2 if with_values else 1) * 4 * B * T
    return reads + writes


def python_loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """GAE as TRL / OpenRLHF compute it: a reverse Python loop over T on [B] columns."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_gae = 0.0
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _run(benchmark, fn, group, floor_bytes, rounds):
    def timed():
        out = fn()
        _sync()
        return out

    benchmark.group = group
    benchmark.extra_info["floor_bytes"] = floor_bytes
    benchmark.pedantic(timed, rounds=rounds[0], iterations=1, warmup_rounds=rounds[1])
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["floor_GBps"] = floor_bytes / benchmark.stats.stats.mean / 1e9


def _ids(sizes):
    return [f"{B}x{T}" for B, T in sizes]


@pytest.mark.parametrize("B,T", SIZES, ids=_ids(SIZES))
def test_gae_rlhf_fast(benchmark, B, T):
    rewards, values, mask = _inputs(B, T)
    fn = lambda: rlhf_fast.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="cpp")
    _run(benchmark, fn, f"gae {B}x{T}", _floor_bytes(B, T), FAST_ROUNDS)


@pytest.mark.parametrize("B,T", SIZES, ids=_ids(SIZES))
def test_gae_python_loop(benchmark, B, T):
    rewards, values, mask = _inputs(B, T)
    # Same numbers as the kernel for a right-padded mask (sanity check, outside the timing).
    adv, _ = python_loop_gae(rewards, values, mask)
    ours, _ = rlhf_fast.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend="cpp")
    torch.testing.assert_close(adv * mask, ours * mask, atol=1e-4, rtol=1e-4)
    _run(benchmark, lambda: python_loop_gae(rewards, values, mask), f"gae {B}x{T}", _floor_bytes(B, T), LOOP_ROUNDS)


@pytest.mark.parametrize("B,T", SIZES, ids=_ids(SIZES))
def test_gae_reference(benchmark, B, T):
    rewards, values, mask = _inputs(B, T)
    fn = lambda: reference.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)
    _run(benchmark, fn, f"gae {B}x{T}", _floor_bytes(B, T), LOOP_ROUNDS)


@pytest.mark.skipif(not HAS_CUDA, reason="bandwidth reference for the GPU only")
@pytest.mark.parametrize("B,T", SIZES, ids=_ids(SIZES))
def test_gae_copy(benchmark, B, T):
    floor = _floor_bytes(B, T) // 2 * 2  # a copy reads and writes half of it: the same total traffic
    _run(benchmark, copy_step(floor), f"gae {B}x{T}", floor, FAST_ROUNDS)


@pytest.mark.parametrize("B,T", SIZES[:1], ids=_ids(SIZES[:1]))
def test_discounted_returns_rlhf_fast(benchmark, B, T):
    rewards, _, mask = _inputs(B, T)
    fn = lambda: rlhf_fast.discounted_returns(rewards, mask, gamma=GAMMA, backend="cpp")
    _run(benchmark, fn, f"discounted_returns {B}x{T}", _floor_bytes(B, T, with_values=False), FAST_ROUNDS)


@pytest.mark.parametrize("B,T", SIZES[:1], ids=_ids(SIZES[:1]))
def test_discounted_returns_reference(benchmark, B, T):
    rewards, _, mask = _inputs(B, T)
    fn = lambda: reference.discounted_returns(rewards, mask, gamma=GAMMA)
    _run(benchmark, fn, f"discounted_returns {B}x{T}", _floor_bytes(B, T, with_values=False), LOOP_ROUNDS)
