"""Benchmarks: DPO losses against what users run today (forward + backward).

Groups hold one test per peer:
  "dpo_loss_from_logits <2B>x<T>x<V> <dtype>"  the sigmoid DPO loss from the policy's logits of the
      concatenated batch [2B, T, V] (first B rows chosen) and [B] reference log-probs:
        rlhf_fast  rlhf_fast.dpo_loss_from_logits (backend "auto": Triton on GPU; on CPU the
                   reference, unless TRITON_INTERPRET=1)
        eager      log_softmax(x.float()).gather -> masked sum over T -> -logsigmoid(beta*logits).mean()
        compile    torch.compile of that eager composition
  "dpo_loss <B> fp32"  the per-pair op on [B] sequence log-probs (sigmoid), same three peers.

extra_info records the floor bytes (from logits: forward 1 read of the logits, backward 1 read +
1 write; pairs: read 4 inputs, write the loss, read grad_output, write 2 gradients) and the achieved
GB/s = floor bytes / mean time. GPU sizes are ANCHORS.md's (bf16 logits); on CPU tiny fp32 shapes
keep the file to a few seconds. GPU timings synchronize inside the timed function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_utils import DEVICE, DTYPE_NAMES, HAS_CUDA
from bench_utils import sync as _sync

from rlhf_fast.dpo import dpo_loss, dpo_loss_from_logits

BETA = 0.1
if HAS_CUDA:
    LOGITS_SHAPES = [(16, 2048, 128256)]
    DTYPE = torch.bfloat16
    PAIRS = [4096]
    ROUNDS = 10
else:
    LOGITS_SHAPES = [(4, 16, 1271)]
    DTYPE = torch.float32
    PAIRS = [4096]
    ROUNDS = 3

PEERS = ["rlhf_fast", "eager", "compile"]


# ----------------------------------------------------------------------------------------------
# dpo_loss_from_logits

_logits_cache: dict = {}


def _logits_inputs(shape):
    """(logits, labels, mask, ref_chosen, ref_rejected); only the latest shape is kept (GPU memory)."""
    if shape not in _logits_cache:
        _logits_cache.clear()
        if HAS_CUDA:
            torch.cuda.empty_cache()
        two_b, T, V = shape
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        logits = torch.randn(shape, device=DEVICE, dtype=torch.float32, generator=gen).to(DTYPE)
        labels = torch.randint(0, V, (two_b, T), device=DEVICE, generator=gen)
        mask = torch.ones(two_b, T, device=DEVICE, dtype=torch.bool)
        mask[:, : T // 4] = False  # the prompt does not count
        ref = -T * 10.0 + torch.randn(two_b, device=DEVICE, generator=gen)
        _logits_cache[shape] = (logits, labels, mask, ref[: two_b // 2], ref[two_b // 2 :])
    return _logits_cache[shape]


def eager_dpo_from_logits(logits, labels, mask, ref_chosen, ref_rejected):
    """What a DPO trainer's concatenated forward + sigmoid loss does today."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    seq = (token * mask).sum(-1)
    B = seq.shape[0] // 2
    d = (seq[:B] - seq[B:]) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(BETA * d).mean()


_compiled_from_logits = torch.compile(eager_dpo_from_logits, dynamic=False)


def rlhf_fast_dpo_from_logits(logits, labels, mask, ref_chosen, ref_rejected):
    loss, _ = dpo_loss_from_logits(logits, labels, mask, ref_chosen, ref_rejected, beta=BETA)
    return loss


FROM_LOGITS = {
    "rlhf_fast": rlhf_fast_dpo_from_logits,
    "eager": eager_dpo_from_logits,
    "compile": lambda *a: _compiled_from_logits(*a),
}


@pytest.mark.parametrize("shape", LOGITS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peer", PEERS)
def test_bench_dpo_from_logits(benchmark, peer, shape):
    fn = FROM_LOGITS[peer]
    logits, labels, mask, ref_chosen, ref_rejected = _logits_inputs(shape)
    benchmark.group = f"dpo_loss_from_logits {'x'.join(map(str, shape))} {DTYPE_NAMES[DTYPE]}"
    x = logits.detach().clone().requires_grad_(True)

    def run():
        loss = fn(x, labels, mask, ref_chosen, ref_rejected)
        (grad,) = torch.autograd.grad(loss, x)
        _sync()
        return grad

    run()  # compile / autotune warm-up outside the timing
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    floor = 3 * logits.numel() * logits.element_size() + labels.numel() * 8 + mask.numel()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info["floor_bytes"] = floor
    benchmark.extra_info["backend"] = "auto" if peer == "rlhf_fast" else peer
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(floor / benchmark.stats.stats.mean / 1e9, 2)


# ----------------------------------------------------------------------------------------------
# dpo_loss on [B] sequence log-probs


def eager_dpo_pairs(pc, pr, rc, rr):
    d = (pc - pr) - (rc - rr)
    return -F.logsigmoid(BETA * d)


_compiled_pairs = torch.compile(eager_dpo_pairs, dynamic=False)


def rlhf_fast_dpo_pairs(pc, pr, rc, rr):
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    return losses


PAIR_PEERS = {
    "rlhf_fast": rlhf_fast_dpo_pairs,
    "eager": eager_dpo_pairs,
    "compile": lambda *a: _compiled_pairs(*a),
}


@pytest.mark.parametrize("B", PAIRS)
@pytest.mark.parametrize("peer", PEERS)
def test_bench_dpo_pairs(benchmark, peer, B):
    fn = PAIR_PEERS[peer]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    pc, pr, rc, rr = (-100.0 + 10 * torch.randn(B, device=DEVICE, generator=gen) for _ in range(4))
    grad_out = torch.rand(B, device=DEVICE, generator=gen)
    benchmark.group = f"dpo_loss {B} fp32"
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)

    def run():
        losses = fn(pc, pr, rc, rr)
        grads = torch.autograd.grad(losses, (pc, pr), grad_out)
        _sync()
        return grads

    run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    floor = B * 4 * (4 + 1 + 1 + 2)  # read 4 inputs, write loss, read grad_output, write 2 grads
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info["floor_bytes"] = floor
    benchmark.extra_info["backend"] = "auto" if peer == "rlhf_fast" else peer
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(floor / benchmark.stats.stats.mean / 1e9, 2)
