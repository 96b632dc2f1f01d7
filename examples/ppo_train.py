"""GRPO-style PPO on a tiny causal LM with rlhf_fast: sample, score, update, on CPU in seconds.

Each step: draw a few random prompts, sample G completions per prompt from the policy
(torch.multinomial over the model's next-token distribution), score every completion with a
programmatic reward (the fraction of its tokens that are multiples of 4: about 0.25 for the
random-init model, 1.0 at best), turn the scores into group-relative advantages with
`rlhf_fast.group_advantages`, and take a few PPO epochs on the batch with
`rlhf_fast.ppo_loss_from_logits` (clipped ratio against the sampling policy's log-probs, a k3 KL
penalty to the frozen initial model, a small entropy bonus). The mean reward of the samples rises
from ~0.25 to ~0.95 within 25 steps.

The model is a 2-layer Llama built from a `transformers` config with random weights (no download,
no tokenizer: token ids are synthetic).

The swap: the usual loss code

    # before:
    #   logp_all = torch.log_softmax(logits.float(), -1)                   # fp32 [B, T, V] copy
    #   logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    #   entropy = -(logp_all.exp() * logp_all).sum(-1)                      # another [B, T, V]
    #   ratio = torch.exp(logp - old_logprobs)
    #   pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    #   kl = torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1     # k3
    #   per_token = pg + kl_coef * kl - entropy_coef * entropy
    #   loss = (per_token * mask).sum() / mask.sum()
    # after:
    #   loss, stats = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logprobs, adv, mask,
    #       clip_eps=0.2, ref_logprobs=ref_logprobs, kl_coef=0.01, entropy_coef=0.001)

Agreement check (--check-reference, on by default). Two whole runs with different backends
would NOT be a robust comparison here: the completions are sampled from the policy, so a
rounding difference of 1e-7 in one update can flip a later multinomial draw, and from then on the
two runs train on different data. So the check is made inside one run, on the same batch: at
every update the loss is computed by the backend under test (which drives training) and again by
`backend="reference"` (rlhf_fast's pure-PyTorch ground truth) on the same logits; both the loss
and the gradient with respect to the logits (max |difference| relative to max |gradient|) must
agree to tolerance at every update. The two printed loss curves therefore pair up exactly, step
for step, however long the run.

Backend: "auto" by default (CUDA tensors -> Triton kernels; CPU tensors -> the reference path).
On CPU with TRITON_INTERPRET=1 set in the environment (how CI runs the kernels without a GPU),
"auto" becomes "triton" so that the kernel path really runs, under Triton's interpreter.

    pip install --no-build-isolation .[examples]   # transformers
    python examples/ppo_train.py               # CPU, ~10 s
    TRITON_INTERPRET=1 python examples/ppo_train.py --steps 2 --prompts 2 --group-size 4 --no-check-learning  # kernels
    python examples/ppo_train.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import rlhf_fast

VOCAB = 128
PROMPT_LEN = 3


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


def reward_fn(completions: torch.Tensor) -> torch.Tensor:
    """[B, C] token ids -> [B] fp32: fraction of tokens that are multiples of 4 (chance: 0.25)."""
    return (completions % 4 == 0).float().mean(-1)


@torch.no_grad()
def sample(policy, prompts: torch.Tensor, group_size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """G completions per prompt, groups = G consecutive rows: [P, L] -> [P*G, L + length]."""
    ids = prompts.repeat_interleave(group_size, 0)
    for _ in range(length):
        next_logits = policy(ids, use_cache=False).logits[:, -1].float()
        next_token = torch.multinomial(torch.softmax(next_logits, -1), 1, generator=gen)
        ids = torch.cat([ids, next_token], 1)
    return ids


def pick_backend(requested: str, device: str) -> str:
    """The backend to train with: as requested, but "auto" becomes "triton" on CPU under
    TRITON_INTERPRET=1, so that the kernels (interpreted) really run instead of the reference."""
    if requested == "auto" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return requested


def completion_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits that predict the completion tokens: [B, C, V] (position t predicts token t+1)."""
    return model(ids, use_cache=False).logits[:, PROMPT_LEN - 1 : -1]


def train(args, backend: str, log) -> dict:
    """One GRPO run; returns per-step mean rewards and per-update losses (and, with
    --check-reference, the reference losses and the loss / gradient differences)."""
    device = args.device
    policy = build_model(args.seed, device)
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    prompt_gen = torch.Generator().manual_seed(args.seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    G = args.group_size

    rewards, losses, ref_losses, loss_diffs, grad_diffs, clipfracs, kls = [], [], [], [], [], [], []
    for step in range(args.steps):
        # 1. rollout: sample, score, group-relative advantages
        prompts = torch.randint(0, VOCAB, (args.prompts, PROMPT_LEN), generator=prompt_gen).to(device)
        policy.eval()
        ids = sample(policy, prompts, G, args.length, sample_gen)
        labels = ids[:, PROMPT_LEN:]  # [B, C] the sampled completion tokens
        mask = torch.ones_like(labels, dtype=torch.bool)  # fixed length here; padding would be 0
        scores = reward_fn(labels)
        advantages = rlhf_fast.group_advantages(scores, G)  # [B], (r - group mean) / group std
        advantages = advantages[:, None].expand_as(labels)  # outcome reward: same for every token
        with torch.no_grad():
            old_logprobs = rlhf_fast.logprobs(completion_logits(policy, ids), labels, backend=backend)
            ref_logprobs = rlhf_fast.logprobs(completion_logits(reference_model, ids), labels, backend=backend)
        rewards.append(scores.mean().item())

        # 2. a few PPO epochs on this batch (epoch 0 is on-policy; later ones exercise the clip)
        policy.train()
        for _epoch in range(args.epochs):
            logits = completion_logits(policy, ids)
            if args.check_reference:
                logits.retain_grad()

            # The one line that replaces the hand-written PPO/GRPO loss (see the module docstring):
            loss, stats = rlhf_fast.ppo_loss_from_logits(
                logits, labels, old_logprobs, advantages, mask,
                clip_eps=args.clip_eps, ref_logprobs=ref_logprobs, kl_coef=args.kl_coef, kl_kind="k3",
                entropy_coef=args.entropy_coef, backend=backend,
            )  # fmt: skip

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            losses.append(loss.item())
            clipfracs.append(stats["clipfrac"].item())
            kls.append(stats["kl"].item())
            if args.check_reference:
                # Same logits, same targets, the pure-PyTorch path: loss and d loss / d logits.
                same_logits = logits.detach().requires_grad_()
                ref_loss, _ = rlhf_fast.ppo_loss_from_logits(
                    same_logits, labels, old_logprobs, advantages, mask,
                    clip_eps=args.clip_eps, ref_logprobs=ref_logprobs, kl_coef=args.kl_coef, kl_kind="k3",
                    entropy_coef=args.entropy_coef, backend="reference",
                )  # fmt: skip
                (ref_grad,) = torch.autograd.grad(ref_loss, same_logits)
                ref_losses.append(ref_loss.item())
                loss_diffs.append(abs(losses[-1] - ref_losses[-1]))
                # relative to the largest gradient entry: per-token gradients scale with 1 / #tokens
                grad_diffs.append(
                    ((logits.grad.float() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30)).item()
                )
            optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log(
                f"  step {step:4d}  reward {rewards[-1]:.3f}  loss {losses[-1]:+.5f}  "
                f"kl {kls[-1]:.4f}  clipfrac {clipfracs[-1]:.3f}  entropy {stats['entropy'].item():.3f}"
            )
    return {
        "rewards": rewards,
        "losses": losses,
        "reference_losses": ref_losses,
        "loss_diffs": loss_diffs,
        "grad_diffs": grad_diffs,
        "clipfracs": clipfracs,
        "kls": kls,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="rollout + update rounds")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--length", type=int, default=8, help="completion length in tokens")
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--entropy-coef", type=float, default=0.001)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument(
        "--check-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="at every update also compute the loss and its logits gradient with backend='reference' "
        "on the same batch and compare (default on)",
    )
    p.add_argument(
        "--rtol", type=float, default=1e-4, help="tolerance relative to |loss| (loss) and to max |grad| (gradient)"
    )
    p.add_argument("--atol", type=float, default=1e-5, help="loss tolerance, absolute")
    p.add_argument("--min-gain", type=float, default=0.25, help="required rise of the mean reward")
    p.add_argument(
        "--check-learning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail when training did not learn (default on; off for a few-step smoke run of the kernels)",
    )
    p.add_argument("--log-every", type=int, default=5)
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
    log(
        f"GRPO: {args.steps} steps x {args.prompts} prompts x {args.group_size} samples x {args.length} tokens, "
        f"{args.epochs} PPO epochs, device={args.device}, backend={backend!r}"
    )
    run = train(args, backend, log)
    rewards = run["rewards"]
    # Mean reward over the first and the last fifth of the run (single batches are noisy).
    k = max(1, len(rewards) // 5)
    start, end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    results = dict(run, backend=backend, steps=args.steps, reward_start=start, reward_end=end)
    results["learned"] = bool(end >= start + args.min_gain)
    ok = results["learned"] or not args.check_learning
    if args.check_reference:
        results["max_abs_diff"] = max(run["loss_diffs"])
        results["max_grad_rel_diff"] = max(run["grad_diffs"])
        results["agree"] = bool(
            all(d <= args.atol + args.rtol * abs(r) for d, r in zip(run["loss_diffs"], run["reference_losses"]))
            and results["max_grad_rel_diff"] <= args.rtol
        )
        ok = ok and results["agree"]
    results["ok"] = bool(ok)
    results["seconds"] = time.perf_counter() - t0

    if not args.quiet:
        if args.check_reference:
            print("\nloss curve (first PPO epoch of every --log-every steps), same batch through both paths:")
            print("  step   " + backend.ljust(11) + "reference    |diff|")
            for i in range(0, args.steps, args.log_every):
                j = i * args.epochs
                print(
                    f"  {i:4d}   {run['losses'][j]:+.7f} {run['reference_losses'][j]:+.7f}   {run['loss_diffs'][j]:.1e}"
                )
        print("\nsummary")
        print(f"  mean reward (first / last {k} steps)   {start:.3f} -> {end:.3f}  (need +{args.min_gain})")
        print(f"  learned                              {results['learned']}")
        if args.check_reference:
            print(
                f"  {backend} vs reference, {len(run['losses'])} updates: max |loss diff| {results['max_abs_diff']:.2e}, "
                f"max |grad diff| / max |grad| {results['max_grad_rel_diff']:.2e} (tol: loss {args.atol:g} + "
                f"{args.rtol:g}*|loss|, grad {args.rtol:g}) -> "
                f"{'agree' if results['agree'] else 'DISAGREE'}"
            )
        if args.check_reference and args.device == "cpu" and backend in ("auto", "reference"):
            print(
                "  note: on CPU tensors 'auto' runs the reference path for this op, so the comparison is trivial;\n"
                "        TRITON_INTERPRET=1 (kernels interpreted on CPU) or --device cuda compares the Triton kernels"
            )
        print(f"  time                                 {results['seconds']:.1f} s")
        print("OK" if ok else "FAILED")
    return results


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
