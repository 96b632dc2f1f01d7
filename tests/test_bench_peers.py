"""The report's third-party peers (Liger-Kernel) compute what their column says.

`python -m rlhf_fast.bench` only times its GPU peers; a wrong call (an argument order, a changed
default, a shape convention) would show as a plausible time for the wrong work. Liger's kernels
are Triton, so here they run under TRITON_INTERPRET=1 on CPU (on CUDA where there is one), through
the same `make_step` the report times, and are held to the eager formulas.

Skipped where liger-kernel is not installed; CI installs the pinned 0.8.5 wheel (pure Python,
--no-deps). cut-cross-entropy does not run under the interpreter (its kernels pass None pointers),
so only its import is checked.
"""

import importlib.util

import pytest
import torch
from conftest import DEVICE

from rlhf_fast import _bench_cases as cases
from rlhf_fast.bench import _leaves, make_step

pytest.importorskip("liger_kernel")


def _inputs(key, shape, dtype=torch.float32):
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    return cases.SPECS[key].make_inputs(shape, dtype, torch.device(DEVICE), gen)


def test_liger_cross_entropy_is_the_negated_token_logprob():
    spec = cases.SPECS["logprobs"]
    inp = _inputs("logprobs", (24, 1271))
    # Liger writes its gradient into the logits during the forward: the reference comes first.
    want = torch.log_softmax(inp["logits"].float(), -1).gather(-1, inp["labels"][:, None])[:, 0]
    want_grad = torch.func.grad(
        lambda x: (torch.log_softmax(x, -1).gather(-1, inp["labels"][:, None])[:, 0] * inp["grad_logp"]).sum()
    )(inp["logits"].float())
    leaves = _leaves(spec, inp, "fwd+bwd")
    (logp,), (grad,) = make_step(spec, spec.gpu_peers["liger"](), leaves, "fwd+bwd")()
    torch.testing.assert_close(logp.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad, atol=1e-5, rtol=1e-5)


def test_liger_fused_linear_cross_entropy_is_the_mean_nll():
    spec = cases.SPECS["linear_logprobs"]
    inp = _inputs("linear_logprobs", (40, 16, 300))
    want, (want_h, want_w) = make_step(spec, cases._eager_linear, _leaves(spec, inp, "fwd+bwd"), "fwd+bwd")()
    got, (got_h, got_w) = make_step(spec, spec.gpu_peers["liger"](), _leaves(spec, inp, "fwd+bwd"), "fwd+bwd")()
    torch.testing.assert_close(got[0].float(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h.float(), want_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_w.float(), want_w, atol=1e-5, rtol=1e-4)


def test_liger_grpo_is_the_clipped_k3_loss_with_a_sequence_advantage():
    """The report's Liger GRPO column: clipped ratio loss + k3 KL, token-mean, one advantage per
    row (column 0 of the case's advantages) and no entropy term; gradient w.r.t. the first T
    positions of Liger's [B, T + 1, V] logits."""
    spec = cases.SPECS["ppo_from_logits"]
    B, T, V = 3, 7, 257
    inp = _inputs("ppo_from_logits", (B, T, V))
    adv = inp["advantages"][:, :1].expand(B, T)
    m = inp["mask"].float()

    def eager(logits):
        logp = torch.log_softmax(logits, -1).gather(-1, inp["labels"][..., None])[..., 0]
        ratio = torch.exp(logp - inp["old_logprobs"])
        eps = cases.CLIP_EPS
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
        d = inp["ref_logprobs"] - logp
        tok = pg + cases.KL_COEF * (torch.exp(d) - d - 1)
        return (tok * m).sum() / m.sum()

    logits = inp["logits"].float()
    want = eager(logits)
    want_grad = torch.func.grad(eager)(logits)

    peer = spec.gpu_peers["liger"]()
    leaves = _leaves(spec, inp, "fwd+bwd")
    (loss,), (grad,) = make_step(spec, peer, leaves, "fwd+bwd")()
    assert grad.shape == (B, T + 1, V)
    torch.testing.assert_close(loss.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[:, :T].float(), want_grad, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(grad[:, T]) == 0  # the padding position gets no gradient


@pytest.mark.skipif(importlib.util.find_spec("cut_cross_entropy") is None, reason="cut-cross-entropy not installed")
def test_cut_cross_entropy_is_importable():
    from cut_cross_entropy import linear_cross_entropy

    assert callable(cases._cce()) and callable(linear_cross_entropy)
