"""Benchmarks: the fused PPO / GRPO loss from logits against what users run today (forward + backward).

Group "ppo_loss_from_logits <B>x<T>x<V> <dtype>", one test per peer:
    rlhf_fast          rlhf_fast.ppo_loss_from_logits (backend "auto": the Triton kernel on GPU, the
                       reference on CPU), gradient written in the forward
    rlhf_fast-inplace  the same with inplace_backward=True (the gradient overwrites the logits)
    rlhf_fast-triton-rows  the same with the row pass forced onto the Triton kernel
                       (RLHF_FAST_PPO_CLUSTER=0: 2 reads + 1 write), to show what the sm_90 cluster
                       kernel buys; skipped where the cluster kernel does not run (then
                       "rlhf_fast" is that Triton kernel already)
    eager              log_softmax(x.float()) -> gather -> ratio -> clip -> k3 KL -> entropy bonus ->
                       token-mean, autograd backward
    compile            torch.compile of that eager composition
All peers compute the same loss: clip 0.2, k3 KL with coefficient 0.05, entropy bonus 0.01,
token-mean over a mask whose first quarter (the prompt) does not count.

extra_info: floor_bytes = 1 read + 1 write of the logits (DESIGN.md: a loss whose gradient is known
in the forward), GB/s = floor_bytes / mean time, and on GPU the peak memory above the inputs
(extra_GB). GPU size from ANCHORS.md (8 x 2048 x 128256 bf16); on CPU a tiny fp32 shape keeps the
file to seconds. GPU timings synchronize inside the timed function.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import DEVICE, DTYPE_NAMES, HAS_CUDA
from bench_utils import sync as _sync

from rlhf_fast.ppo_from_logits import ppo_loss_from_logits

CLIP = 0.2
KL_COEF = 0.05
ENT_COEF = 0.01
if HAS_CUDA:
    SHAPES = [(8, 2048, 128256)]
    DTYPE = torch.bfloat16
    ROUNDS = 10
else:
    SHAPES = [(2, 8, 1271)]
    DTYPE = torch.float32
    ROUNDS = 3

PEERS = ["rlhf_fast", "rlhf_fast-inplace", "rlhf_fast-triton-rows", "eager", "compile"]


_cache: dict = {}


def _inputs(shape):
    """(logits, labels, old, adv, mask, ref); only the latest shape is kept (GPU memory)."""
    if shape not in _cache:
        _cache.clear()
        if HAS_CUDA:
            torch.cuda.empty_cache()
        B, T, V = shape
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        logits = torch.randn(shape, device=DEVICE, dtype=torch.float32, generator=gen).to(DTYPE)
        labels = torch.randint(0, V, (B, T), device=DEVICE, generator=gen)
        # Log-probs near those of random logits (about -log V - 0.5), so ratios sit around 1.
        base = -torch.log(torch.tensor(float(V))) - 0.5
        old = base + 0.3 * torch.randn(B, T, device=DEVICE, generator=gen)
        ref = base + 0.3 * torch.randn(B, T, device=DEVICE, generator=gen)
        adv = torch.randn(B, T, device=DEVICE, generator=gen)
        mask = torch.ones(B, T, device=DEVICE)
        mask[:, : T // 4] = 0  # the prompt does not count
        _cache[shape] = (logits, labels, old, adv, mask, ref)
    return _cache[shape]


def eager_ppo_from_logits(logits, labels, old, adv, mask, ref):
    """The composition RLHF trainers run today (verl / OpenRLHF style)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - CLIP, 1.0 + CLIP))
    kl = torch.exp(ref - logp) - (ref - logp) - 1.0
    per_token = policy + KL_COEF * kl - ENT_COEF * entropy
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


_compiled = torch.compile(eager_ppo_from_logits, dynamic=False)


def _cluster_kernel_runs(logits) -> bool:
    from rlhf_fast.kernels.ppo_from_logits import cluster_size

    return cluster_size(logits, logits) > 0


def _rlhf_fast(inplace, triton_rows=False):
    def fn(logits, labels, old, adv, mask, ref):
        if triton_rows:
            from rlhf_fast.kernels.ppo_from_logits import cluster_mode

            with cluster_mode("0"):
                return _rlhf_fast(inplace)(logits, labels, old, adv, mask, ref)
        loss, _ = ppo_loss_from_logits(
            logits,
            labels,
            old,
            adv,
            mask,
            clip_eps=CLIP,
            ref_logprobs=ref,
            kl_coef=KL_COEF,
            kl_kind="k3",
            entropy_coef=ENT_COEF,
            inplace_backward=inplace,
        )
        return loss

    return fn


FNS = {
    "rlhf_fast": _rlhf_fast(False),
    "rlhf_fast-inplace": _rlhf_fast(True),
    "rlhf_fast-triton-rows": _rlhf_fast(False, triton_rows=True),
    "eager": eager_ppo_from_logits,
    "compile": lambda *a: _compiled(*a),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peer", PEERS)
def test_bench_ppo_loss_from_logits(benchmark, peer, shape):
    fn = FNS[peer]
    logits, labels, old, adv, mask, ref = _inputs(shape)
    if peer == "rlhf_fast-triton-rows" and not _cluster_kernel_runs(logits):
        pytest.skip("the sm_90 cluster kernel does not run here: rlhf_fast already uses the Triton rows")
    benchmark.group = f"ppo_loss_from_logits {'x'.join(map(str, shape))} {DTYPE_NAMES[DTYPE]}"
    # inplace_backward overwrites its logits each round (with the gradient): timing is unaffected,
    # and the shared inputs stay intact because each peer works on its own copy.
    x = logits.detach().clone().requires_grad_(True)

    def run():
        loss = fn(x, labels, old, adv, mask, ref)
        (grad,) = torch.autograd.grad(loss, x)
        _sync()
        return grad

    run()  # compile / Triton JIT warm-up outside the timing
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["extra_GB"] = round((torch.cuda.max_memory_allocated() - start) / 1e9, 2)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    floor = 2 * logits.numel() * logits.element_size()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info["floor_bytes"] = floor
    benchmark.extra_info["backend"] = "auto" if peer.startswith("rlhf_fast") else peer
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(floor / benchmark.stats.stats.mean / 1e9, 2)
