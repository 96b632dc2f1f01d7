"""The README's quick-start snippet runs as written (on small inputs named as it names them)."""

import re
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under ## Quick start"
    return match.group(1)


@pytest.mark.skipif(not README.exists(), reason="tests/ copied without the README")
def test_quick_start_runs():
    g = torch.Generator().manual_seed(0)
    B2, T, V = 2, 5, 97  # logits [2B, T, V] serve both the PPO and the DPO lines
    env = {
        "logits": (torch.randn(B2, T, V, generator=g) * 2).to(DEVICE).requires_grad_(),
        "labels": torch.randint(0, V, (B2, T), generator=g).to(DEVICE),
        "old_logprobs": (-torch.rand(B2, T, generator=g) * 3).to(DEVICE),
        "ref_logprobs": (-torch.rand(B2, T, generator=g) * 3).to(DEVICE),
        "advantages": torch.randn(B2, T, generator=g).to(DEVICE),
        "mask": (torch.rand(B2, T, generator=g) > 0.2).to(DEVICE),
        "ref_chosen_logps": (-torch.rand(B2 // 2, generator=g) * 10).to(DEVICE),
        "ref_rejected_logps": (-torch.rand(B2 // 2, generator=g) * 10).to(DEVICE),
        "rewards": torch.randn(B2, T, generator=g).to(DEVICE),
        "values": torch.randn(B2, T, generator=g).to(DEVICE),
        "scores": torch.randn(16, generator=g).to(DEVICE),
    }
    exec(compile(_quick_start(), str(README), "exec"), env)  # noqa: S102 - our own README
    assert env["logits"].grad is not None and torch.isfinite(env["logits"].grad).all()
    assert env["old_logprobs_next"].shape == (B2, T)
    assert env["adv"].shape == (16,) and torch.isfinite(env["ret"]).all()
    assert torch.isfinite(env["loss"])
