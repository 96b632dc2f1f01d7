"""rlhf_fast.linear_logprobs (chunked: one [C, V] logits buffer at a time) against the reference."""

import pytest
import torch
from conftest import DEVICE, TOL

import rlhf_fast
from rlhf_fast import linear as linear_mod
from rlhf_fast import reference


def _inputs(lead, H, V, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(DEVICE, dtype)
    b = torch.randn(V, generator=g).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g).to(DEVICE)
    return hidden, weight, b, labels


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,chunk", [(1, 1271, None), (7, 300, None), (37, 1271, 4), (37, 300, None)])
def test_values_and_grads_match_reference(N, V, chunk, dtype):
    hidden, weight, bias, labels = _inputs((N,), 16, V, dtype)
    labels[N // 2] = -100  # an ignored row in every case with N > 1
    h, w, b = _leaves(hidden, weight, bias)
    logp, ent = rlhf_fast.linear_logprobs(
        h, w, labels, bias=b, temperature=0.8, return_entropy=True, backend="triton", _chunk_rows_override=chunk
    )
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (N,)
    # fp32 reference on the same (already rounded) inputs
    rh, rw, rb = _leaves(hidden.float(), weight.float(), bias.float())
    ref_logp, ref_ent = reference.linear_logprobs(rh, rw, labels, bias=rb, temperature=0.8, return_entropy=True)
    _close(logp, ref_logp, dtype, scale=4.0)
    _close(ent, ref_ent, dtype, scale=4.0)
    assert logp[N // 2] == 0 and ent[N // 2] == 0

    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    grads = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), (h, w, b))
    ref_grads = torch.autograd.grad((ref_logp * g_logp + ref_ent * g_ent).sum(), (rh, rw, rb))
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype, name
        # grad_weight / grad_bias sum over rows: allow for the low-precision grad_logits
        _close(got, want, dtype, scale=1.0 if dtype == torch.float32 else max(1.0, N / 4))
    assert torch.all(grads[0][N // 2] == 0)


def test_leading_dims_ignore_rows_and_logp_only_grads():
    hidden, weight, _, labels = _inputs((2, 5), 16, 300, torch.float32, bias=False)
    labels[0, 1] = -1
    labels[1, 4] = -1
    h, w = _leaves(hidden, weight)
    logp = rlhf_fast.linear_logprobs(h, w, labels, ignore_index=-1, backend="triton", _chunk_rows_override=3)
    rh, rw = _leaves(hidden, weight)
    ref = reference.linear_logprobs(rh, rw, labels, ignore_index=-1)
    assert logp.shape == (2, 5)
    _close(logp, ref, torch.float32)
    assert logp[0, 1] == 0 and logp[1, 4] == 0
    go = torch.randn(2, 5, device=DEVICE)
    gh, gw = torch.autograd.grad((logp * go).sum(), (h, w))
    rgh, rgw = torch.autograd.grad((ref * go).sum(), (rh, rw))
    _close(gh, rgh, torch.float32)
    _close(gw, rgw, torch.float32)
    assert torch.all(gh[0, 1] == 0) and torch.all(gh[1, 4] == 0)


def test_chunking_does_not_change_results():
    hidden, weight, bias, labels = _inputs((37,), 16, 300, torch.float32)
    whole = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend="triton")
    for chunk in (1, 4, 36, 64):
        parts = rlhf_fast.linear_logprobs(
            hidden, weight, labels, bias=bias, return_entropy=True, backend="triton", _chunk_rows_override=chunk
        )
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_chunk_rows_budget():
    assert linear_mod._chunk_rows(10**6, 128_256) % 8 == 0
    assert linear_mod._chunk_rows(10**6, 128_256) * 128_256 * 4 <= linear_mod._CHUNK_BYTES
    assert linear_mod._chunk_rows(10**6, 10**9) == 1  # huge V: at least one row
    assert linear_mod._chunk_rows(5, 300) == 5  # never more than N
    assert linear_mod._chunk_rows(0, 300) == 1
    assert linear_mod._chunk_rows(100, 300, override=4) == 4


def test_only_requested_grads_and_mixed_dtypes():
    hidden, weight, bias, labels = _inputs((6,), 16, 300, torch.bfloat16)
    w32 = weight.float().requires_grad_(True)  # fp32 head with bf16 hidden: cast for the matmul
    logp = rlhf_fast.linear_logprobs(hidden, w32, labels, bias=bias, backend="triton")
    (gw,) = torch.autograd.grad(logp.sum(), (w32,))
    assert gw.dtype == torch.float32 and gw.shape == w32.shape
    rw = weight.float().requires_grad_(True)
    ref = reference.linear_logprobs(hidden.float(), rw, labels, bias=bias.float())
    (rgw,) = torch.autograd.grad(ref.sum(), (rw,))
    _close(gw, rgw, torch.bfloat16, scale=2.0)
    # no grad needed at all: plain forward
    out = rlhf_fast.linear_logprobs(hidden, weight, labels, backend="triton")
    assert not out.requires_grad


def test_entropy_only_gradient_and_empty_input():
    hidden, weight, _, labels = _inputs((5,), 16, 300, torch.float32, bias=False)
    h, w = _leaves(hidden, weight)
    _, ent = rlhf_fast.linear_logprobs(h, w, labels, return_entropy=True, backend="triton", _chunk_rows_override=2)
    gh, gw = torch.autograd.grad(ent.sum(), (h, w))
    rh, rw = _leaves(hidden, weight)
    _, rent = reference.linear_logprobs(rh, rw, labels, return_entropy=True)
    rgh, rgw = torch.autograd.grad(rent.sum(), (rh, rw))
    _close(gh, rgh, torch.float32)
    _close(gw, rgw, torch.float32)

    h0 = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w0 = weight.clone().requires_grad_(True)
    out = rlhf_fast.linear_logprobs(h0, w0, labels[:0], backend="triton")
    assert out.shape == (0,)
    out.sum().backward()
    assert h0.grad.shape == (0, 16)
    # No chunk runs, so nothing initialises the fp32 accumulator: it must come back zero.
    assert torch.equal(w0.grad, torch.zeros_like(w0))


def test_bad_inputs_raise():
    hidden, weight, _, labels = _inputs((3, 4), 8, 21, torch.float32)
    with pytest.raises(ValueError, match="weight shape"):
        rlhf_fast.linear_logprobs(hidden, torch.randn(21, 9, device=DEVICE), labels, backend="triton")
    with pytest.raises(ValueError, match="vocabulary"):
        rlhf_fast.linear_logprobs(hidden, weight[:0], labels, backend="triton")
    with pytest.raises(ValueError, match="labels shape"):
        rlhf_fast.linear_logprobs(hidden, weight, labels[:, :2], backend="triton")
    with pytest.raises(ValueError, match="bias shape"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, bias=torch.randn(20, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="labels"):
        rlhf_fast.linear_logprobs(hidden, weight, labels.float(), backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, temperature=0.0, backend="triton")
    with pytest.raises(TypeError, match="hidden"):
        rlhf_fast.linear_logprobs(hidden.cpu().numpy(), weight, labels)
    with pytest.raises(ValueError, match="backend"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, backend="nope")


def test_bad_label_gives_nan_not_out_of_bounds():
    hidden, weight, _, labels = _inputs((4,), 16, 300, torch.float32, bias=False)
    labels[1] = 300
    logp = rlhf_fast.linear_logprobs(hidden, weight, labels, backend="triton")
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()


def test_opcheck_forward_op():
    hidden, weight, bias, labels = _inputs((5,), 16, 300, torch.float32)
    h, w, b = _leaves(hidden, weight, bias)
    torch.library.opcheck(
        torch.ops.rlhf_fast.linear_logprobs_fwd.default,
        (h, w, b, labels, 1.0, -100, True, 2),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = _inputs((7,), 16, 300, torch.float32)

    def loss(h, w, b):
        logp, ent = rlhf_fast.linear_logprobs(
            h, w, labels, bias=b, return_entropy=True, backend="triton", _chunk_rows_override=4
        )
        return (logp - 0.1 * ent).sum()

    compiled = torch.compile(loss, fullgraph=True)
    h, w, b = _leaves(hidden, weight, bias)
    out = compiled(h, w, b)
    grads = torch.autograd.grad(out, (h, w, b))
    h2, w2, b2 = _leaves(hidden, weight, bias)
    eager = loss(h2, w2, b2)
    eager_grads = torch.autograd.grad(eager, (h2, w2, b2))
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_matches_the_reference_under_autocast(compiled):
    """fp32 hidden and weight under torch.autocast(bf16): the matmuls run in bf16 forward and
    backward alike, as F.linear's do in the reference, and the gradients come back fp32. Logits
    of ~10 make a backward that recomputed fp32 logits against the forward's bf16 normaliser
    visibly wrong (~7 % of the largest gradient before the fix; ~0.4 % bf16 rounding now)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 16, 32, 301
    hidden = torch.randn(N, H, generator=g).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 2).to(DEVICE)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    w_rows = torch.linspace(1, 2, N, device=DEVICE)

    def loss(h, w, backend):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            logp = rlhf_fast.linear_logprobs(h, w, labels, backend=backend, _chunk_rows_override=5)
        return logp, (logp * w_rows).sum()

    results = {}
    for backend in ("triton", "reference"):
        fn = torch.compile(loss, fullgraph=True) if compiled and backend == "triton" else loss
        h, w = _leaves(hidden, weight)
        logp, total = fn(h, w, backend)
        results[backend] = (logp.detach(), *torch.autograd.grad(total, (h, w)))
    for got, want in zip(results["triton"], results["reference"]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)


def test_grad_weight_accumulation_falls_back_without_out_dtype_gemm(monkeypatch):
    """The bf16/fp16 grad_weight accumulation tries addmm with out_dtype=float32 (CUDA, recent
    torch); where that overload is missing or refuses an fp32 accumulator (torch <= 2.9, or CPU as
    here) it falls back to mm + add in fp32, once, and remembers. The first chunk (beta 0) must
    ignore whatever the uninitialised accumulator holds."""
    monkeypatch.setattr(linear_mod, "_addmm_out_dtype_works", None)
    g = torch.Generator().manual_seed(3)
    chunks = [(torch.randn(5, 7, generator=g).bfloat16(), torch.randn(5, 3, generator=g).bfloat16()) for _ in range(3)]
    acc = torch.full((7, 3), float("nan"))
    for i, (gl, h) in enumerate(chunks):
        linear_mod._accumulate_grad_weight(acc, gl, h, first=i == 0, fused=True)
    assert linear_mod._addmm_out_dtype_works is False  # CPU has no out_dtype GEMM: fell back
    expected = sum(torch.mm(gl.t(), h).float() for gl, h in chunks)
    torch.testing.assert_close(acc, expected)

    # Once the fused GEMM is known to work, a failure is a real error, not a reason to fall back.
    monkeypatch.setattr(linear_mod, "_addmm_out_dtype_works", True)
    with pytest.raises((RuntimeError, TypeError)):
        linear_mod._accumulate_grad_weight(acc, *chunks[0], first=False, fused=True)


def test_grad_weight_accumulation_does_not_give_up_on_out_of_memory(monkeypatch):
    """An out-of-memory error from the out_dtype GEMM says nothing about the overload: it is
    raised, and the fused GEMM stays untried (not switched off for the rest of the process)."""
    monkeypatch.setattr(linear_mod, "_addmm_out_dtype_works", None)

    def addmm(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "addmm", addmm)
    gl, h = torch.randn(5, 7).bfloat16(), torch.randn(5, 3).bfloat16()
    with pytest.raises(torch.OutOfMemoryError):
        linear_mod._accumulate_grad_weight(torch.zeros(7, 3), gl, h, first=True, fused=True)
    assert linear_mod._addmm_out_dtype_works is None
