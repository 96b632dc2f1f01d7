"""Benchmarks: per-token PPO clipped policy loss and the k3 KL penalty, forward + backward.

Peers per group: rlhf_fast (Triton), the eager PyTorch composition users write today (verl-style),
torch.compile of that composition, and a device-to-device copy of the floor's byte count
(the bandwidth reference). On GPU the shapes are ANCHORS.md's ([1024, 8192] fp32); on CPU the
kernels run in the Triton interpreter, so the shapes are tiny and the numbers only prove the suite runs.

    pytest bench/test_bench_ppo.py --benchmark-only --benchmark-group-by=group

Each result's extra_info has floor_bytes (the bytes a fused implementation must move) and
floor_GBps = floor_bytes / mean time; divide by the copy peer's floor_GBps for the fraction of
copy bandwidth reached.

Liger-Kernel: its GRPO loss (`liger_kernel.transformers.grpo_loss.triton_grpo_loss`) takes logits
[B, T + 1, V] and computes the log-probs itself, so it is no peer for a loss on per-token log-probs;
it belongs with the from-logits PPO loss benchmark.
"""

import os

import torch
from bench_utils import DEVICE, HAS_CUDA, copy_step
from bench_utils import sync as _sync

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (lazily, by rlhf_fast)

import rlhf_fast  # noqa: E402

B, T = (1024, 8192) if HAS_CUDA else (16, 256)
ROUNDS, WARMUP = (50, 5) if HAS_CUDA else (3, 1)
PPO_GROUP = f"ppo_policy_loss {B}x{T} fp32"
KL_GROUP = f"kl_penalty k3 {B}x{T} fp32"
FP32 = 4


def _run(benchmark, fn, group, floor_bytes):
    benchmark.group = group
    benchmark.extra_info["floor_bytes"] = floor_bytes
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None
    if mean:
        benchmark.extra_info["floor_GBps"] = floor_bytes / mean / 1e9


# ----------------------------------------------------------------------------------------------
# inputs


def _ppo_inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logp = -torch.rand(B, T, device=DEVICE, generator=g) * 2.0
    old = logp + torch.randn(B, T, device=DEVICE, generator=g) * 0.2
    adv = torch.randn(B, T, device=DEVICE, generator=g)
    # fp32 mask as in ANCHORS.md's floor (4 fp32 inputs read); right padding of random length
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=DEVICE, generator=g)
    mask = (torch.arange(T, device=DEVICE)[None, :] < lengths).to(torch.float32)
    return logp.requires_grad_(), old, adv, mask


PPO_FLOOR = 5 * B * T * FP32  # read logp, old, adv, mask; write the gradient
# separate elementwise forward (read logp, ref; write value) and backward (read grad_out, logp, ref;
# write the gradient)
KL_FLOOR = 7 * B * T * FP32


# ----------------------------------------------------------------------------------------------
# eager composition (what a verl / TRL loop computes)


def eager_ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2):
    ratio = torch.exp(logp - old)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(loss1, loss2)
    denom = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / denom
    stats = {
        "clipfrac": ((loss2 > loss1).float() * mask).sum() / denom,
        "approx_kl": ((old - logp) * mask).sum() / denom,
        "ratio_mean": (ratio * mask).sum() / denom,
        "ratio_max": torch.where(mask != 0, ratio, float("-inf")).amax(),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def eager_k3(logp, ref):
    neg = ref - logp
    return torch.exp(neg) - neg - 1.0


_compiled = {}
# Inductor on GPU (the real peer). On CPU the suite only has to run, and cheaply: inductor's C++
# compile of the forward + backward graphs alone takes ~10 s there, so aot_eager stands in.
COMPILE_BACKEND = "inductor" if HAS_CUDA else "aot_eager"


def _compiled_fn(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, backend=COMPILE_BACKEND)
    return _compiled[name]


# ----------------------------------------------------------------------------------------------
# ppo_policy_loss


def _ppo_step(loss_fn):
    logp, old, adv, mask = _ppo_inputs()

    def step():
        loss, _ = loss_fn(logp, old, adv, mask)
        torch.autograd.grad(loss, logp)
        _sync()

    return step


def test_ppo_policy_loss_rlhf_fast(benchmark):
    step = _ppo_step(lambda a, b, c, d: rlhf_fast.ppo_policy_loss(a, b, c, d, backend="triton"))
    _run(benchmark, step, PPO_GROUP, PPO_FLOOR)


def test_ppo_policy_loss_eager(benchmark):
    _run(benchmark, _ppo_step(eager_ppo_policy_loss), PPO_GROUP, PPO_FLOOR)


def test_ppo_policy_loss_torch_compile(benchmark):
    _run(benchmark, _ppo_step(_compiled_fn("ppo", eager_ppo_policy_loss)), PPO_GROUP, PPO_FLOOR)


def test_ppo_policy_loss_copy_floor(benchmark):
    # Device-to-device copy moving the floor's bytes (half read, half written): the bandwidth bar.
    _run(benchmark, copy_step(PPO_FLOOR), PPO_GROUP, PPO_FLOOR)


# ----------------------------------------------------------------------------------------------
# kl_penalty k3


def _kl_step(kl_fn):
    logp, old, _, _ = _ppo_inputs()
    grad_out = torch.full((B, T), 1.0 / (B * T), device=DEVICE)

    def step():
        out = kl_fn(logp, old)
        torch.autograd.grad(out, logp, grad_out)
        _sync()

    return step


def test_kl_penalty_k3_rlhf_fast(benchmark):
    _run(benchmark, _kl_step(lambda a, b: rlhf_fast.kl_penalty(a, b, "k3", backend="triton")), KL_GROUP, KL_FLOOR)


def test_kl_penalty_k3_eager(benchmark):
    _run(benchmark, _kl_step(eager_k3), KL_GROUP, KL_FLOOR)


def test_kl_penalty_k3_torch_compile(benchmark):
    _run(benchmark, _kl_step(_compiled_fn("k3", eager_k3)), KL_GROUP, KL_FLOOR)


def test_kl_penalty_k3_copy_floor(benchmark):
    _run(benchmark, copy_step(KL_FLOOR), KL_GROUP, KL_FLOOR)
