"""nn.Module wrappers hold hyper-parameters only: same numbers as the functional ops."""

import pytest
import torch
from conftest import DEVICE

import rlhf_fast


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


PPO_BAD_SETTINGS = [
    dict(agg="token_mean"),  # a typo of "token-mean"
    dict(clip_eps=-0.1),
    dict(clip_eps_high=float("nan")),
    dict(dual_clip=0.5),
    dict(kl_kind="k9"),
    dict(kl_clamp=-1.0),
    dict(entropy_coef="0.01"),
    dict(temperature=0.0),
    dict(horizon=512),  # horizon without agg="seq-mean-token-sum-norm"
    dict(ignore_index=-100.0),
    dict(loss_scale=0.0),
    dict(backend="tritn"),
    dict(backend="cpp"),  # this op has no C++ kernel
    dict(kl_clamp=-1.0, temperature=0.0),  # two bad settings: the same one is reported first
]
DPO_BAD_SETTINGS = [
    dict(loss_type="sigmod"),
    dict(beta=0.0),
    dict(loss_type="ipo", label_smoothing=0.1),  # no meaning for IPO
    dict(loss_type="robust", label_smoothing=0.5),
    dict(discopop_tau=-1.0),
    dict(temperature=-1.0),
    dict(ignore_index=None),
    dict(backend="cpp"),
    dict(beta=0.0, temperature=-1.0),  # two bad settings: the same one is reported first
    dict(loss_type="nope", ignore_index=None),
]


def _raised(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("bad", PPO_BAD_SETTINGS, ids=repr)
def test_ppo_loss_module_rejects_bad_settings_at_construction(bad):
    """A bad hyper-parameter fails where the module is built (the config), with the error the
    functional op gives, not at the first training step after a rollout."""
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V, device=DEVICE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old, adv = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    at_construction = _raised(lambda: rlhf_fast.PPOLoss(**bad))
    assert at_construction is not None, f"PPOLoss({bad}) constructed"
    assert at_construction == _raised(lambda: rlhf_fast.ppo_loss_from_logits(logits, labels, old, adv, mask, **bad))


@pytest.mark.parametrize("bad", DPO_BAD_SETTINGS, ids=repr)
def test_dpo_loss_module_rejects_bad_settings_at_construction(bad):
    B, T, V = 2, 3, 11
    logits = torch.randn(2 * B, T, V, device=DEVICE)
    labels = torch.randint(0, V, (2 * B, T), device=DEVICE)
    mask = torch.ones(2 * B, T, device=DEVICE)
    rc, rr = torch.randn(B, device=DEVICE), torch.randn(B, device=DEVICE)
    at_construction = _raised(lambda: rlhf_fast.DPOLoss(**bad))
    assert at_construction is not None, f"DPOLoss({bad}) constructed"
    assert at_construction == _raised(lambda: rlhf_fast.dpo_loss_from_logits(logits, labels, mask, rc, rr, **bad))


def test_modules_accept_every_valid_setting_and_survive_copies():
    """Construction-time checks must not refuse what the functional ops take; a module is plain
    data (no parameters or buffers), so deepcopy and pickle give the same module."""
    import copy
    import pickle

    for kw in (
        dict(clip_eps=0, clip_eps_high=0.28, dual_clip=3, kl_coef=-0.1, kl_kind="low_var_kl", kl_clamp=10),
        dict(agg="seq-mean-token-sum-norm", horizon=4096, temperature=0.7, ignore_index=0, loss_scale=1e-3),
        dict(entropy_coef=0.01, backend="reference"),
        dict(backend="auto"),
        dict(backend="triton"),  # availability on the device is checked at the call, as for the op
    ):
        module = rlhf_fast.PPOLoss(**kw)
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert clone.kwargs == module.kwargs and repr(clone) == repr(module)
    for kw in (
        dict(loss_type="robust", label_smoothing=0.49),
        dict(loss_type="simpo", gamma=-1.0, average=True, temperature=2, ignore_index=0),
        dict(loss_type="discopop", discopop_tau=0.1, backend="triton"),
    ):
        module = rlhf_fast.DPOLoss(**kw)
        assert pickle.loads(pickle.dumps(module)).kwargs == module.kwargs


def test_check_order_and_per_call_loss_scale_are_as_before():
    """A nonzero kl_coef without ref_logprobs is still reported before the later settings' errors
    (it was, before the checks were shared with PPOLoss); PPOLoss(loss_scale=None) still builds,
    for a loop that passes its loss_scale to every forward."""
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    old, adv = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        rlhf_fast.ppo_loss_from_logits(logits, labels, old, adv, mask, kl_coef=0.1, kl_clamp=-1.0)
    module = rlhf_fast.PPOLoss(loss_scale=None, backend="reference")
    loss, _ = module(logits, labels, old, adv, mask, loss_scale=2.0)
    want, _ = rlhf_fast.ppo_loss_from_logits(logits, labels, old, adv, mask, loss_scale=2.0, backend="reference")
    torch.testing.assert_close(loss, want)
    with pytest.raises(TypeError, match="loss_scale must be a real number"):
        module(logits, labels, old, adv, mask)
