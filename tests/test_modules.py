"""nn.Module wrappers hold hyper-parameters only: same numbers as the functional ops."""

import torch

import rlhf_fast
from conftest import DEVICE


def test_ppo_loss_module_matches_functional():
    torch.manual_seed(0)
    B, T, V = 2, 5, 301
    logits = torch.randn(B, T, V, device=DEVICE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old, adv, ref = (torch.randn(B, T, device=DEVICE) for _ in range(3))
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, 3:] = 0
    kw = dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01, agg="seq-mean-token-mean")
    module = rlhf_fast.PPOLoss(**kw, backend="reference")
    assert "clip_eps_high=0.3" in repr(module)
    x1 = logits.clone().requires_grad_()
    loss1, stats1 = module(x1, labels, old, adv, mask, ref)
    loss1.backward()
    x2 = logits.clone().requires_grad_()
    loss2, stats2 = rlhf_fast.reference.ppo_loss_from_logits(x2, labels, old, adv, mask, ref_logprobs=ref, **kw)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert stats1.keys() == stats2.keys()

    # A per-call loss_scale (a GradScaler's current scale) overrides the module's for that call only.
    module = rlhf_fast.PPOLoss(**kw, backend="reference", loss_scale=0.5)
    x3 = logits.clone().requires_grad_()
    loss3, _ = module(x3, labels, old, adv, mask, ref, loss_scale=4.0)
    loss3.backward()
    torch.testing.assert_close(loss3, loss2 * 4.0)
    torch.testing.assert_close(x3.grad, x2.grad * 4.0)
    torch.testing.assert_close(module(logits, labels, old, adv, mask, ref)[0], loss2 * 0.5)


def test_dpo_loss_module_matches_functional():
    torch.manual_seed(0)
    B, T, V = 2, 4, 257
    logits = torch.randn(2 * B, T, V, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T), device=DEVICE)
    mask = torch.ones(2 * B, T, device=DEVICE)
    rc, rr = torch.randn(B, device=DEVICE), torch.randn(B, device=DEVICE)
    module = rlhf_fast.DPOLoss(beta=0.2, loss_type="ipo", average=True, backend="reference")
    loss1, _ = module(logits, labels, mask, rc, rr)
    loss2, _ = rlhf_fast.dpo_loss_from_logits(logits, labels, mask, rc, rr, beta=0.2, loss_type="ipo", average=True, backend="reference")
    torch.testing.assert_close(loss1, loss2)
    assert list(module.parameters()) == []
