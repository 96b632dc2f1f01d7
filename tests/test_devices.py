"""Kernels run on the device of their inputs, not on whichever CUDA device happens to be current.

Triton launches on the current device and its current stream. A model spread over GPUs
(device_map="auto": the lm_head and so the logits on the last GPU) or a second model on another
GPU hands the ops tensors on cuda:1 while cuda:0 is current; a kernel launched on cuda:0 with
cuda:1 pointers gives wrong numbers or an illegal address (Liger-Kernel issue 1303). Every
launcher in rlhf_fast.kernels is wrapped in `_backend.on_input_device`, which makes the tensors'
device current for the launch.

- test_every_triton_launch_is_inside_on_input_device (CPU interpreter and GPU): every kernel
  launch made by every op, forward and backward, happens inside such a wrapper, and every
  kernel in rlhf_fast.kernels is launched by at least one case (a new kernel must be added here).
- test_ops_on_a_second_gpu (needs 2 GPUs): each op on cuda:1 with cuda:0 current gives the
  same loss and gradients as on the CPU reference, and leaves cuda:0 current.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import rlhf_fast
from rlhf_fast import _backend

V = 37


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _inputs(device) -> dict[str, torch.Tensor]:
    """Small inputs for every case, made on CPU (one seed) and moved to `device`."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 5, 8
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    x = {
        "logits": torch.randn(B, T, V, generator=g),
        "labels": labels,
        "mask": mask,
        "lp": -torch.rand(B, T, generator=g),
        "old_lp": -torch.rand(B, T, generator=g),
        "ref_lp": -torch.rand(B, T, generator=g),
        "adv": torch.randn(B, T, generator=g),
        "scores": torch.randn(B, generator=g),
        "values": torch.randn(B, T, generator=g),
        "returns": torch.randn(B, T, generator=g),
        "hidden": torch.randn(B, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g) * 0.3,
        "pc": -torch.rand(B, generator=g) * 5,
        "pr": -torch.rand(B, generator=g) * 5,
        "rc": -torch.rand(B, generator=g) * 5,
        "rr": -torch.rand(B, generator=g) * 5,
        "rewards": torch.randn(B, T, generator=g),
    }
    return {k: v.to(device) for k, v in x.items()}


# Each case: (name, fn(inputs, backend) -> (outputs, leaves)). The outputs are reduced with
# weights != 1 and differentiated w.r.t. the leaves, so backward kernels run too.
def _logprobs(x, backend, inplace=False):
    logits = _leaf(x["logits"])
    src = logits.clone() if inplace else logits  # the in-place backward overwrites its input
    lp, ent = rlhf_fast.logprobs(
        src, x["labels"], return_entropy=True, inplace_backward=inplace, backend=backend
    )
    return [lp, ent], [logits]


def _entropy(x, backend):
    logits = _leaf(x["logits"])
    return [rlhf_fast.entropy(logits, backend=backend)], [logits]


def _sequence_logprobs(x, backend):
    logits = _leaf(x["logits"])
    return [rlhf_fast.sequence_logprobs(logits, x["labels"], x["mask"], average=True, backend=backend)], [logits]


def _linear_logprobs(x, backend):
    hidden, weight = _leaf(x["hidden"]), _leaf(x["weight"])
    lp, ent = rlhf_fast.linear_logprobs(hidden, weight, x["labels"], return_entropy=True, backend=backend)
    return [lp, ent], [hidden, weight]


def _kl(x, backend):
    lp, ref = _leaf(x["lp"]), _leaf(x["ref_lp"])
    return [rlhf_fast.kl_penalty(lp, ref, "k3", backend=backend)], [lp, ref]


def _shape_rewards(x, backend):
    out = rlhf_fast.shape_rewards(x["scores"], x["lp"], x["ref_lp"], x["mask"], kl_coef=0.1, backend=backend)
    return [out], []


def _ppo_policy(x, backend):
    lp = _leaf(x["lp"])
    loss, stats = rlhf_fast.ppo_policy_loss(lp, x["old_lp"], x["adv"], x["mask"], dual_clip=3.0, backend=backend)
    return [loss, stats["clipfrac"]], [lp]


def _ppo_value(x, backend):
    v = _leaf(x["values"])
    loss, _ = rlhf_fast.ppo_value_loss(v, x["values"] + 0.1, x["returns"], x["mask"], backend=backend)
    return [loss], [v]


def _ppo_from_logits(x, backend):
    logits = _leaf(x["logits"])
    loss, stats = rlhf_fast.ppo_loss_from_logits(
        logits, x["labels"], x["old_lp"], x["adv"], x["mask"],
        ref_logprobs=x["ref_lp"], kl_coef=0.05, entropy_coef=0.01, backend=backend,
    )
    return [loss, stats["entropy"]], [logits]


def _dpo(x, backend):
    pc, pr = _leaf(x["pc"]), _leaf(x["pr"])
    losses, cr, rr = rlhf_fast.dpo_loss(pc, pr, x["rc"], x["rr"], backend=backend)
    return [losses, cr, rr], [pc, pr]


def _dpo_from_logits(x, backend):
    logits = _leaf(x["logits"])  # rows 0 (chosen) and 1 (rejected): B = 1
    loss, stats = rlhf_fast.dpo_loss_from_logits(
        logits, x["labels"], x["mask"], x["rc"][:1], x["rr"][:1], backend=backend
    )
    return [loss, stats["chosen_rewards"]], [logits]


def _gae(x, backend):  # the extension's ops (C++ / CUDA), not Triton: only the 2-GPU test
    adv, ret = rlhf_fast.gae(x["rewards"], x["values"], x["mask"], gamma=0.99, lam=0.95, backend=backend)
    return [adv, ret, rlhf_fast.discounted_returns(x["rewards"], x["mask"], gamma=0.9, backend=backend)], []


TRITON_CASES = {
    "logprobs": _logprobs,
    "logprobs_inplace": lambda x, b: _logprobs(x, b, inplace=True),
    "entropy": _entropy,
    "sequence_logprobs": _sequence_logprobs,
    "linear_logprobs": _linear_logprobs,
    "kl_penalty": _kl,
    "shape_rewards": _shape_rewards,
    "ppo_policy_loss": _ppo_policy,
    "ppo_value_loss": _ppo_value,
    "ppo_loss_from_logits": _ppo_from_logits,
    "dpo_loss": _dpo,
    "dpo_loss_from_logits": _dpo_from_logits,
}
ALL_CASES = {**TRITON_CASES, "gae": _gae}


def _run(case, x, backend):
    """Outputs (detached) and the gradients of sum_i (i + 2) * sum(output_i) w.r.t. the leaves
    (weights != 1: the PPO ops hand back a gradient written in the forward, and only a
    grad_output != 1 launches their scale kernels)."""
    outs, leaves = case(x, backend)
    if leaves:
        total = sum((i + 2.0) * o.float().sum() for i, o in enumerate(outs) if o.requires_grad)
        grads = torch.autograd.grad(total, leaves)
    else:
        grads = ()
    return [o.detach() for o in outs], list(grads)


def _kernels_in(module) -> set[str]:
    from triton.runtime.jit import KernelInterface

    return {
        name for name, obj in vars(module).items()
        if isinstance(obj, KernelInterface) and name.endswith("_kernel")
    }


def test_every_triton_launch_is_inside_on_input_device(monkeypatch):
    if not _backend.triton_usable(torch.device(DEVICE).type):
        pytest.skip("Triton cannot run here")
    from rlhf_fast.kernels import dpo, kl, logprobs, ppo, ppo_from_logits

    modules = (dpo, kl, logprobs, ppo, ppo_from_logits)
    expected = set().union(*(_kernels_in(m) for m in modules))
    assert expected, "no Triton kernels found in rlhf_fast.kernels"
    launched: dict[str, int] = {}
    outside: list[str] = []
    for cls in {type(getattr(m, k)) for m in modules for k in _kernels_in(m)}:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            name = self.fn.__name__
            launched[name] = launched.get(name, 0) + 1
            if _backend.launch_scope_depth() == 0:
                outside.append(name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)

    x = _inputs(DEVICE)
    for case in TRITON_CASES.values():
        _run(case, x, "triton")
    assert not outside, f"launched outside on_input_device: {sorted(set(outside))}"
    missing = expected - set(launched)
    assert not missing, f"kernels no case launched (add a case): {sorted(missing)}"


def test_foreign_cuda_index_asks_cuda_nothing_for_cpu_tensors():
    assert _backend.foreign_cuda_index(None) is None
    assert _backend.foreign_cuda_index(torch.zeros(3)) is None
    if not HAS_CUDA:
        assert not torch.cuda.is_initialized()


def test_on_input_device_passes_arguments_and_restores_depth():
    calls = []

    @_backend.on_input_device
    def launcher(a, b, *, c):
        calls.append((_backend.launch_scope_depth(), a, b, c))
        if c == "raise":
            raise RuntimeError("boom")
        return a + b

    assert launcher(1, 2, c="x") == 3
    with pytest.raises(RuntimeError, match="boom"):
        launcher((torch.zeros(1),), 0, c="raise")
    assert calls == [(1, 1, 2, "x"), (1, calls[1][1], 0, "raise")]
    assert _backend.launch_scope_depth() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_ops_on_a_second_gpu(name):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    case = ALL_CASES[name]
    want_out, want_grads = _run(case, _inputs("cpu"), "reference")
    x = _inputs("cuda:1")
    with torch.cuda.device(0):
        got_out, got_grads = _run(case, x, None)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got.cpu().to(want.dtype), want, atol=2e-5, rtol=2e-5)
