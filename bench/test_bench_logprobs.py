"""Benchmarks: per-token log-probs from logits [N, V] against what users run today.

Groups ("logprobs <mode> <N>x<V> <dtype>") hold one test per peer:
  rlhf_fast      rlhf_fast.logprobs (backend "auto": the Triton kernel on GPU; on CPU, whatever
                 auto picks there, i.e. the reference unless a C++ kernel exists)
  eager          torch.log_softmax(x.float(), -1).gather(...)
  compile        torch.compile(gather(x) - logsumexp(x)) on fp32-upcast logits
  liger          Liger-Kernel LigerCrossEntropyLoss(reduction="none") (skipped if not installed)
Modes: fwd, fwd+bwd (gradient w.r.t. logits with a random grad_output), fwd+entropy.

extra_info records the floor bytes each mode must move (fwd: 1 read of logits; fwd+bwd: 1 read in
the forward + 1 read and 1 write in the backward; labels and per-token outputs included) and the
achieved GB/s = floor bytes / mean time, for the bandwidth report.

GPU sizes are ANCHORS.md's (bf16); on CPU one tiny fp32 shape keeps the file to a few seconds.
GPU timings synchronize inside the timed function.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import DEVICE, DTYPE_NAMES, HAS_CUDA
from bench_utils import sync as _sync

import rlhf_fast.token_logprobs as rf
from rlhf_fast._backend import resolve

if HAS_CUDA:
    SHAPES = [(16384, 32000), (16384, 128256), (8192, 151936)]
    DTYPE = torch.bfloat16
    ROUNDS, ITERATIONS = 10, 1
else:
    SHAPES = [(64, 1271)]
    DTYPE = torch.float32
    ROUNDS, ITERATIONS = 3, 1

PEERS = ["rlhf_fast", "eager", "compile", "liger"]
MODES = ["fwd", "fwd+bwd", "fwd+entropy"]


_inputs_cache: dict = {}


def _inputs(shape):
    """(logits, labels, grad_output) for one shape; only the latest shape is kept (GPU memory)."""
    if shape not in _inputs_cache:
        _inputs_cache.clear()
        if HAS_CUDA:
            torch.cuda.empty_cache()
        N, V = shape
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        logits = torch.randn(shape, device=DEVICE, dtype=torch.float32, generator=gen).to(DTYPE)
        labels = torch.randint(0, V, (N,), device=DEVICE, generator=gen)
        grad_out = torch.randn(N, device=DEVICE, generator=gen)
        _inputs_cache[shape] = (logits, labels, grad_out)
    return _inputs_cache[shape]


# ----------------------------------------------------------------------------------------------
# Peers: each returns (logp,) or (logp, entropy) in fp32


def eager_logprobs(x, labels, with_entropy=False):
    logp_all = torch.log_softmax(x.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return (logp,)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _gather_minus_lse(x, labels, with_entropy=False):
    z = x.float()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return (logp,)
    p = torch.exp(z - lse.unsqueeze(-1))
    return logp, lse - (p * z).sum(-1)


def _compile_fn():
    # A fresh Dynamo cache per test: 3 shapes x 3 modes would pass the recompile limit of one
    # code object and silently fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(_gather_minus_lse, dynamic=False)

    def compile_logprobs(x, labels, with_entropy=False):
        return compiled(x, labels, with_entropy)

    return compile_logprobs


def rlhf_fast_logprobs(x, labels, with_entropy=False):
    out = rf.logprobs(x, labels, return_entropy=with_entropy)
    return out if with_entropy else (out,)


def _liger_fn():
    liger = pytest.importorskip("liger_kernel.transformers")
    loss = liger.LigerCrossEntropyLoss(reduction="none")

    def liger_logprobs(x, labels, with_entropy=False):
        return (-loss(x, labels),)

    return liger_logprobs


def _peer_fn(peer):
    if peer == "rlhf_fast":
        return rlhf_fast_logprobs
    if peer == "eager":
        return eager_logprobs
    if peer == "compile":
        return _compile_fn()
    return _liger_fn()


def _floor_bytes(mode, N, V, elem):
    logits = N * V * elem
    token = N * (8 + 4)  # int64 label in, fp32 log-prob out
    if mode == "fwd":
        return logits + token
    if mode == "fwd+entropy":
        return logits + token + N * 4
    return 3 * logits + token + N * 4  # + fp32 grad_output in


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("peer", PEERS)
def test_bench_logprobs(benchmark, peer, mode, shape):
    with_entropy = mode == "fwd+entropy"
    if peer == "liger" and with_entropy:
        pytest.skip("Liger-Kernel cross-entropy has no entropy output")
    fn = _peer_fn(peer)
    N, V = shape
    logits, labels, grad_out = _inputs(shape)
    benchmark.group = f"logprobs {mode} {N}x{V} {DTYPE_NAMES[DTYPE]}"

    if mode == "fwd+bwd":
        x = logits.detach().clone().requires_grad_(True)

        def run():
            (logp,) = fn(x, labels)
            (grad,) = torch.autograd.grad(logp, x, grad_out)
            _sync()
            return grad

    else:
        # Liger's cross-entropy writes its gradient over its input: keep the shared logits intact.
        x = logits.clone() if peer == "liger" else logits

        def run():
            with torch.no_grad():
                out = fn(x, labels, with_entropy)
            _sync()
            return out

    run()  # compile / autotune / interpreter warm-up outside the timing
    benchmark.pedantic(run, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=1)

    floor = _floor_bytes(mode, N, V, logits.element_size())
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info["floor_bytes"] = floor
    if peer == "rlhf_fast":
        benchmark.extra_info["backend"] = resolve("logprobs", None, logits.device)  # what "auto" ran
    if benchmark.stats is not None:
        mean_s = benchmark.stats.stats.mean
        benchmark.extra_info["GB/s"] = float(f"{floor / mean_s / 1e9:.4g}")
