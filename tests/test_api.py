"""Package-level behaviour: exports, backend choice, aggregation, import hygiene, info."""

import inspect
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE

import rlhf_fast
from rlhf_fast import _backend, reference
from rlhf_fast.aggregation import AGG_MODES, aggregate, aggregation_weights


def test_every_contract_name_is_exported_and_documented():
    for name in rlhf_fast._EXPORTS:
        obj = getattr(rlhf_fast, name)
        assert callable(obj), name
        assert obj.__doc__ and len(obj.__doc__) > 40, f"{name} needs a docstring with shapes and defaults"
    for name in reference.__all__:
        assert hasattr(reference, name)
    with pytest.raises(AttributeError):
        rlhf_fast.no_such_op  # noqa: B018


def test_import_touches_neither_cuda_nor_triton():
    code = (
        "import sys, torch, rlhf_fast; "
        "assert 'triton' not in sys.modules, 'triton imported at package import'; "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_resolve_auto_and_explicit(monkeypatch):
    cpu = torch.device("cpu")
    assert _backend.resolve("aggregate", None, cpu) == "reference"
    assert _backend.resolve("aggregate", "reference", cpu) == "reference"
    with pytest.raises(ValueError, match="aggregate: has no Triton kernel"):
        _backend.resolve("aggregate", "triton", cpu)
    with pytest.raises(ValueError, match="has no C\\+\\+/CUDA kernel"):
        _backend.resolve("aggregate", "cpp", cpu)
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        _backend.resolve("aggregate", "fast", cpu)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "reference")
    assert _backend.default_backend() == "reference"
    monkeypatch.setenv("RLHF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND"):
        _backend.default_backend()


def test_env_backend_falls_back_for_ops_without_that_kernel(monkeypatch):
    """RLHF_FAST_BACKEND=triton covers a whole loop: ops with no Triton kernel (aggregate, gae)
    take the "auto" choice instead of raising; the explicit argument stays strict."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    assert _backend.resolve("aggregate", None, cpu) == "reference"
    assert _backend.resolve("aggregate", "auto", cpu) == "reference"
    assert _backend.resolve("gae", None, cpu) == _backend.resolve("gae", "auto", cpu)
    with pytest.raises(ValueError, match="aggregate: has no Triton kernel"):
        _backend.resolve("aggregate", "triton", cpu)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cpp")
    assert _backend.resolve("aggregate", None, cpu) == "reference"
    # an op that has the kernel but this machine cannot run it still raises
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rlhf_fast.logprobs  # noqa: B018  (registers the op)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        _backend.resolve("logprobs", None, cpu)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    rlhf_fast.logprobs  # noqa: B018  (registers the op)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        _backend.resolve("logprobs", "triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("logprobs", "triton", torch.device("cpu")) == "triton"


def test_env_default_backend_reaches_the_ops(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "reference")
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    m = torch.ones(2, 5)
    adv, ret = rlhf_fast.gae(r, v, m, gamma=0.9, lam=0.95)
    want, _ = reference.gae(r, v, m, gamma=0.9, lam=0.95)
    assert torch.allclose(adv, want, atol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_weights_reproduce_reference(agg):
    L = torch.randn(5, 7, dtype=torch.float64)
    m = torch.randint(0, 2, (5, 7)).bool()
    m[3] = False
    w = aggregation_weights(m, agg)
    want = reference.aggregate(L, m, agg)
    assert torch.allclose((w * L).sum(), want.to(torch.float32).double(), atol=1e-6)
    assert torch.allclose(aggregate(L, m, agg).double(), want, atol=1e-6)
    Lg = L.float().requires_grad_()
    aggregate(Lg, m, agg).backward()
    assert torch.allclose(Lg.grad, w)
    assert aggregate(L, torch.zeros(5, 7), agg).item() == 0.0


def test_aggregate_rejects_bad_arguments():
    L, m = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg='mean'"):
        aggregate(L, m, "mean")
    with pytest.raises(ValueError, match="horizon"):
        aggregate(L, m, "token-mean", horizon=10)
    for bad in (math.inf, math.nan, True, 0, -3.0, "8"):
        with pytest.raises(ValueError, match="horizon must be a finite number"):
            aggregate(L, m, "seq-mean-token-sum-norm", horizon=bad)
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(L, torch.ones(2, 4))


def test_linear_logprobs_reference_and_errors():
    h, w = torch.randn(3, 4, 8), torch.randn(21, 8)
    y = torch.randint(0, 21, (3, 4))
    assert torch.allclose(rlhf_fast.linear_logprobs(h, w, y), reference.logprobs(h @ w.T, y), atol=1e-5)
    with pytest.raises(ValueError, match="weight shape"):
        rlhf_fast.linear_logprobs(h, torch.randn(21, 9), y)
    with pytest.raises(ValueError, match="labels shape"):
        rlhf_fast.linear_logprobs(h, w, y[:, :2])


def test_info_runs_and_reports_every_op(capsys):
    from rlhf_fast import info

    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "extension rlhf_fast._C" in out
    for name in ("gae", "logprobs", "ppo_loss_from_logits", "dpo_loss"):
        assert name in out
    data = info.collect()
    assert data["ops"]["gae"]["cpu"] == "cpp"  # the C++ kernel is what CPU tensors get


def test_reference_path_returns_fp32_for_fp64_inputs():
    """The contract's outputs are fp32 whichever backend runs: the ops that accept fp64 inputs
    return fp32 on the reference path too (rlhf_fast.reference itself keeps fp64), and the fp64
    input still gets an fp64 gradient."""
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    lp = torch.randn(3, 5, dtype=d, generator=g).requires_grad_()
    x = torch.randn(3, 5, dtype=d, generator=g)
    m = torch.ones(3, 5, dtype=torch.bool)
    pair = [torch.randn(2, dtype=d, generator=g) for _ in range(4)]
    outs = {
        "kl_penalty": rlhf_fast.kl_penalty(lp, x, "k3", backend="reference"),
        "shape_rewards": rlhf_fast.shape_rewards(x[:, 0], lp, x, m, kl_coef=0.1, backend="reference"),
        "ppo_policy_loss": rlhf_fast.ppo_policy_loss(lp, x, x, m, backend="reference"),
        "ppo_value_loss": rlhf_fast.ppo_value_loss(lp, x, x, m, backend="reference"),
        "dpo_loss": rlhf_fast.dpo_loss(*pair, backend="reference"),
    }
    for name, out in outs.items():
        parts = [out] if isinstance(out, torch.Tensor) else list(out)
        flat = [t for p in parts for t in (p.values() if isinstance(p, dict) else [p])]
        assert all(t.dtype == torch.float32 for t in flat), (name, [t.dtype for t in flat])
    want = reference.ppo_policy_loss(lp, x, x, m)[0]
    assert want.dtype == d  # the reference module itself keeps fp64 for the oracle tests
    (grad,) = torch.autograd.grad(outs["ppo_policy_loss"][0], lp)
    assert grad.dtype == d
    (want_grad,) = torch.autograd.grad(want, lp)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)


def test_reference_has_the_public_signatures():
    """README: rlhf_fast.reference has the same API (minus backend= and private test hooks)."""
    for name in rlhf_fast._EXPORTS:
        if name in ("PPOLoss", "DPOLoss"):
            continue
        public = inspect.signature(getattr(rlhf_fast, name)).parameters
        ref_params = inspect.signature(getattr(reference, name)).parameters
        want = {k: (p.kind, p.default) for k, p in public.items() if k != "backend" and not k.startswith("_")}
        got = {k: (p.kind, p.default) for k, p in ref_params.items()}
        assert got == want, name
    pc, pr = torch.randn(3), torch.randn(3)
    losses, _, _ = reference.dpo_loss(pc, pr, loss_type="simpo")
    torch.testing.assert_close(losses, rlhf_fast.dpo_loss(pc, pr, loss_type="simpo", backend="reference")[0])
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        reference.dpo_loss(pc, pr)


def _kernel_double_backward_cases():
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 5, 11
    x2 = torch.randn(B, T, generator=g).to(DEVICE)
    logits = torch.randn(B, T, V, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    other = (torch.randn(B, T, generator=g) * 0.3).to(DEVICE)

    def from_logits(inplace):
        def run(x, backend):
            y = x * 1.0 if inplace else x  # in-place needs a non-leaf whose storage it may reuse
            loss, _ = rlhf_fast.ppo_loss_from_logits(
                y, labels, x2 - 2.0, other, mask, backend=backend, inplace_backward=inplace and backend == "triton"
            )
            return loss

        return run

    return {
        "kl_penalty": (x2, lambda x, be: rlhf_fast.kl_penalty(x, other, "k3", backend=be).sum()),
        "ppo_policy_loss": (x2, lambda x, be: rlhf_fast.ppo_policy_loss(x, x2 + other, other, mask, backend=be)[0]),
        "ppo_value_loss": (x2, lambda x, be: rlhf_fast.ppo_value_loss(x, x2 + other, other, mask, backend=be)[0]),
        "ppo_loss_from_logits": (logits, from_logits(False)),
        "ppo_loss_from_logits_inplace": (logits, from_logits(True)),
    }


# Names only: building the cases at collection would touch CUDA there.
@pytest.mark.parametrize(
    "name", ["kl_penalty", "ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits", "ppo_loss_from_logits_inplace"]
)
def test_kernel_gradients_refuse_double_backward(name):
    """The kernels' gradient is a buffer, not a differentiable expression: with create_graph=True
    the first-order gradient is still right, and differentiating it again raises instead of
    silently treating it as a constant (which would drop the second-order terms)."""
    x0, fn = _kernel_double_backward_cases()[name]
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x, "triton"), x, create_graph=True)
    xr = x0.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(xr, "reference"), xr)
    torch.testing.assert_close(grad.detach(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not differentiable itself"):
        ((grad**2).sum() + x.sum()).backward()
    # an ordinary backward is untouched (no graph, the kernel's buffer itself)
    x = x0.clone().requires_grad_()
    fn(x, "triton").backward()
    torch.testing.assert_close(x.grad, want, atol=1e-5, rtol=1e-5)


def test_overlaps_itself():
    x = torch.randn(2, 5, 7)
    assert not _backend.overlaps_itself(x)
    assert not _backend.overlaps_itself(x[..., :4]) and not _backend.overlaps_itself(x[:, :-1])
    assert not _backend.overlaps_itself(x.transpose(0, 1)) and not _backend.overlaps_itself(x[:, ::2])
    assert not _backend.overlaps_itself(torch.randn(1, 3, 1, 4).expand(1, 3, 1, 4))  # size-1 dims
    assert _backend.overlaps_itself(torch.randn(7).expand(2, 5, 7))
    assert _backend.overlaps_itself(x.as_strided((4, 7), (3, 1)))  # rows 3 apart, 7 wide


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B=0", "T=0"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batches_give_zero_loss_on_every_path(shape, backend):
    B, T = shape
    x = torch.randn(B, T, device=DEVICE, requires_grad=True)
    z, m = torch.zeros(B, T, device=DEVICE), torch.ones(B, T, device=DEVICE)
    logits = torch.randn(B, T, 7, device=DEVICE, requires_grad=True)
    labels = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    loss, stats = rlhf_fast.ppo_policy_loss(x, z, z, m, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    loss, stats = rlhf_fast.ppo_loss_from_logits(logits, labels, z, z, m, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and stats["logprobs"].shape == (B, T)
    assert rlhf_fast.ppo_value_loss(x, z, z, m, backend=backend)[0].item() == 0.0
    assert rlhf_fast.shape_rewards(torch.randn(B, device=DEVICE), z, z, m, kl_coef=0.1, backend=backend).shape == (B, T)


def _kernel_or_reference():
    return ["reference"] + (["triton"] if _backend.triton_usable(torch.device(DEVICE).type) else [])


MASK_CASES = ("sequence_logprobs", "ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits",
              "dpo_loss_from_logits", "aggregate")


@pytest.mark.parametrize("backend", _kernel_or_reference())
@pytest.mark.parametrize("name", MASK_CASES)
def test_a_float_mask_gets_no_gradient_on_any_path(name, backend):
    """A mask weighs tokens; it is not differentiated, even when it requires grad (a float mask
    made by a differentiable op). The kernel paths never gave it one; the reference did."""
    g = torch.Generator().manual_seed(11)
    B, T, V = 2, 4, 7
    z = torch.randn(B, T, V, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    lp, old, adv = (torch.randn(B, T, generator=g).to(DEVICE) for _ in range(3))
    lp.requires_grad_()
    mask = torch.rand(B, T, generator=g).to(DEVICE).requires_grad_()
    if name == "aggregate" and backend != "reference":
        pytest.skip("aggregate has the reference path only")
    be = None if name == "aggregate" else backend
    calls = {
        "sequence_logprobs": lambda: rlhf_fast.sequence_logprobs(z, labels, mask, average=True, backend=be).sum(),
        "ppo_policy_loss": lambda: rlhf_fast.ppo_policy_loss(lp, old, adv, mask, backend=be)[0],
        "ppo_value_loss": lambda: rlhf_fast.ppo_value_loss(lp, old, adv, mask, backend=be)[0],
        "ppo_loss_from_logits": lambda: rlhf_fast.ppo_loss_from_logits(z, labels, old, adv, mask, backend=be)[0],
        "dpo_loss_from_logits": lambda: rlhf_fast.dpo_loss_from_logits(
            z, labels, mask, old[:1, 0], old[1:, 0], backend=be
        )[0],
        "aggregate": lambda: rlhf_fast.aggregate(lp, mask, "seq-mean-token-mean"),
    }
    calls[name]().backward()
    assert mask.grad is None
    assert (z.grad is not None) or (lp.grad is not None)


@pytest.mark.parametrize("backend", _kernel_or_reference())
def test_an_overflowing_exp_in_an_unpicked_branch_gives_zero_gradient(backend):
    """A log-ratio of 99.5 overflows fp32 exp to inf. On a clipped token (A > 0, ratio above
    1 + eps) the loss is the constant clipped term and the true gradient is 0; with a k3 KL past
    its clamp, likewise. 0 * inf in exp's backward made the reference NaN there; every path
    gives exactly 0 now, and the other tokens' gradients are untouched."""
    lp = torch.tensor([[-0.5, -0.1]], device=DEVICE)
    old = torch.tensor([[-100.0, -0.2]], device=DEVICE)
    adv = torch.ones(1, 2, device=DEVICE)
    mask = torch.ones(1, 2, dtype=torch.bool, device=DEVICE)
    x = lp.clone().requires_grad_()
    loss, _ = rlhf_fast.ppo_policy_loss(x, old, adv, mask, backend=backend)
    loss.backward()
    assert x.grad[0, 0] == 0
    expected = -math.exp(-0.1 + 0.2) / 2  # unclipped token: -A * ratio / n_tokens
    assert x.grad[0, 1].item() == pytest.approx(expected, rel=1e-6)

    x = torch.tensor([-100.0, -1.0], device=DEVICE, requires_grad=True)
    ref = torch.tensor([-5.0, -1.5], device=DEVICE)
    kl = rlhf_fast.kl_penalty(x, ref, "k3", clamp=10.0, backend=backend)
    kl.sum().backward()
    assert kl[0].item() == 10.0 and x.grad[0] == 0
    assert x.grad[1].item() == pytest.approx(1 - math.exp(-1.5 + 1.0), rel=1e-5)  # d k3 / d logp = 1 - e^(ref-logp)

    z = torch.zeros(1, 2, 4, device=DEVICE, requires_grad=True)  # log-probs -log 4; ratio vs old
    labels = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    loss, _ = rlhf_fast.ppo_loss_from_logits(z, labels, old, adv, mask, backend=backend)
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[0, 0] == 0).all()
    assert (z.grad[0, 1] != 0).any()


_FUSED_LOSSES = ("ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits")


@pytest.mark.parametrize(
    ("op", "backend", "compiled"),
    [(op, be, False) for op in _FUSED_LOSSES for be in _kernel_or_reference()]
    + [(op, "triton", True) for op in _FUSED_LOSSES[::2] if "triton" in _kernel_or_reference()],
)
def test_fp16_gradscaler_keeps_small_gradients(op, backend, compiled):
    """fp16 activations of fp32 master weights under torch.amp.GradScaler, per-token gradients
    ~1e-8 (advantages of 1e-3 over a few thousand tokens): deep in fp16's subnormals at scale 1.
    The [B, T] losses keep their forward-written gradient in fp32 for fp16 inputs, so the usual
    scaler.scale(loss).backward() works; ppo_loss_from_logits writes an fp16 [B, T, V] gradient
    and takes the README's recipe (loss_scale=scale, then scaler.scale(loss / scale)). Either
    way the unscaled master gradient is within fp16 rounding of the float64 truth (an fp16
    buffer at scale 1 loses 3-7 % here)."""
    g = torch.Generator().manual_seed(5)
    from_logits = op == "ppo_loss_from_logits"
    if not from_logits:
        B, T = 16, 256
        base = torch.randn(B, T, generator=g) * 0.01 - 2.0
        a = base + torch.randn(B, T, generator=g) * 0.01  # old log-probs / old values
        b = torch.randn(B, T, generator=g) * 1e-3  # advantages / returns - values, small
        if op == "ppo_value_loss":
            b = base + b
        args = [t.to(DEVICE) for t in (a, b, torch.ones(B, T, dtype=torch.bool))]
    else:
        B, T, V = 2, 128, 50
        base = torch.randn(B, T, V, generator=g)
        labels = torch.randint(0, V, (B, T), generator=g)
        old = -torch.rand(B, T, generator=g) - 3.0
        adv = torch.randn(B, T, generator=g) * 1e-3
        args = [t.to(DEVICE) for t in (labels, old, adv, torch.ones(B, T, dtype=torch.bool))]

    def loss_fn(x, be, **kw):
        fn = getattr(rlhf_fast, op) if be else getattr(reference, op)
        return fn(x, *args, **({"backend": be} if be else {}), **kw)[0]

    base16 = base.half().to(DEVICE)
    truth_x = base16.double().requires_grad_()
    loss_fn(truth_x.float() if from_logits else truth_x, None).backward()
    truth = truth_x.grad.double()

    master = torch.nn.Parameter(base16.float())
    opt = torch.optim.SGD([master], lr=0.0)
    scaler = torch.amp.GradScaler(torch.device(DEVICE).type, init_scale=2.0**16)
    step = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    if from_logits:
        scale = scaler.get_scale()
        loss = step(master.half(), backend, loss_scale=scale)
        scaler.scale(loss / scale).backward()
    else:
        loss = step(master.half(), backend)
        scaler.scale(loss).backward()
    scaler.unscale_(opt)
    err = ((master.grad.double() - truth).norm() / truth.norm()).item()
    assert err < 2e-3, err
    scaler.step(opt)
    scaler.update()


def _varying_shape_case(name, B, T, g):
    """(fn(*tensors, backend) -> output, tensors) of op `name` on a [B, T] batch."""
    V, H = 11, 8

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)

    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    logits, per_token = rand(B, T, V, grad=True), rand(B, T, grad=True)  # the differentiated input
    rf, SUM_NORM = rlhf_fast, "seq-mean-token-sum-norm"  # short names keep most cases on one line
    cases = {
        "logprobs": (lambda x, y, be: rf.logprobs(x, y, return_entropy=True, backend=be), (logits, labels)),
        "entropy": (lambda x, be: rf.entropy(x, backend=be), (logits,)),
        "sequence_logprobs": (lambda x, y, m, be: rf.sequence_logprobs(x, y, m, backend=be), (logits, labels, mask)),
        "linear_logprobs": (
            lambda h, w, y, be: rf.linear_logprobs(h, w, y, backend=be),
            (rand(B, T, H, grad=True), rand(V, H, grad=True), labels),
        ),
        "kl_penalty": (lambda a, b, be: rf.kl_penalty(a, b, kind="k3", backend=be), (per_token, rand(B, T))),
        "shape_rewards": (
            lambda s, a, b, m, be: rf.shape_rewards(s, a, b, m, kl_coef=0.05, backend=be),
            (rand(B), rand(B, T), rand(B, T), mask),
        ),
        "gae": (lambda a, v, m, be: rf.gae(a, v, m, gamma=0.99, lam=0.95, backend=be), (rand(B, T), rand(B, T), mask)),
        "discounted_returns": (
            lambda a, m, be: rf.discounted_returns(a, m, gamma=0.99, backend=be),
            (rand(B, T), mask),
        ),
        "masked_whiten": (lambda a, m, be: rf.masked_whiten(a, m, backend=be), (rand(B, T), mask)),
        "group_advantages": (lambda s, be: rf.group_advantages(s, 2, backend=be), (rand(B),)),
        "aggregate": (lambda x, m, be: rf.aggregate(x, m, SUM_NORM, backend=be), (per_token, mask)),
        "ppo_policy_loss": (
            lambda x, a, b, m, be: rf.ppo_policy_loss(x, a, b, m, dual_clip=3.0, backend=be),
            (per_token, rand(B, T), rand(B, T), mask),
        ),
        "ppo_policy_loss/sum-norm": (
            lambda x, a, b, m, be: rf.ppo_policy_loss(x, a, b, m, agg=SUM_NORM, backend=be),
            (per_token, rand(B, T), rand(B, T), mask),
        ),
        "ppo_value_loss": (
            lambda x, a, b, m, be: rf.ppo_value_loss(x, a, b, m, backend=be),
            (per_token, rand(B, T), rand(B, T), mask),
        ),
        "ppo_loss_from_logits": (
            lambda x, y, a, b, m, ref, be: rf.ppo_loss_from_logits(
                x, y, a, b, m, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, agg=SUM_NORM, backend=be
            ),
            (logits, labels, -rand(B, T).abs(), rand(B, T), mask, -rand(B, T).abs()),
        ),
        "dpo_loss": (
            lambda a, b, c, d, be: rf.dpo_loss(a, b, c, d, backend=be),
            (rand(B, grad=True), rand(B), rand(B), rand(B)),
        ),
        "dpo_loss_from_logits": (
            lambda x, y, m, a, b, be: rf.dpo_loss_from_logits(x, y, m, a, b, backend=be),
            (logits, labels, mask, rand(B // 2), rand(B // 2)),
        ),
    }
    return cases[name]


# Every functional op of the API contract (a new one without a case fails with a KeyError), plus
# the aggregation mode whose divisor is T.
_VARYING_SHAPE_OPS = (*(name for name in rlhf_fast._EXPORTS if name[0].islower()), "ppo_policy_loss/sum-norm")


def _flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for o in out for t in _flat_tensors(o)]


def _kernel_backend(op):
    """The op's kernel path on this machine: "triton" where it has one that runs here, else None
    (auto: the C++ kernel where the op has one, the reference otherwise)."""
    return "triton" if "triton" in _backend.available_backends(op) and "triton" in _kernel_or_reference() else None


def _grads_of_sum(outs, inputs):
    """Gradients w.r.t. inputs of the sum of every differentiable output ([] without inputs)."""
    if inputs:
        sum(o.float().sum() for o in outs if o.requires_grad).backward(inputs=inputs)
    return [a.grad for a in inputs]


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_changing_batch_shape_under_compile_compiles_at_most_twice(name):
    """Rollout lengths (and, with dynamic sampling, batch sizes) change every step. After the
    second shape torch.compile retraces with symbolic sizes; a size that reaches a custom op as a
    Python number (a float argument is a constant of the graph) would instead compile once per
    shape, and fullgraph=True fails after 8. Four shapes: at most 2 graphs, every output (stats
    included) and gradient equal to the reference's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = _kernel_backend(name.split("/")[0])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.Generator().manual_seed(3)
    compiled = torch.compile(_varying_shape_case(name, 2, 3, g)[0], fullgraph=True, backend=counter)
    for B, T in ((2, 5), (4, 9), (6, 13), (8, 17)):
        fn, args = _varying_shape_case(name, B, T, g)
        twin = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        got, want = _flat_tensors(compiled(*args, backend)), _flat_tensors(fn(*twin, "reference"))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, check_dtype=False)
        grads = [_grads_of_sum(o, [a for a in inputs if a.requires_grad]) for o, inputs in ((got, args), (want, twin))]
        torch.testing.assert_close(grads[0], grads[1], atol=2e-5, rtol=2e-5)
    assert counter.frame_count <= 2, f"{name}: {counter.frame_count} graphs for 4 shapes"


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_an_empty_batch_gives_finite_results_equal_on_every_path(name, shape):
    """B = 0 (dynamic sampling filtered every group) or T = 0: no NaN, no launch error, the
    kernel path equal to the reference (an empty loss is 0), gradients finite. A DPO batch needs a
    pair: B = 0 raises, naming the shape."""
    B, T = shape
    op = name.split("/")[0]
    fn, args = _varying_shape_case(name, B, T, torch.Generator().manual_seed(4))
    if op == "dpo_loss_from_logits" and B == 0:
        with pytest.raises(ValueError, match="even and > 0"):
            fn(*args, None)
        return
    results = []
    for backend in (_kernel_backend(op), "reference"):
        inputs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing to warn about (torch's std of nothing did)
            outs = _flat_tensors(fn(*inputs, backend))
        assert all(torch.isfinite(o).all() for o in outs), (backend, outs)
        grads = _grads_of_sum(outs, [a for a in inputs if a.requires_grad])
        assert all(torch.isfinite(g).all() for g in grads), backend
        results.append(outs + grads)
    torch.testing.assert_close(results[0], results[1], check_dtype=False)


def _usable_kernels(op):
    """The kernel backends that `op` runs with here (an explicit backend that would raise is left out)."""
    usable = []
    for name in ("triton", "cpp"):
        try:
            if _backend.resolve(op, name, torch.device(DEVICE)) == name:
                usable.append(name)
        except (ValueError, RuntimeError):
            pass
    return usable


def _other_value(t):
    """A second, different value of input t, for a batch of two under vmap."""
    return t * 0.5 - 0.1 if t.is_floating_point() else t.flip(-1)


def _outputs_with(fn, base, i, x, backend):
    """The flat outputs of a case's fn on the inputs `base`, input i replaced by x."""
    inputs = list(base)
    inputs[i] = x
    return _flat_tensors(fn(*inputs, backend))


def _prefer_triton(monkeypatch, op):
    """RLHF_FAST_BACKEND=triton where op's Triton kernel runs here: the default would pick it."""
    if "triton" in _usable_kernels(op):
        monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_torch_func_grad_and_vmap_run_the_reference_by_default(name, monkeypatch):
    """torch.func cannot differentiate or batch a custom op (torch's own error asks for a
    setup_context the user cannot add), so under grad / vmap the default backend, even with
    RLHF_FAST_BACKEND naming a kernel, picks the reference: per-sample gradients and batched
    evaluation work on every op and equal plain autograd on the reference, for every input."""
    _prefer_triton(monkeypatch, name.split("/")[0])
    fn, args = _varying_shape_case(name, 4, 6, torch.Generator().manual_seed(5))
    base = [a.detach() for a in args]

    def call(i, x, backend):
        return _outputs_with(fn, base, i, x, backend)

    for i in [i for i, a in enumerate(args) if a.requires_grad]:
        got = torch.func.grad(lambda x: sum(o.float().sum() for o in call(i, x, None) if o.requires_grad))(base[i])
        x = base[i].clone().requires_grad_(True)
        (want,) = _grads_of_sum(call(i, x, "reference"), [x])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i, a in enumerate(base):
        other = _other_value(a)
        got = torch.func.vmap(lambda x: call(i, x, None))(torch.stack([a, other]))
        want = [torch.stack(pair) for pair in zip(call(i, a, "reference"), call(i, other, "reference"))]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"vmap over input {i}: {m}")


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_forward_mode_equals_reverse_mode(name, monkeypatch):
    """jacfwd / jvp (and so hessian = jacfwd(jacrev)), and dual tensors in a plain
    torch.autograd.forward_ad.dual_level(), run through every op (the default picks the
    reference there, even with RLHF_FAST_BACKEND naming a kernel) and give the Jacobian that
    reverse mode gives, w.r.t. every floating input: the reference's zero-safe exp (the PPO
    ratio, k3) has a forward-mode rule."""
    import torch.autograd.forward_ad as fwAD

    _prefer_triton(monkeypatch, name.split("/")[0])
    fn, args = _varying_shape_case(name, 2, 3, torch.Generator().manual_seed(7))
    base = [a.detach() for a in args]
    for i in [i for i, a in enumerate(base) if a.is_floating_point()]:

        def flat(x):
            outs = _outputs_with(fn, base, i, x, None)
            return torch.cat([o.float().reshape(-1) for o in outs if o.is_floating_point()])

        forward, reverse = torch.func.jacfwd(flat)(base[i]), torch.func.jacrev(flat)(base[i])
        # (dtype unchecked: torch's forward mode gives a 0-d fp32 tensor times a Python float an
        # fp64 tangent, e.g. the loss times loss_scale.)
        torch.testing.assert_close(
            forward, reverse, atol=1e-5, rtol=1e-5, check_dtype=False, msg=lambda m: f"input {i}: {m}"
        )
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(flat(fwAD.make_dual(base[i], torch.ones_like(base[i])))).tangent
        want = reverse.reshape(reverse.shape[0], -1).sum(-1)
        if tangent is None:  # no output depends on this input
            tangent = torch.zeros_like(want)
        torch.testing.assert_close(tangent, want, atol=1e-5, rtol=1e-5, check_dtype=False)


@pytest.mark.parametrize("name", [n for n in _VARYING_SHAPE_OPS if "/" not in n])
def test_an_explicit_kernel_backend_under_torch_func_raises_naming_the_way_out(name):
    """An explicit kernel backend is strict: under torch.func it raises a RuntimeError that says
    why and names backend='reference', rather than torch's error about setup_context. A kernel
    the op does not have at all is reported as that first."""
    fn, args = _varying_shape_case(name, 4, 6, torch.Generator().manual_seed(6))
    base = [a.detach() for a in args]

    def batched(kernel):
        return torch.func.vmap(lambda x: _flat_tensors(fn(x, *base[1:], kernel)))(torch.stack([base[0], base[0]]))

    for kernel in ("triton", "cpp"):
        if kernel in _usable_kernels(name):
            with pytest.raises(RuntimeError, match=r"torch\.func transforms .*backend='reference'"):
                batched(kernel)
        elif kernel not in _backend.available_backends(name):
            with pytest.raises(ValueError, match="has no"):
                batched(kernel)


def test_only_the_transforms_that_cannot_take_a_custom_op_turn_the_kernels_off():
    """grad, vmap, jvp and forward_ad dual levels cannot transform a custom op; functionalize
    passes it through (make_fx(functionalize(f)) keeps the kernel), and plain code is not a
    transform."""
    seen = {}

    def record(name):
        def f(x):
            seen[name] = _backend.custom_ops_untransformable()
            return x.sum()

        return f

    x = torch.ones(3)
    record("plain")(x)
    torch.func.functionalize(record("functionalize"))(x)
    torch.func.grad(record("grad"))(x)
    torch.func.vmap(record("vmap"))(x)
    torch.func.jvp(record("jvp"), (x,), (x,))
    torch.func.functionalize(torch.func.vmap(record("vmap(functionalize)")))(x)
    with torch.autograd.forward_ad.dual_level():
        record("dual_level")(x)
    compiled = {}

    def in_compile(x):
        compiled["plain"] = _backend.custom_ops_untransformable()
        return x.sum()

    torch.compile(in_compile, backend="eager", fullgraph=True)(x)
    assert seen == {"plain": False, "functionalize": False, "grad": True, "vmap": True, "jvp": True,
                    "vmap(functionalize)": True, "dual_level": True}
    assert compiled == {"plain": False}


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_the_reference_path_and_torch_func_grad_compile_with_fullgraph(name):
    """backend='reference' traces under torch.compile(fullgraph=True) (an autograd.Function with
    a jvp would not: Dynamo refuses it, so the forward-mode rule lives in its own class, used
    outside torch.compile), and so does torch.func.grad over the default backend."""
    fn, args = _varying_shape_case(name, 4, 5, torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    twin = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    got = _flat_tensors(torch.compile(fn, backend="aot_eager", fullgraph=True)(*args, "reference"))
    want = _flat_tensors(fn(*twin, "reference"))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    grads = [_grads_of_sum(o, [a for a in inputs if a.requires_grad]) for o, inputs in ((got, args), (want, twin))]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    base = [a.detach() for a in args]
    for i in [i for i, a in enumerate(args) if a.requires_grad]:

        def summed(x):
            return sum(o.float().sum() for o in _outputs_with(fn, base, i, x, None) if o.requires_grad)

        torch._dynamo.reset()
        got = torch.compile(torch.func.grad(summed), backend="aot_eager", fullgraph=True)(base[i])
        torch.testing.assert_close(got, torch.func.grad(summed)(base[i]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_inputs_made_under_inference_mode_work_on_every_path(name):
    """Reference log-probs, labels, masks and scores often come from a rollout or a reference
    model run under torch.inference_mode(). Eager formulas never save them for backward, but a
    kernel's autograd did, and torch refuses to save an inference tensor. Every input that takes
    no gradient is an inference tensor here: the kernel path equals the reference, gradients
    included."""
    op = name.split("/")[0]
    fn, args = _varying_shape_case(name, 4, 6, torch.Generator().manual_seed(11))
    results = []
    for backend in (_kernel_backend(op), "reference"):
        inputs = []
        for a in args:
            if a.requires_grad:
                inputs.append(a.detach().clone().requires_grad_(True))
            else:
                with torch.inference_mode():
                    inputs.append(a.detach().clone())
        outs = _flat_tensors(fn(*inputs, backend))
        results.append(outs + _grads_of_sum(outs, [a for a in inputs if a.requires_grad]))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5, check_dtype=False)


def _every_hyper_parameter_case(name, real, integer, g):
    """(fn(*tensors, backend), tensors) of op `name` with every numeric hyper-parameter set, each
    passed through `real` (floats) or `integer` (ints). Values are exact in fp32, so float() of a
    numpy.float32 of them is the Python value itself."""
    B, T, V, H = 4, 6, 11, 8
    r, i = real, integer

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)

    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)  # label 0 is the ignore_index below
    logits, per_token = rand(B, T, V, grad=True), rand(B, T, grad=True)
    rf, SUM_NORM = rlhf_fast, "seq-mean-token-sum-norm"
    cases = {
        "logprobs": (
            lambda x, y, be: rf.logprobs(x, y, temperature=r(0.75), ignore_index=i(0), return_entropy=True, backend=be),
            (logits, labels),
        ),
        "entropy": (lambda x, be: rf.entropy(x, temperature=r(1.5), backend=be), (logits,)),
        "sequence_logprobs": (
            lambda x, y, m, be: rf.sequence_logprobs(x, y, m, temperature=r(0.5), ignore_index=i(0), backend=be),
            (logits, labels, mask),
        ),
        "linear_logprobs": (
            lambda h, w, y, be: rf.linear_logprobs(h, w, y, temperature=r(2.0), ignore_index=i(0), backend=be),
            (rand(B, T, H, grad=True), rand(V, H, grad=True), labels),
        ),
        "kl_penalty": (
            lambda a, b, be: rf.kl_penalty(a, b, kind="k3", clamp=r(0.5), backend=be),
            (per_token, rand(B, T)),
        ),
        "shape_rewards": (
            lambda s, a, b, m, be: rf.shape_rewards(s, a, b, m, kl_coef=r(0.0625), backend=be),
            (rand(B), rand(B, T), rand(B, T), mask),
        ),
        "gae": (
            lambda a, v, m, be: rf.gae(a, v, m, gamma=r(0.96875), lam=r(0.9375), backend=be),
            (rand(B, T), rand(B, T), mask),
        ),
        "discounted_returns": (
            lambda a, m, be: rf.discounted_returns(a, m, gamma=r(0.96875), backend=be),
            (rand(B, T), mask),
        ),
        "masked_whiten": (lambda a, m, be: rf.masked_whiten(a, m, eps=r(0.125), backend=be), (rand(B, T), mask)),
        "group_advantages": (
            lambda s, be: rf.group_advantages(s, i(2), eps=r(0.25), backend=be),
            (rand(B),),
        ),
        "aggregate": (lambda x, m, be: rf.aggregate(x, m, SUM_NORM, horizon=i(16), backend=be), (per_token, mask)),
        "ppo_policy_loss": (
            lambda x, a, b, m, be: rf.ppo_policy_loss(
                x, a, b, m, clip_eps=r(0.125), clip_eps_high=r(0.25), dual_clip=r(3.0), agg=SUM_NORM,
                horizon=r(12.5), loss_scale=r(0.5), backend=be,
            ),
            (per_token, rand(B, T), rand(B, T), mask),
        ),
        "ppo_value_loss": (
            lambda x, a, b, m, be: rf.ppo_value_loss(
                x, a, b, m, clip_eps=r(0.25), agg=SUM_NORM, horizon=i(9), loss_scale=r(2.0), backend=be
            ),
            (per_token, rand(B, T), rand(B, T), mask),
        ),
        "ppo_loss_from_logits": (
            lambda x, y, a, b, m, ref, be: rf.ppo_loss_from_logits(
                x, y, a, b, m, ref_logprobs=ref, temperature=r(0.75), clip_eps=r(0.125), clip_eps_high=r(0.25),
                dual_clip=r(3.0), kl_coef=r(0.125), kl_clamp=r(4.0), entropy_coef=r(0.0625), agg=SUM_NORM,
                horizon=i(8), ignore_index=i(0), loss_scale=r(0.5), backend=be,
            ),
            (logits, labels, -rand(B, T).abs(), rand(B, T), mask, -rand(B, T).abs()),
        ),
        "dpo_loss": (
            lambda a, b, c, d, be: rf.dpo_loss(
                a, b, c, d, beta=r(0.25), loss_type="robust", label_smoothing=r(0.125), backend=be
            ),
            (rand(B, grad=True), rand(B), rand(B), rand(B)),
        ),
        "dpo_loss/simpo": (
            lambda a, b, be: rf.dpo_loss(a, b, beta=r(2.0), loss_type="simpo", gamma=r(0.75), backend=be),
            (rand(B, grad=True), rand(B)),
        ),
        "dpo_loss/discopop": (
            lambda a, b, c, d, be: rf.dpo_loss(a, b, c, d, loss_type="discopop", discopop_tau=r(0.125), backend=be),
            (rand(B, grad=True), rand(B), rand(B), rand(B)),
        ),
        "dpo_loss_from_logits": (
            lambda x, y, m, a, b, be: rf.dpo_loss_from_logits(
                x, y, m, a, b, beta=r(0.5), temperature=r(0.75), ignore_index=i(0), backend=be
            ),
            (logits, labels, mask, rand(B // 2), rand(B // 2)),
        ),
    }
    return cases[name]


_HYPER_OPS = (*(n for n in rlhf_fast._EXPORTS if n[0].islower()), "dpo_loss/simpo", "dpo_loss/discopop")


@pytest.mark.parametrize("name", _HYPER_OPS)
def test_numpy_scalar_hyper_parameters_equal_python_numbers_on_every_path(name):
    """Sweeps and schedules often hand over numpy scalars (np.linspace, an array's .min()):
    numpy.float32 / numpy.int64 hyper-parameters give exactly what the same Python numbers give,
    on every path, gradients included (they raised "must be a real number, got float32")."""
    op = name.split("/")[0]
    for backend in (*_usable_kernels(op), "reference"):
        results = []
        for real, integer in ((float, int), (np.float32, np.int64)):
            fn, args = _every_hyper_parameter_case(name, real, integer, torch.Generator().manual_seed(12))
            outs = _flat_tensors(fn(*args, backend))
            results.append(outs + _grads_of_sum(outs, [a for a in args if a.requires_grad]))
        torch.testing.assert_close(results[1], results[0], atol=0, rtol=0, msg=lambda m: f"{backend}: {m}")


def test_numpy_bools_and_tensors_are_still_not_hyper_parameters():
    """numpy.bool_ is no number, as bool is not; a tensor would cost a host sync per call."""
    x, m = torch.zeros(1, 2), torch.ones(1, 2)
    for bad in (np.bool_(True), True, torch.tensor(0.2)):
        with pytest.raises(TypeError, match="clip_eps must be a real number"):
            rlhf_fast.ppo_policy_loss(x, x, x, m, clip_eps=bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        rlhf_fast.logprobs(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), ignore_index=np.float32(0))
    with pytest.raises(ValueError, match="horizon must be a finite number"):
        rlhf_fast.aggregate(x, m, "seq-mean-token-sum-norm", horizon=np.bool_(True))


@pytest.fixture
def one_rank_mesh():
    """A device mesh over a single-process group (world size 1), for DTensor inputs."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable, or a process group already exists")
    if DEVICE == "cuda":
        if not dist.is_nccl_available():
            pytest.skip("no NCCL for a CUDA device mesh")
        backend = "cpu:gloo,cuda:nccl"
    else:
        if not dist.is_gloo_available():
            pytest.skip("no gloo for a CPU device mesh")
        backend = "gloo"
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh(DEVICE, (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", _VARYING_SHAPE_OPS)
def test_dtensor_inputs_run_the_reference_by_default(name, monkeypatch, one_rank_mesh):
    """Tensor-parallel code (loss_parallel) hands the ops DTensors, and DTensor raises "does not
    have a sharding strategy registered" for a custom op. So for DTensor inputs the default (even
    RLHF_FAST_BACKEND naming a kernel) picks the reference, plain torch ops that DTensor runs
    itself: the outputs are DTensors equal to the reference on plain tensors, gradients too. An
    explicit kernel raises, naming backend='reference'. (DPO's gradient is not checked: torch's
    DTensor has no rule for log_sigmoid's backward, which its reference uses, as TRL does.)"""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    op = name.split("/")[0]
    _prefer_triton(monkeypatch, op)
    fn, args = _varying_shape_case(name, 4, 6, torch.Generator().manual_seed(9))
    mesh = one_rank_mesh
    sharded = [distribute_tensor(a.detach(), mesh, [Replicate()]).requires_grad_(a.requires_grad) for a in args]
    plain = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    got, want = _flat_tensors(fn(*sharded, None)), _flat_tensors(fn(*plain, "reference"))
    assert all(isinstance(o, DTensor) for o in got), [type(o).__name__ for o in got]
    torch.testing.assert_close([o.full_tensor() for o in got], want, atol=1e-6, rtol=1e-6)
    if not op.startswith("dpo_"):
        grads = _grads_of_sum(got, [a for a in sharded if a.requires_grad])
        torch.testing.assert_close(
            [g.full_tensor() for g in grads],
            _grads_of_sum(want, [a for a in plain if a.requires_grad]),
            atol=1e-6,
            rtol=1e-6,
        )
    for kernel in _usable_kernels(op):
        with pytest.raises(RuntimeError, match=r"DTensor inputs.*backend='reference'"):
            fn(*sharded, kernel)


def _sharded_inputs_worker(rank, store_path):
    """One rank of test_sharded_inputs_on_two_ranks_equal_the_reference."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        g = torch.Generator().manual_seed(10)
        B, T, V = 4, 6, 38
        logits, labels = torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)
        labels[0, 1] = -100
        old, ref = -3 * torch.rand(B, T, generator=g), -3 * torch.rand(B, T, generator=g)
        adv, mask = torch.randn(B, T, generator=g), (torch.rand(B, T, generator=g) > 0.3).float()
        ref_pair = -torch.rand(B, generator=g)

        def ops(x, y, o, a, m, r, rp, backend):
            loss, stats = rlhf_fast.ppo_loss_from_logits(
                x, y, o, a, m, ref_logprobs=r, kl_coef=0.1, entropy_coef=0.01, backend=backend
            )
            return [
                *rlhf_fast.logprobs(x, y, return_entropy=True, backend=backend),
                rlhf_fast.sequence_logprobs(x, y, m, backend=backend),
                rlhf_fast.dpo_loss_from_logits(x, y, m, rp[:2], rp[2:], backend=backend)[0],
                loss,
                stats["logprobs"],
            ]

        sharded = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_(True)
        rest = [distribute_tensor(t, mesh, [Replicate()]) for t in (labels, old, adv, mask, ref, ref_pair)]
        got = ops(sharded, *rest, None)
        plain = logits.clone().requires_grad_(True)
        want = ops(plain, labels, old, adv, mask, ref, ref_pair, "reference")
        torch.testing.assert_close([o.full_tensor() for o in got], want, atol=1e-6, rtol=1e-6)
        got[-2].backward()
        want[-2].backward()
        torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad, atol=1e-6, rtol=1e-6)

        # A vocab-sharded lm_head (ColwiseParallel): linear_logprobs' log-probs, entropy, gradients.
        hidden, weight = torch.randn(B, T, 8, generator=g), torch.randn(V, 8, generator=g)
        dist_h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_(True)
        dist_w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
        got = rlhf_fast.linear_logprobs(dist_h, dist_w, rest[0], return_entropy=True)
        plain_h, plain_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        want = rlhf_fast.linear_logprobs(plain_h, plain_w, labels, return_entropy=True, backend="reference")
        torch.testing.assert_close([o.full_tensor() for o in got], list(want), atol=1e-6, rtol=1e-6)
        sum(o.sum() for o in got).backward()
        sum(o.sum() for o in want).backward()
        torch.testing.assert_close(
            [dist_h.grad.full_tensor(), dist_w.grad.full_tensor()], [plain_h.grad, plain_w.grad], atol=1e-5, rtol=1e-5
        )

        # [B, T] inputs sharded on T (sequence parallelism), the mask with holes; row 1's last
        # counted token in the first shard, the others' in the second.
        mask[1, 3:] = 0
        rewards, values, scores = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B)

        def per_token_ops(s, r, v, lp, o, a, m, ref_lp, backend):
            return [
                rlhf_fast.shape_rewards(s, lp, ref_lp, m, kl_coef=0.05, backend=backend),
                *rlhf_fast.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend),
                rlhf_fast.discounted_returns(r, m, gamma=0.99, backend=backend),
                rlhf_fast.ppo_policy_loss(lp, o, a, m, backend=backend)[0],
            ]

        new_lp = old + 0.1 * torch.randn(B, T, generator=g)
        on_t = [distribute_tensor(t, mesh, [Shard(1)]) for t in (rewards, values, new_lp, old, adv, mask, ref)]
        got = per_token_ops(distribute_tensor(scores, mesh, [Replicate()]), *on_t, None)
        want = per_token_ops(scores, rewards, values, new_lp, old, adv, mask, ref, "reference")
        torch.testing.assert_close([o.full_tensor() for o in got], want, atol=1e-6, rtol=1e-6)
    finally:
        dist.destroy_process_group()


def test_sharded_inputs_on_two_ranks_equal_the_reference(tmp_path):
    """DTensors across two gloo ranks on the CPU; the default path (the reference; see the test
    above) equals the single-process reference. Logits sharded on V (loss_parallel): log-probs,
    entropy, sequence log-probs, DPO and PPO losses and the PPO gradient, and linear_logprobs with
    a vocab-sharded weight; torch 2.13's DTensor
    cannot reduce the vocab-sharded gathered log-prob once squeezed, so the reference subtracts
    the log-sum-exp first. [B, T] inputs sharded on T: shape_rewards (DTensor runs cumsum(-1)
    shard by shard, so the last-token positions are a [T] cumsum over dim 0), GAE, returns, the
    PPO loss. One rank alone never reduces or scans across shards, hence two."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no torch.distributed / gloo")
    torch.multiprocessing.spawn(_sharded_inputs_worker, args=(str(tmp_path / "store"),), nprocs=2)
