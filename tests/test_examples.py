"""The examples (examples/dpo_train.py, examples/ppo_train.py) run, learn, and agree with the
reference path.

Each example is imported from its file and driven through `main(argv) -> dict`, with few steps,
on the kernel path ("triton" interpreted on CPU, where conftest sets TRITON_INTERPRET=1; "auto" on
a GPU) with the example's own check against backend="reference" (DPO: the whole loss curve of a
second run with the same seed; GRPO: loss and logits gradient of every update recomputed on the
same batch) to 1e-4 relative.
  * DPO learns in 10 steps, so one kernel-path run checks both the learning signal (held-out
    reward accuracy 0 -> >= 0.9) and the agreement.
  * GRPO needs ~25 rollouts of 32 samples to learn, too slow for the Triton interpreter: its
    learning run uses backend="reference" on CPU (what "auto" picks for CPU tensors; "auto", the
    kernels, on a GPU), and a separate 2-step kernel-path run checks the agreement.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import DEVICE, HAS_CUDA, INTERPRETED

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"rlhf_fast_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dpo_example():
    return _load("dpo_train")


@pytest.fixture(scope="module")
def ppo_example():
    return _load("ppo_train")


# GRPO's learning run: the kernels on a GPU; on CPU the reference (the interpreter is too slow).
LEARN_BACKEND = "auto" if HAS_CUDA else "reference"
# The kernel path: "auto" on a GPU (the compiled kernels); on CPU the examples turn "auto" into
# "triton" under TRITON_INTERPRET=1, which conftest sets there.
KERNEL_BACKEND = "triton" if (DEVICE == "cpu" and INTERPRETED) else "auto"


def test_dpo_learns_and_matches_reference(dpo_example):
    # The kernel path learns within 10 steps (fresh pairs each step) and its whole loss curve
    # matches a second run with backend="reference", same seed and data.
    r = dpo_example.main(f"--steps 10 --batch 8 --device {DEVICE} --quiet".split())
    assert r["backend"] == KERNEL_BACKEND
    assert r["losses"][0] == pytest.approx(0.6931472, abs=1e-6)  # log 2: policy == reference at step 0
    assert r["eval_before"]["reward_accuracy"] == 0.0  # ... so every held-out reward ties at 0
    assert r["eval_after"]["reward_accuracy"] >= 0.9, r["eval_after"]
    assert r["eval_after"]["policy_prefers_chosen"] >= r["eval_before"]["policy_prefers_chosen"] + 0.2
    assert r["losses"][-1] < r["losses"][0] - 0.05, r["losses"]
    assert len(r["losses"]) == len(r["reference_losses"]) == 10
    assert r["agree"], (r["losses"], r["reference_losses"])
    assert r["max_rel_diff"] <= 1e-4
    assert r["learned"] and r["ok"]


def test_ppo_learns(ppo_example):
    r = ppo_example.main(f"--steps 25 --device {DEVICE} --backend {LEARN_BACKEND} --no-check-reference --quiet".split())
    assert 0.15 <= r["reward_start"] <= 0.35  # chance level: a quarter of the tokens are multiples of 4
    assert r["reward_end"] >= r["reward_start"] + 0.25, (r["reward_start"], r["reward_end"])
    assert r["learned"] and r["ok"]


def test_ppo_kernel_matches_reference(ppo_example):
    r = ppo_example.main(f"--steps 2 --prompts 2 --group-size 4 --length 6 --device {DEVICE} --quiet".split())
    assert r["backend"] == KERNEL_BACKEND
    assert len(r["losses"]) == len(r["reference_losses"]) == 2 * 2  # steps x PPO epochs
    assert r["agree"], (r["losses"], r["reference_losses"], r["grad_diffs"])
    assert r["max_grad_rel_diff"] <= 1e-4
