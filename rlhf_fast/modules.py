"""Thin nn.Module wrappers: they hold hyper-parameters only and call the functional ops."""

from __future__ import annotations

import torch
from torch import nn


class PPOLoss(nn.Module):
    """PPO / GRPO actor loss straight from logits (`rlhf_fast.ppo_loss_from_logits`).

    Hyper-parameters (defaults as the functional op): clip_eps=0.2, clip_eps_high=None (=clip_eps),
    dual_clip=None, kl_coef=0.0 (nonzero needs ref_logprobs in forward), kl_kind="k3",
    entropy_coef=0.0, agg="token-mean", horizon=None, temperature=1.0, ignore_index=-100,
    inplace_backward=False (the gradient overwrites the logits' storage), backend=None,
    kl_clamp=None, loss_scale=1.0 (e.g. 1 / gradient accumulation steps: the gradient comes out
    scaled from the forward, with no extra pass in backward).

    forward(logits [B, T, V], labels [B, T], old_logprobs [B, T], advantages [B, T], mask [B, T],
    ref_logprobs [B, T] | None, *, loss_scale=None) -> (loss 0-d fp32, stats dict); a loss_scale
    given to forward overrides the module's for that call (a torch.amp.GradScaler's current
    scale, say: see the README's fp16 recipe).
    """

    def __init__(
        self,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_kind: str = "k3",
        entropy_coef: float = 0.0,
        agg: str = "token-mean",
        horizon: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        inplace_backward: bool = False,
        backend: str | None = None,
        kl_clamp: float | None = None,  # new parameters go last: the positional order stays
        loss_scale: float = 1.0,
    ):
        super().__init__()
        from rlhf_fast._backend import check_backend
        from rlhf_fast.ppo_from_logits import _check_hyper

        # A bad setting fails here, where the config is written, not at the first step after a rollout.
        # loss_scale=None: only valid if every forward passes its own (as before these checks).
        _check_hyper(
            temperature, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_kind, kl_clamp, entropy_coef, agg, horizon,
            ignore_index, 1.0 if loss_scale is None else loss_scale,
        )
        check_backend("ppo_loss_from_logits", backend)
        self.kwargs = dict(
            inplace_backward=inplace_backward,
            clip_eps=clip_eps,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            kl_clamp=kl_clamp,
            loss_scale=loss_scale,
            entropy_coef=entropy_coef,
            agg=agg,
            horizon=horizon,
            temperature=temperature,
            ignore_index=ignore_index,
            backend=backend,
        )

    def forward(
        self,
        logits,
        labels,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs: torch.Tensor | None = None,
        *,
        loss_scale: float | None = None,
    ):
        from rlhf_fast.ppo_from_logits import ppo_loss_from_logits

        kwargs = self.kwargs if loss_scale is None else {**self.kwargs, "loss_scale": loss_scale}
        return ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DPOLoss(nn.Module):
    """DPO-family loss straight from the policy's logits (`rlhf_fast.dpo_loss_from_logits`).

    Hyper-parameters: beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average=False (sum of
    token log-probs per sequence; True: mean), temperature=1.0, ignore_index=-100,
    reference_free=False, gamma=0.5 (simpo margin), discopop_tau=0.05, backend=None.

    forward(logits [2B, T, V] (chosen rows first), labels [2B, T], mask [2B, T],
    ref_chosen_logps [B], ref_rejected_logps [B]) -> (loss 0-d fp32, stats dict).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        average: bool = False,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reference_free: bool = False,
        gamma: float = 0.5,
        discopop_tau: float = 0.05,
        backend: str | None = None,
    ):
        super().__init__()
        from rlhf_fast._backend import check_backend, check_float, check_int
        from rlhf_fast.dpo import _check_hyper

        # As PPOLoss: a bad setting fails at construction (in dpo_loss_from_logits' order).
        check_float("temperature", temperature, low=0.0, low_inclusive=False)
        check_int("ignore_index", ignore_index)
        _check_hyper(beta, loss_type, label_smoothing, gamma, discopop_tau)
        check_backend("dpo_loss_from_logits", backend)
        self.kwargs = dict(
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            average=average,
            temperature=temperature,
            ignore_index=ignore_index,
            reference_free=reference_free,
            gamma=gamma,
            discopop_tau=discopop_tau,
            backend=backend,
        )

    def forward(self, logits, labels, mask, ref_chosen_logps, ref_rejected_logps):
        from rlhf_fast.dpo import dpo_loss_from_logits

        return dpo_loss_from_logits(logits, labels, mask, ref_chosen_logps, ref_rejected_logps, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
