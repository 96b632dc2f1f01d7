"""DPO on a tiny causal LM with rlhf_fast: a real training loop that runs on CPU in seconds.

The task: each example is a prompt of random tokens; the *chosen* completion counts upward from
the prompt's last token (next = previous + 1 mod V), the *rejected* one is random tokens. A
policy that learns the counting rule puts more probability on chosen than on rejected
completions, so DPO's implicit reward accuracy rises from 0 (policy == reference, all rewards
tie) to ~1 on fresh, held-out pairs.

The model is a 2-layer Llama built from a `transformers` config with random weights (no download,
no tokenizer: token ids are synthetic). The frozen reference is a copy of the initial policy.

The swap: the usual (TRL-style) loss code

    # before:
    #   logp = torch.log_softmax(logits.float(), -1)      # an fp32 [2B, T, V] copy of the logits
    #   logp = logp.gather(-1, labels[..., None]).squeeze(-1)
    #   seq = (logp * mask).sum(-1)
    #   pi_c, pi_r = seq[:B], seq[B:]
    #   x = beta * ((pi_c - pi_r) - (ref_c - ref_r))
    #   loss = -F.logsigmoid(x).mean()
    #   chosen_rewards = beta * (pi_c - ref_c).detach(); rejected_rewards = beta * (pi_r - ref_r).detach()
    #   reward_accuracy = (chosen_rewards > rejected_rewards).float().mean()
    # after:
    #   loss, stats = rlhf_fast.dpo_loss_from_logits(logits, labels, mask, ref_c, ref_r, beta=0.1)

Agreement check (--check-reference, on by default): the whole training run is repeated with the
same seed and `backend="reference"` (rlhf_fast's pure-PyTorch ground truth). The data does not
depend on the model, so the two runs see the same batches and differ only by floating-point
rounding inside the loss; their loss curves must agree to --rtol.

Backend: "auto" by default (CUDA tensors -> Triton kernels; CPU tensors -> the reference path).
On CPU with TRITON_INTERPRET=1 set in the environment (how CI runs the kernels without a GPU),
"auto" becomes "triton" so that the kernel path really runs, under Triton's interpreter.

    pip install --no-build-isolation .[examples]   # transformers
    python examples/dpo_train.py               # CPU, ~15 s (both runs)
    TRITON_INTERPRET=1 python examples/dpo_train.py --steps 3 --batch 4 --no-check-learning   # kernels, interpreted
    python examples/dpo_train.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import rlhf_fast

# Sizes: small enough that the Triton interpreter (CI on CPU) runs a step in about a second.
VOCAB = 128
PROMPT_LEN = 3
COMPLETION_LEN = 6


def build_model(seed: int, device: str) -> torch.nn.Module:
    """A 2-layer Llama (~0.1 M parameters) with random weights from a fixed seed: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",  # deterministic on CUDA too (fused SDPA backward may not be)
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def make_pairs(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [2B, L], labels [2B, L-1], mask [2B, L-1]): B chosen rows, then B rejected rows.

    chosen completion: prompt[-1] + 1, + 2, ... (mod VOCAB); rejected: uniform random tokens.
    labels are the inputs shifted by one (position t predicts token t+1); mask = 1 on the
    completion tokens only (the prompt is not scored).
    """
    prompt = torch.randint(0, VOCAB, (batch, PROMPT_LEN), generator=gen)
    steps = torch.arange(1, COMPLETION_LEN + 1)
    chosen = (prompt[:, -1:] + steps) % VOCAB
    rejected = torch.randint(0, VOCAB, (batch, COMPLETION_LEN), generator=gen)
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0)
    labels = input_ids[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, PROMPT_LEN - 1 :] = True
    return input_ids, labels, mask


def pick_backend(requested: str, device: str) -> str:
    """The backend to train with: as requested, but "auto" becomes "triton" on CPU under
    TRITON_INTERPRET=1, so that the kernels (interpreted) really run instead of the reference."""
    if requested == "auto" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return requested


@torch.no_grad()
def evaluate(policy, reference_model, batch) -> dict:
    """Held-out pairs: DPO's reward accuracy (policy vs reference log-ratio) and how often the
    policy alone gives the chosen completion the higher log-prob. Measured with the reference
    path whatever backend trains, so the yardstick is the same for every run."""
    input_ids, labels, mask = batch
    B = input_ids.shape[0] // 2
    logp = rlhf_fast.sequence_logprobs(policy(input_ids).logits[:, :-1], labels, mask, backend="reference")
    ref = rlhf_fast.sequence_logprobs(reference_model(input_ids).logits[:, :-1], labels, mask, backend="reference")
    reward = logp - ref
    return {
        "reward_accuracy": (reward[:B] > reward[B:]).float().mean().item(),
        "policy_prefers_chosen": (logp[:B] > logp[B:]).float().mean().item(),
    }


def train(args, backend: str, log) -> dict:
    """One DPO run; returns per-step losses / accuracies / margins and held-out metrics."""
    device = args.device
    policy = build_model(args.seed, device)
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_batch = [t.to(device) for t in make_pairs(torch.Generator().manual_seed(args.seed + 2), 64)]

    before = evaluate(policy, reference_model, eval_batch)
    losses, accuracies, margins = [], [], []
    for step in range(args.steps):
        input_ids, labels, mask = (t.to(device) for t in make_pairs(data_gen, args.batch))
        B = input_ids.shape[0] // 2
        with torch.no_grad():
            ref_logits = reference_model(input_ids).logits[:, :-1]
            ref_logps = rlhf_fast.sequence_logprobs(ref_logits, labels, mask, backend=backend)
        logits = policy(input_ids).logits[:, :-1]  # [2B, T, V], aligned with labels

        # The one line that replaces the hand-written DPO loss (see the module docstring):
        loss, stats = rlhf_fast.dpo_loss_from_logits(
            logits, labels, mask, ref_logps[:B], ref_logps[B:], beta=args.beta, backend=backend
        )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(stats["reward_accuracy"].item())
        margins.append(stats["reward_margin"].item())
        if step % args.log_every == 0 or step == args.steps - 1:
            log(
                f"  step {step:4d}  loss {losses[-1]:.4f}  reward_acc {accuracies[-1]:.2f}  "
                f"margin {margins[-1]:+.4f}  logp chosen {stats['policy_chosen_logps'].mean().item():8.2f}  "
                f"rejected {stats['policy_rejected_logps'].mean().item():8.2f}"
            )
    after = evaluate(policy, reference_model, eval_batch)
    return {"losses": losses, "accuracies": accuracies, "margins": margins, "eval_before": before, "eval_after": after}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument(
        "--check-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="repeat the run with backend='reference' and compare the loss curves (default on)",
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="loss-curve tolerance, relative to |loss|")
    p.add_argument("--atol", type=float, default=1e-5, help="loss-curve tolerance, absolute")
    p.add_argument("--min-accuracy", type=float, default=0.9, help="held-out reward accuracy to reach")
    p.add_argument(
        "--check-learning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail when training did not learn (default on; off for a few-step smoke run of the kernels)",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: the model is tiny, threading only adds overhead)"
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the example; returns a dict of results (`ok` is True when every check passed)."""
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else print
    backend = pick_backend(args.backend, args.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, log, backend)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, log, backend: str) -> dict:
    t0 = time.perf_counter()
    log(f"DPO: {args.steps} steps, {args.batch} pairs/step, device={args.device}, backend={backend!r}")
    run = train(args, backend, log)
    results = {
        "backend": backend,
        "steps": args.steps,
        "losses": run["losses"],
        "accuracies": run["accuracies"],
        "margins": run["margins"],
        "eval_before": run["eval_before"],
        "eval_after": run["eval_after"],
    }
    acc_before = run["eval_before"]["reward_accuracy"]
    acc_after = run["eval_after"]["reward_accuracy"]
    # Learned: held-out reward accuracy reaches the bar, the last margins are positive, and the
    # policy alone now prefers the chosen continuation far more often than at the start.
    tail = max(1, len(run["margins"]) // 5)
    results["learned"] = bool(
        acc_after >= args.min_accuracy
        and sum(run["margins"][-tail:]) > 0
        and run["eval_after"]["policy_prefers_chosen"] >= run["eval_before"]["policy_prefers_chosen"] + 0.2
    )
    ok = results["learned"] or not args.check_learning

    if args.check_reference:
        log("reference run (backend='reference'), same seed and data:")
        ref_run = train(args, "reference", log)
        diffs = [abs(a - b) for a, b in zip(run["losses"], ref_run["losses"])]
        rel = [d / max(abs(b), 1e-12) for d, b in zip(diffs, ref_run["losses"])]
        results["reference_losses"] = ref_run["losses"]
        results["max_abs_diff"] = max(diffs)
        results["max_rel_diff"] = max(rel)
        results["agree"] = all(d <= args.atol + args.rtol * abs(b) for d, b in zip(diffs, ref_run["losses"]))
        ok = ok and results["agree"]
    results["ok"] = bool(ok)
    results["seconds"] = time.perf_counter() - t0

    if not args.quiet:
        print("\nloss curve (every --log-every steps):")
        header = "  step   " + backend.ljust(10) + ("reference  |diff|" if args.check_reference else "")
        print(header)
        for i in range(0, args.steps, args.log_every):
            line = f"  {i:4d}   {run['losses'][i]:.6f}"
            if args.check_reference:
                line += f"   {results['reference_losses'][i]:.6f}   {diffs[i]:.2e}"
            print(line)
        print("\nsummary")
        print(f"  held-out reward accuracy       {acc_before:.2f} -> {acc_after:.2f}  (bar {args.min_accuracy})")
        print(
            f"  policy prefers chosen          {run['eval_before']['policy_prefers_chosen']:.2f} -> "
            f"{run['eval_after']['policy_prefers_chosen']:.2f}"
        )
        print(f"  loss                           {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}")
        print(f"  learned                        {results['learned']}")
        if args.check_reference:
            print(
                f"  {backend} vs reference loss curve: max |diff| {results['max_abs_diff']:.2e}, "
                f"max rel {results['max_rel_diff']:.2e} (tol {args.atol:g} + {args.rtol:g}*|loss|) -> "
                f"{'agree' if results['agree'] else 'DISAGREE'}"
            )
        if args.check_reference and args.device == "cpu" and backend in ("auto", "reference"):
            print(
                "  note: on CPU tensors 'auto' runs the reference path for this op, so the comparison is trivial;\n"
                "        TRITON_INTERPRET=1 (kernels interpreted on CPU) or --device cuda compares the Triton kernels"
            )
        print(f"  time                           {results['seconds']:.1f} s")
        print("OK" if ok else "FAILED")
    return results


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
