"""rlhf_fast.logprobs / entropy / sequence_logprobs: the Triton kernels against rlhf_fast.reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so sizes stay small; the big
vocabularies and the int64-offset case are GPU-only.
"""

import pytest
import torch
from conftest import DEVICE, TOL

import rlhf_fast.token_logprobs as lp_mod
from rlhf_fast import reference
from rlhf_fast.kernels import logprobs as lp_kernels
from rlhf_fast.kernels._rows import row_config
from rlhf_fast.token_logprobs import entropy, logprobs, sequence_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKEND = "triton"


def make_logits(shape, dtype, *, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE).to(dtype)


def make_labels(shape, V, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=gen).to(DEVICE)


def grads_of(fn, logits, weights):
    """d/dlogits of sum_i <out_i, weights_i> for the outputs of fn(logits)."""
    x = logits.detach().clone().requires_grad_(True)
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    (g,) = torch.autograd.grad(loss, x)
    return outs, g


def finite_stand_in(logits):
    """fp32 copy with -inf replaced by -1e4: exp underflows to exactly 0 there, so values and
    gradients equal the -inf ones, without the reference's 0 * -inf = NaN in the backward."""
    x = logits.float()
    return torch.where(torch.isinf(x) & (x < 0), torch.full_like(x, -1e4), x)


def assert_close(actual, expected, dtype, **kw):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, **kw)


# ----------------------------------------------------------------------------------------------
# Forward and backward against the reference


CASES = [
    # (leading dims, temperature, return_entropy)
    ((3, 5), 1.0, False),
    ((7,), 0.7, True),
    ((4, 1), 1.0, True),  # T = 1
    ((2, 3), 0.7, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1271, 2048 + 3])
@pytest.mark.parametrize("lead,temperature,with_entropy", CASES)
def test_logprobs_matches_reference(dtype, V, lead, temperature, with_entropy):
    logits = make_logits((*lead, V), dtype)
    labels = make_labels(lead, V)
    weights = [make_logits(lead, torch.float32, seed=5, scale=1.0)]
    if with_entropy:
        weights.append(make_logits(lead, torch.float32, seed=6, scale=1.0))
    kw = dict(temperature=temperature, return_entropy=with_entropy)

    outs, grad = grads_of(lambda x: logprobs(x, labels, backend=BACKEND, **kw), logits, weights)
    # Reference on the same (already rounded) values, in fp32: the fp32 gradient is what the
    # kernel rounds to logits.dtype.
    ref_outs, ref_grad = grads_of(lambda x: reference.logprobs(x, labels, **kw), logits.float(), weights)

    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and out.shape == lead
        assert_close(out, ref, torch.float32 if dtype == torch.float32 else dtype)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_matches_reference(dtype):
    logits = make_logits((3, 4, 1271), dtype)
    logits[0, 0, :600] = float("-inf")
    w = make_logits((3, 4), torch.float32, seed=7, scale=1.0)
    (out,), grad = grads_of(lambda x: entropy(x, temperature=0.7, backend=BACKEND), logits, [w])
    ref = reference.entropy(logits, temperature=0.7)
    # The reference's gradient is NaN on a row with -inf (0 * -inf in its backward); a very
    # negative finite stand-in has exactly p = 0 there in fp32, i.e. the same function.
    _, ref_grad = grads_of(lambda x: reference.entropy(x, temperature=0.7), finite_stand_in(logits), [w])
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype)
    assert torch.isfinite(grad).all()
    assert (grad[torch.isinf(logits)] == 0).all()
    assert_close(grad, ref_grad, dtype)


def test_gradient_through_entropy_only_and_logp_only():
    logits = make_logits((6, 1271), torch.float32)
    labels = make_labels((6,), 1271)
    g = make_logits((6,), torch.float32, seed=9, scale=1.0)
    for which in (0, 1):
        x = logits.clone().requires_grad_(True)
        out = logprobs(x, labels, return_entropy=True, backend=BACKEND)[which]
        (grad,) = torch.autograd.grad((out * g).sum(), x)
        xr = logits.clone().requires_grad_(True)
        ref = reference.logprobs(xr, labels, return_entropy=True)[which]
        (ref_grad,) = torch.autograd.grad((ref * g).sum(), xr)
        assert_close(grad, ref_grad, torch.float32)


def test_neg_inf_logits():
    V = 1271
    logits = make_logits((5, V), torch.float32)
    labels = make_labels((5,), V)
    logits[0, : V // 2] = float("-inf")  # masked vocabulary (label 103 of row 0 too)
    logits[1, :] = float("-inf")
    logits[1, labels[1]] = 2.0  # only the label is left: logp 0, entropy 0
    logits[2, labels[2]] = float("-inf")  # the label itself is masked: logp -inf
    logits[3, 1::2] = float("-inf")
    g = [make_logits((5,), torch.float32, seed=3, scale=1.0), make_logits((5,), torch.float32, seed=4, scale=1.0)]

    fn = lambda x: logprobs(x, labels, return_entropy=True, temperature=0.7, backend=BACKEND)  # noqa: E731
    (logp, ent), grad = grads_of(fn, logits, g)
    ref_fn = lambda x: reference.logprobs(x, labels, return_entropy=True, temperature=0.7)  # noqa: E731
    ref_logp, ref_ent = ref_fn(logits)
    _, ref_grad = grads_of(ref_fn, finite_stand_in(logits), g)

    assert logp[2] == float("-inf")
    assert logp[1] == 0.0 and ent[1] == 0.0
    assert torch.isfinite(ent).all()
    assert_close(logp, ref_logp, torch.float32)
    assert_close(ent, ref_ent, torch.float32)
    assert torch.isfinite(grad).all()
    # d logp / dz_label = (1 - p_label) / T even where z_label = -inf; elsewhere p = 0 gives 0.
    masked = torch.isinf(logits)
    masked[torch.arange(5, device=DEVICE), labels] = False
    assert (grad[masked] == 0).all()
    assert_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_online_rescale_across_blocks(dtype):
    """Several BLOCK_V chunks per row, with the running max moving late, a first chunk of only
    -inf, and a large common offset (entropy must not cancel lse against sum p z)."""
    V = 9000
    block, _ = row_config(V, dtype)
    assert V > 2 * block
    logits = make_logits((4, V), torch.float32)
    logits[0] += torch.linspace(-20, 20, V, device=DEVICE)  # max in the last chunk
    logits[1, : block + 7] = float("-inf")  # first chunk (and a bit) masked
    logits[2] += 300.0
    logits[3, -1] = 40.0  # one dominant token at the very end: entropy ~ 0
    logits = logits.to(dtype)
    labels = make_labels((4,), V)
    labels[1] = V - 3
    g = [make_logits((4,), torch.float32, seed=3, scale=1.0), make_logits((4,), torch.float32, seed=4, scale=1.0)]
    fn = lambda x: logprobs(x, labels, return_entropy=True, backend=BACKEND)  # noqa: E731
    (logp, ent), grad = grads_of(fn, logits, g)
    ref_fn = lambda x: reference.logprobs(x, labels, return_entropy=True)  # noqa: E731
    ref_logp, ref_ent = ref_fn(logits)
    _, ref_grad = grads_of(ref_fn, finite_stand_in(logits), g)
    assert_close(logp, ref_logp, torch.float32)
    assert_close(ent, ref_ent, torch.float32)
    assert_close(grad, ref_grad, dtype)


def test_all_neg_inf_row_entropy_is_zero():
    logits = torch.full((2, 300), float("-inf"), device=DEVICE)
    logits[1] = make_logits((300,), torch.float32)
    x = logits.clone().requires_grad_(True)
    ent = entropy(x, backend=BACKEND)
    assert ent[0] == 0.0
    torch.testing.assert_close(ent, reference.entropy(logits))
    ent.sum().backward()
    assert (x.grad[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ignore_index_rows(dtype):
    V = 1271
    logits = make_logits((4, 6, V), dtype)
    labels = make_labels((4, 6), V)
    labels[0, :] = -100
    labels[2, 3] = -100
    ignored = labels == -100
    g = [make_logits((4, 6), torch.float32, seed=3, scale=1.0), make_logits((4, 6), torch.float32, seed=4, scale=1.0)]
    fn = lambda x: logprobs(x, labels, return_entropy=True, backend=BACKEND)  # noqa: E731
    (logp, ent), grad = grads_of(fn, logits, g)
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    (ref_logp, ref_ent), ref_grad = grads_of(
        lambda x: reference.logprobs(x, labels, return_entropy=True), logits.float(), g
    )
    assert_close(logp, ref_logp, dtype)
    assert_close(ent, ref_ent, dtype)
    assert_close(grad, ref_grad, dtype)


def test_custom_ignore_index_and_int32_labels():
    V = 1271
    logits = make_logits((8, V), torch.float32)
    labels = make_labels((8,), V)
    labels[3] = 7
    out = logprobs(logits, labels.to(torch.int32), ignore_index=7, backend=BACKEND)
    ref = reference.logprobs(logits, labels, ignore_index=7)
    assert out[3] == 0.0
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_inplace_backward_same_gradient(with_entropy):
    V = 2048 + 3
    base = make_logits((3, 4, V), torch.bfloat16)
    labels = make_labels((3, 4), V)
    labels[1, 2] = -100
    g = [make_logits((3, 4), torch.float32, seed=3, scale=1.0), make_logits((3, 4), torch.float32, seed=4, scale=1.0)]

    def run(inplace):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1  # a non-leaf, as the output of an lm_head would be
        outs = logprobs(logits, labels, return_entropy=with_entropy, inplace_backward=inplace, backend=BACKEND)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum((o * w).sum() for o, w in zip(outs, g)).backward()
        return leaf.grad, logits.detach()

    grad_ref, kept = run(False)
    grad_inplace, clobbered = run(True)
    assert torch.equal(grad_inplace, grad_ref)
    assert torch.equal(kept, base)
    # The gradient was written over the logits' own storage.
    assert torch.equal(clobbered, grad_ref)


def test_inplace_backward_on_expanded_logits_uses_a_new_buffer():
    """Logits whose rows alias (an expanded [V] row) cannot take the gradient over themselves:
    inplace_backward then falls back to a new buffer, with the reference's gradient."""
    V = 301
    base = make_logits((V,), torch.float32)
    labels = make_labels((3, 4), V)
    w = make_logits((3, 4), torch.float32, seed=3, scale=1.0)
    leaf = base.clone().requires_grad_(True)
    (logprobs(leaf.expand(3, 4, V), labels, inplace_backward=True, backend=BACKEND) * w).sum().backward()
    ref_leaf = base.clone().requires_grad_(True)
    (reference.logprobs(ref_leaf.expand(3, 4, V), labels) * w).sum().backward()
    assert_close(leaf.grad, ref_leaf.grad, torch.float32)


# ----------------------------------------------------------------------------------------------
# Bad labels


def test_nan_logits_give_nan_rows():
    """A NaN logit poisons its row (log-prob, entropy, gradient), as in the reference: never a
    finite value from a NaN-skipping max, whichever block of the row holds the NaN."""
    V = 5000  # several blocks per row
    block_v = row_config(V, torch.float32)[0]
    assert block_v < V
    logits = make_logits((5, V), torch.float32)
    labels = make_labels((5,), V)
    logits[0, V - 3] = float("nan")  # in the last block, away from the label
    logits[1, :block_v] = float("nan")  # a whole block NaN: its max alone would skip it
    logits[2, :] = float("nan")
    logits[3, labels[3]] = float("nan")  # the label's own logit
    clean = torch.tensor([False, False, False, False, True], device=DEVICE)
    x = logits.clone().requires_grad_(True)
    logp, ent = logprobs(x, labels, return_entropy=True, backend=BACKEND)
    assert logp[~clean].isnan().all() and ent[~clean].isnan().all()
    ref_logp, ref_ent = reference.logprobs(logits, labels, return_entropy=True)
    assert ref_logp[~clean].isnan().all()  # the reference agrees
    assert_close(logp[clean], ref_logp[clean], torch.float32)
    assert_close(ent[clean], ref_ent[clean], torch.float32)
    (logp.sum() + 0.5 * ent.sum()).backward()
    assert x.grad[~clean].isnan().all() and torch.isfinite(x.grad[clean]).all()
    seq = sequence_logprobs(logits.view(1, 5, V), labels.view(1, 5), torch.ones(1, 5, device=DEVICE),
                            backend=BACKEND)
    assert seq.isnan().all()


def test_bad_labels_give_nan(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_CHECK", raising=False)
    V = 1271
    logits = make_logits((6, V), torch.float32)
    labels = make_labels((6,), V)
    labels[1] = V
    labels[4] = -5
    x = logits.clone().requires_grad_(True)
    out = logprobs(x, labels, backend=BACKEND)
    bad = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    bad[[1, 4]] = True
    assert out[bad].isnan().all()
    assert torch.isfinite(out[~bad]).all()
    assert_close(out[~bad], reference.logprobs(logits, labels)[~bad], torch.float32)
    out[~bad].sum().backward()  # bad rows get grad_output 0: their gradient is 0, not NaN
    assert torch.isfinite(x.grad).all() and (x.grad[bad] == 0).all()
    x.grad = None
    logprobs(x, labels, backend=BACKEND).sum().backward()
    assert x.grad[bad].isnan().all() and torch.isfinite(x.grad[~bad]).all()


def test_bad_labels_raise_with_checks(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_CHECK", "1")
    V = 1271
    logits = make_logits((3, 4, V), torch.float32)
    labels = make_labels((3, 4), V)
    labels[0, 0] = -100  # fine
    logprobs(logits, labels, backend=BACKEND)
    labels[2, 1] = V + 12
    with pytest.raises(ValueError, match=rf"labels.*{V + 12}"):
        logprobs(logits, labels, backend=BACKEND)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(logits, labels, backend=BACKEND)


def test_validation_errors():
    logits = make_logits((3, 4, 100), torch.float32)
    labels = make_labels((3, 4), 100)
    with pytest.raises(ValueError, match="labels shape"):
        logprobs(logits, labels[:, :3], backend=BACKEND)
    with pytest.raises(ValueError, match="labels"):
        logprobs(logits, labels.float(), backend=BACKEND)
    with pytest.raises(ValueError, match="logits"):
        logprobs(logits.long(), labels, backend=BACKEND)
    with pytest.raises(ValueError, match="temperature"):
        logprobs(logits, labels, temperature=0.0, backend=BACKEND)
    with pytest.raises(ValueError, match="logits"):
        sequence_logprobs(logits[0], labels[0], backend=BACKEND)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(logits, labels, torch.ones(3, 5, device=DEVICE), backend=BACKEND)
    with pytest.raises(ValueError, match="backend"):
        entropy(logits, backend="nope")


def test_reference_backend_dispatch():
    logits = make_logits((2, 3, 300), torch.bfloat16)
    labels = make_labels((2, 3), 300)
    out = logprobs(logits, labels, return_entropy=True, backend="reference")
    ref = reference.logprobs(logits, labels, return_entropy=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(entropy(logits, backend="reference"), reference.entropy(logits))
    seq = sequence_logprobs(logits, labels, backend="reference")
    assert torch.equal(seq, reference.sequence_logprobs(logits, labels))


# ----------------------------------------------------------------------------------------------
# Layout and batch invariance


def test_batch_invariance_bitwise():
    V = 2048 + 3
    logits = make_logits((33, V), torch.bfloat16)
    labels = make_labels((33,), V)
    full_logp, full_ent = logprobs(logits, labels, return_entropy=True, backend=BACKEND)
    for rows in (slice(5, 6), slice(0, 1), slice(32, 33), slice(3, 11)):
        part_logp, part_ent = logprobs(logits[rows], labels[rows], return_entropy=True, backend=BACKEND)
        assert torch.equal(part_logp, full_logp[rows])
        assert torch.equal(part_ent, full_ent[rows])
    # Same rows inside a different batch (other rows around them).
    other = torch.cat([make_logits((4, V), torch.bfloat16, seed=11), logits[5:9]])
    other_logp = logprobs(other, torch.cat([labels[:4], labels[5:9]]), backend=BACKEND)
    assert torch.equal(other_logp[4:], full_logp[5:9])


def test_row_strided_input_without_copy():
    V, width = 1271, 1300
    wide = make_logits((2, 3, width), torch.float32)
    logits = wide[..., :V]
    assert not logits.is_contiguous()
    rows = lp_kernels.as_rows3d(logits)
    assert rows.data_ptr() == logits.data_ptr() and rows.stride() == (3 * width, width, 1)

    labels = make_labels((2, 3), V)
    g = [make_logits((2, 3), torch.float32, seed=3, scale=1.0), make_logits((2, 3), torch.float32, seed=4, scale=1.0)]
    fn = lambda x: logprobs(x, labels, return_entropy=True, backend=BACKEND)  # noqa: E731
    strided_outs, _ = grads_of(fn, logits, g)  # (grads_of clones; forward checked here)
    out_direct = logprobs(logits, labels, return_entropy=True, backend=BACKEND)
    contiguous_outs, grad_contig = grads_of(fn, logits.contiguous(), g)
    for a, b, c in zip(out_direct, strided_outs, contiguous_outs):
        assert torch.equal(a, c) and torch.equal(b, c)

    # Backward on the strided view itself, and in place: only the first V columns are written.
    leaf = wide.clone().requires_grad_(True)
    view = (leaf * 1)[..., :V]
    logp, ent = logprobs(view, labels, return_entropy=True, backend=BACKEND)
    ((logp * g[0]).sum() + (ent * g[1]).sum()).backward()
    assert torch.equal(leaf.grad[..., :V], grad_contig)
    assert (leaf.grad[..., V:] == 0).all()

    parent = wide.clone()
    parent[..., V:] = 5.0
    inplace_view = parent[..., :V].requires_grad_(True)
    logp, ent = logprobs(inplace_view, labels, return_entropy=True, inplace_backward=True, backend=BACKEND)
    ((logp * g[0]).sum() + (ent * g[1]).sum()).backward()
    assert torch.equal(inplace_view.grad, grad_contig)
    assert torch.equal(parent[..., :V], grad_contig)  # written in place, through the row stride
    assert (parent[..., V:] == 5.0).all()


def test_non_flattenable_layout_is_copied():
    V = 1271
    # Transposed [B, T] dims: a 3-D view the kernels read in place (stride_b / stride_t).
    transposed = make_logits((3, 2, V), torch.float32).transpose(0, 1)
    assert lp_kernels.as_rows3d(transposed).data_ptr() == transposed.data_ptr()
    # Three leading dims that do not flatten to two: the one layout that is copied ...
    base = make_logits((2, 3, 2, V), torch.float32)
    logits = base.transpose(0, 1)  # [3, 2, 2, V], strides (2V, 6V, V, 1)
    labels = make_labels((3, 2, 2), V)
    assert lp_kernels.as_rows3d(logits).data_ptr() != logits.data_ptr()  # had to copy
    # ... and so is a last dim with stride != 1.
    cols = make_logits((V, 4), torch.float32).t()
    assert lp_kernels.as_rows3d(cols).data_ptr() != cols.data_ptr()
    assert torch.equal(lp_kernels.as_rows3d(cols)[0], cols)

    fn = lambda x: logprobs(x, labels, backend=BACKEND)  # noqa: E731
    ones = [torch.ones(3, 2, 2, device=DEVICE)]
    out, grad = grads_of(fn, logits, ones)  # (clone keeps the transposed strides)
    ref, ref_grad = grads_of(fn, logits.contiguous(), ones)
    assert torch.equal(out[0], ref[0]) and torch.equal(grad, ref_grad)
    assert torch.equal(logprobs(logits, labels, backend=BACKEND), ref[0])
    x = base.clone().transpose(0, 1).requires_grad_(True)
    logprobs(x, labels, inplace_backward=True, backend=BACKEND).sum().backward()
    assert torch.equal(x.grad, ref_grad)
    col_labels = make_labels((4,), V)
    assert torch.equal(
        logprobs(cols, col_labels, backend=BACKEND), logprobs(cols.contiguous(), col_labels, backend=BACKEND)
    )


def _spy_launchers(monkeypatch):
    """Record the logits tensor each launcher is handed (to check that no copy was made)."""
    seen = {"fwd": [], "bwd": []}
    fwd, bwd = lp_kernels.logprobs_forward, lp_kernels.logprobs_backward

    def spy_fwd(logits, *args, **kw):
        seen["fwd"].append(logits)
        return fwd(logits, *args, **kw)

    def spy_bwd(logits, *args, **kw):
        seen["bwd"].append((logits, kw.get("out")))
        return bwd(logits, *args, **kw)

    monkeypatch.setattr(lp_kernels, "logprobs_forward", spy_fwd)
    monkeypatch.setattr(lp_kernels, "logprobs_backward", spy_bwd)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shifted_slice_is_not_copied(monkeypatch, dtype):
    """logits_full[:, :-1] (a [B, T-1, V] view of [B, T, V]: no single row stride) goes to the
    kernels as is, with equal results and gradients; inplace_backward writes through its strides."""
    B, T, V = 3, 5, 1271
    full = make_logits((B, T, V), dtype)
    labels = make_labels((B, T - 1), V)
    labels[1, 2] = -100
    g = [make_logits((B, T - 1), torch.float32, seed=3, scale=1.0), make_logits((B, T - 1), torch.float32, seed=4)]
    fn = lambda x: logprobs(x, labels, return_entropy=True, backend=BACKEND)  # noqa: E731
    expected, grad_expected = grads_of(fn, full[:, :-1].contiguous(), g)

    seen = _spy_launchers(monkeypatch)
    leaf = full.clone().requires_grad_(True)
    shifted = leaf[:, :-1]
    with pytest.raises(RuntimeError):
        shifted.view(-1, V)  # the layout the old flattening could not handle
    outs = fn(shifted)
    ((outs[0] * g[0]).sum() + (outs[1] * g[1]).sum()).backward()
    assert torch.equal(outs[0], expected[0]) and torch.equal(outs[1], expected[1])
    assert torch.equal(leaf.grad[:, :-1], grad_expected) and (leaf.grad[:, -1] == 0).all()
    handed = seen["fwd"][0]
    assert handed.data_ptr() == leaf.data_ptr() and handed.stride() == (T * V, V, 1)
    bwd_logits, bwd_out = seen["bwd"][0]
    assert bwd_logits.data_ptr() == leaf.data_ptr() and bwd_out is None

    # inplace_backward: the gradient lands in full's own storage, the last position untouched.
    seen["fwd"].clear()
    seen["bwd"].clear()
    storage = full.clone()
    x = storage[:, :-1].requires_grad_(True)
    outs = logprobs(x, labels, return_entropy=True, inplace_backward=True, backend=BACKEND)
    ((outs[0] * g[0]).sum() + (outs[1] * g[1]).sum()).backward()
    assert torch.equal(outs[0], expected[0])
    bwd_logits, bwd_out = seen["bwd"][0]
    assert bwd_out is not None and bwd_out.data_ptr() == storage.data_ptr()
    assert torch.equal(storage[:, :-1], grad_expected)
    assert torch.equal(storage[:, -1], full[:, -1])
    assert torch.equal(x.grad, grad_expected)


def test_shifted_slice_entropy_and_sequence_logprobs(monkeypatch):
    B, T, V = 2, 4, 300
    full = make_logits((B, T, V), torch.float32)
    labels = make_labels((B, T - 1), V)
    seen = _spy_launchers(monkeypatch)
    ent = entropy(full[:, :-1], backend=BACKEND)
    seq = sequence_logprobs(full[:, :-1], labels, backend=BACKEND)
    assert all(t.data_ptr() == full.data_ptr() and t.stride() == (T * V, V, 1) for t in seen["fwd"])
    assert torch.equal(ent, entropy(full[:, :-1].contiguous(), backend=BACKEND))
    assert torch.equal(seq, sequence_logprobs(full[:, :-1].contiguous(), labels, backend=BACKEND))


# ----------------------------------------------------------------------------------------------
# sequence_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "tiny"])
def test_sequence_logprobs(dtype, average, mask_kind):
    B, T, V = 3, 5, 1271
    logits = make_logits((B, T, V), dtype)
    labels = make_labels((B, T), V)
    labels[0, 1] = -100
    if mask_kind == "none":
        mask = None
    else:
        mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        mask[1, :] = False  # all-masked row: 0 and 0 gradient
        mask[2, 3:] = False
        labels[2, 4] = V + 5  # a bad label at a masked-out position never contributes
        if mask_kind == "float":
            mask = mask.float() * 0.5 + mask.float() * torch.rand(B, T, device=DEVICE)
        elif mask_kind == "tiny":  # each row's weights sum to < 1: average divides by that sum
            mask = mask.float() * (0.05 + 0.1 * torch.rand(B, T, device=DEVICE))
    g = [make_logits((B,), torch.float32, seed=3, scale=1.0)]
    kw = dict(average=average, temperature=0.7)
    (out,), grad = grads_of(lambda x: sequence_logprobs(x, labels, mask, backend=BACKEND, **kw), logits, g)
    (ref,), ref_grad = grads_of(lambda x: reference.sequence_logprobs(x, labels, mask, **kw), logits.float(), g)
    assert out.shape == (B,) and out.dtype == torch.float32
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol * T, rtol=rtol)
    assert torch.isfinite(grad).all()
    assert_close(grad, ref_grad, dtype)
    if mask is not None:
        assert out[1] == 0.0 and (grad[1] == 0).all()
        assert (grad[2, 3:] == 0).all()


@pytest.mark.parametrize("backend", [BACKEND, "reference"])
def test_sequence_logprobs_mask_shape_checked_on_every_path(backend):
    logits = make_logits((2, 3, 50), torch.float32)
    labels = make_labels((2, 3), 50)
    with pytest.raises(ValueError, match="mask shape"):
        sequence_logprobs(logits, labels, torch.ones(3, device=DEVICE), backend=backend)  # no silent broadcast


def test_sequence_logprobs_nothing_counts():
    logits = make_logits((2, 3, 300), torch.float32)
    labels = torch.full((2, 3), -100, device=DEVICE)
    for average in (False, True):
        x = logits.clone().requires_grad_(True)
        out = sequence_logprobs(x, labels, average=average, backend=BACKEND)
        assert torch.equal(out, torch.zeros(2, device=DEVICE))
        out.sum().backward()
        assert (x.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# Custom-op plumbing: opcheck and torch.compile


def _opcheck_inputs(dtype=torch.float32, V=300):
    logits = make_logits((2, 3, V), dtype).requires_grad_(True)
    labels = make_labels((2, 3), V)
    labels[0, 0] = -100
    return logits, labels


@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck_logprobs_fwd(with_entropy):
    logits, labels = _opcheck_inputs()
    torch.library.opcheck(torch.ops.rlhf_fast.logprobs_fwd.default, (logits, labels, 0.7, -100, with_entropy, False))


def test_opcheck_entropy_and_sequence_fwd():
    logits, labels = _opcheck_inputs()
    torch.library.opcheck(torch.ops.rlhf_fast.entropy_fwd.default, (logits, 0.7))
    weight = (torch.rand(2, 3, device=DEVICE) > 0.3).float()
    torch.library.opcheck(torch.ops.rlhf_fast.sequence_logprobs_fwd.default, (logits, labels, weight, 1.0, -100))


def test_opcheck_backward_ops():
    logits, labels = _opcheck_inputs(torch.bfloat16)
    logits = logits.detach()
    _, ent, lse = torch.ops.rlhf_fast.logprobs_fwd(logits, labels, 1.0, -100, True, False)
    g, ge = torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    args = (g, ge, logits, labels, lse, ent, 1.0, -100)
    torch.library.opcheck(torch.ops.rlhf_fast.logprobs_bwd.default, args)
    torch.library.opcheck(torch.ops.rlhf_fast.logprobs_bwd.default, (None, ge, logits, None, lse, ent, 1.0, -100))
    inplace_args = (g, ge, logits.clone(), labels, lse, ent, 1.0, -100)
    torch.library.opcheck(torch.ops.rlhf_fast.logprobs_bwd_.default, inplace_args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    V = 1271
    logits = make_logits((2, 3, V), torch.bfloat16)
    labels = make_labels((2, 3), V)
    labels[1, 2] = -100
    mask = torch.ones(2, 3, device=DEVICE)
    mask[0, 1] = 0

    def loss_fn(x):
        logp, ent = logprobs(x, labels, temperature=0.7, return_entropy=True, backend=BACKEND)
        seq = sequence_logprobs(x, labels, mask, average=True, backend=BACKEND)
        return (logp * 0.3).sum() - 0.01 * ent.sum() + 0.5 * seq.sum() + entropy(x, backend=BACKEND).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = loss_fn(x1)
    eager.backward()
    comp = compiled(x2)
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_torch_compile_inplace_backward():
    torch._dynamo.reset()
    V = 1271
    base = make_logits((4, V), torch.float32)
    labels = make_labels((4,), V)

    def fn(leaf):
        return logprobs(leaf * 2.0, labels, inplace_backward=True, backend=BACKEND).sum()

    x1 = base.clone().requires_grad_(True)
    fn(x1).backward()
    x2 = base.clone().requires_grad_(True)
    torch.compile(fn, fullgraph=True)(x2).backward()
    torch.testing.assert_close(x2.grad, x1.grad)

    # Inductor pads the saved logits' row stride on GPUs (1271 -> 1280 floats); an in-place
    # backward under compile then wrote through a dense view of the padded buffer (wrong
    # gradients on an H100). Forcing the padding reproduces that layout on CPU too.
    torch._dynamo.reset()
    x3 = base.clone().requires_grad_(True)
    with torch._inductor.config.patch(comprehensive_padding=True, disable_padding_cpu=False):
        torch.compile(fn, fullgraph=True)(x3).backward()
    torch.testing.assert_close(x3.grad, x1.grad)


def test_module_registers_backends():
    from rlhf_fast._backend import OPS

    for name in ("logprobs", "entropy", "sequence_logprobs"):
        assert OPS[name].triton
    assert set(lp_mod.__all__) == {"logprobs", "entropy", "sequence_logprobs"}


# ----------------------------------------------------------------------------------------------
# GPU only: real vocabularies, int64 offsets


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32000, 151936, 256000])
def test_big_vocab_gpu(V):
    N = 512
    logits = make_logits((N, V), torch.bfloat16)
    labels = make_labels((N,), V)
    labels[3] = -100
    g = [torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)]
    fn = lambda x: logprobs(x, labels, return_entropy=True, backend=BACKEND)  # noqa: E731
    (logp, ent), grad = grads_of(fn, logits, g)
    (ref_logp, ref_ent), ref_grad = grads_of(
        lambda x: reference.logprobs(x, labels, return_entropy=True), logits.float(), g
    )
    assert_close(logp, ref_logp, torch.bfloat16)
    assert_close(ent, ref_ent, torch.bfloat16)
    assert_close(grad, ref_grad, torch.bfloat16)
    # Batch invariance at real sizes.
    part, _ = logprobs(logits[100:101], labels[100:101], return_entropy=True, backend=BACKEND)  # same variant
    assert torch.equal(part, logp[100:101])


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_gpu():
    N, V = 16400, 131072  # N * V > 2**31
    assert N * V > 2**31
    logits = torch.randn((N, V), device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    x = logits.requires_grad_(True)
    logp, ent = logprobs(x, labels, return_entropy=True, backend=BACKEND)
    tail = slice(N - 8, N)
    ref_logp, ref_ent = reference.logprobs(logits[tail].detach(), labels[tail], return_entropy=True)
    assert_close(logp[tail], ref_logp, torch.bfloat16)
    assert_close(ent[tail], ref_ent, torch.bfloat16)
    (logp.sum() + ent.sum()).backward(inputs=[x])
    xr = logits[tail].detach().float().requires_grad_(True)
    lr, er = reference.logprobs(xr, labels[tail], return_entropy=True)
    (lr.sum() + er.sum()).backward()
    assert_close(x.grad[tail], xr.grad, torch.bfloat16)
