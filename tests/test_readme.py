"""The README's quick-start block runs as written (it defines its own stand-in inputs)."""

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
    """The block defines its own stand-in inputs; torch.device(DEVICE) puts them on the GPU there."""
    env = {}
    with torch.device(DEVICE):
        exec(compile(_quick_start(), str(README), "exec"), env)  # noqa: S102 - our own README
    B, T = env["B"], env["T"]
    assert env["logits"].grad is not None and torch.isfinite(env["logits"].grad).all()
    assert env["old_logprobs_next"].shape == (B, T)
    assert env["adv"].shape == (16,) and torch.isfinite(env["ret"]).all()
    assert torch.isfinite(env["loss"])
