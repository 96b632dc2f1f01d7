"""Fused linear -> per-token log-probs (logits never materialised): not yet a kernel.

Until the fused kernel lands this op runs the reference (matmul, then log-softmax and gather),
which does materialise the [N, V] logits; `python -m rlhf_fast.info` reports it as "reference".
"""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast._backend import FLOAT_DTYPES, check_same_device, check_tensor, register_op, resolve

register_op("linear_logprobs")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (the LM's last hidden states).
        weight: [V, H] (the LM head), same dtype as hidden. bias: [V] or None.
        labels: [...] int64, aligned with hidden (no shift inside); ignore_index -> 0.
        temperature, ignore_index, return_entropy: as in `rlhf_fast.logprobs`.
    Returns: fp32 [...] log-probs (and entropy [...] when return_entropy).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden's leading shape {tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight rows {weight.shape[0]}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    resolve("linear_logprobs", backend, hidden.device)  # validates backend=; only "reference" exists
    return reference.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
