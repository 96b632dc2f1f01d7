"""The cases of `python -m rlhf_fast.bench`: one `OpSpec` per op (inputs, how to call rlhf_fast and
its reference, the peers users run today, the bytes-moved model of DESIGN.md) and the list of
(op, shape, dtype, mode) cases for a GPU (ANCHORS.md sizes) or a CPU (small sizes).

Nothing here imports an rlhf_fast op module: the harness in `rlhf_fast.bench` looks each public
function up by name when it runs a case, so a missing op shows as "unavailable" in its row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Hyper-parameters used by every case (typical RLHF values; the same for every peer).
CLIP_EPS = 0.2
KL_COEF = 0.05
ENTROPY_COEF = 0.01
DPO_BETA = 0.1
GAE_GAMMA = 0.99
GAE_LAM = 0.95

Inputs = dict  # name -> Tensor (grad leaves are made by the harness)


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark and check one op.

    call(fn, inputs) -> tuple of output tensors, where fn is rlhf_fast.<api> or
    rlhf_fast.reference.<api> (the harness binds backend=); outputs are what the check compares.
    diff_outputs are the indices of the outputs that the backward starts from; grad_out_keys the
    input names of their upstream gradients (None: a 0-d loss, gradient 1).
    peers: name -> forward(inputs) -> outputs in the same convention (the code users write today).
    gpu_peers: name -> factory() -> forward; the factory imports the third-party package and
    raises ImportError when it is not installed. Only tried on CUDA.
    """

    key: str
    api: str  # public function name in rlhf_fast and rlhf_fast.reference
    registry: str  # name in rlhf_fast._backend.OPS (for the backend column)
    tags: tuple[str, ...]
    make_inputs: Callable[[tuple, torch.dtype, torch.device, torch.Generator], Inputs]
    call: Callable[[Callable, Inputs], tuple]
    grad_inputs: tuple[str, ...]
    diff_outputs: tuple[int, ...]
    grad_out_keys: tuple[str | None, ...]
    output_names: tuple[str, ...]
    bytes_moved: Callable[[tuple, torch.dtype, str], int]
    peers: dict[str, Callable[[Inputs], tuple]]
    gpu_peers: dict[str, Callable[[], Callable[[Inputs], tuple]]] = field(default_factory=dict)
    subset: Callable[[Inputs, int], tuple[Inputs, str]] | None = None
    compile_skip: str | None = None  # reason torch.compile of the eager peer is not run
    shape_label: Callable[[tuple], str] = lambda s: "x".join(str(d) for d in s)
    # Compute-bound ops: the floor is floor_work_repeats x the measured time of floor_work(inputs)
    # (e.g. the three matmuls of a fused linear op) instead of bytes / copy bandwidth.
    floor_work: Callable[[Inputs], object] | None = None
    floor_work_repeats: int = 3
    notes: str = ""


@dataclass(frozen=True)
class Case:
    op: str  # OpSpec key
    shape: tuple
    dtype: torch.dtype
    mode: str  # "fwd" | "fwd+bwd"
    sweep: str = ""  # "", "V" or "N": extra points for the plots

    @property
    def label(self) -> str:
        return f"{self.op} {self.mode} {'x'.join(map(str, self.shape))} {DTYPE_NAMES[self.dtype]}"


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# ----------------------------------------------------------------------------------------------
# Input helpers


def _normal(shape, dtype, device, gen, scale=1.0):
    # normal_ fills a low-precision tensor directly: no fp32 copy of a multi-GB logits tensor.
    t = torch.empty(shape, dtype=dtype, device=device)
    t.normal_(0.0, scale, generator=gen)
    return t


def _labels(shape, V, device, gen):
    return torch.randint(0, V, shape, device=device, generator=gen, dtype=torch.int64)


def _mask(shape, device, gen, keep=0.9):
    m = torch.rand(shape, device=device, generator=gen) < keep
    m[..., 0] = True  # every row counts at least one token
    return m


@torch.no_grad()
def _token_logprobs(logits, labels, rows_per_chunk=1024):
    """fp32 log p(label) per token, computed in row chunks (no full fp32 copy of the logits)."""
    flat = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], rows_per_chunk):
        x = flat[s : s + rows_per_chunk].float()
        out[s : s + rows_per_chunk] = x.gather(-1, lab[s : s + rows_per_chunk, None]).squeeze(-1) - torch.logsumexp(
            x, -1
        )
    return out.view(labels.shape)


def _rows_subset(max_elems, V, n_rows):
    """How many of n_rows rows of width V fit in max_elems elements (at least 1)."""
    return max(1, min(n_rows, max_elems // max(V, 1)))


# ----------------------------------------------------------------------------------------------
# Log-probs (and the entropy variant)


def _logprobs_inputs(shape, dtype, device, gen):
    N, V = shape
    return {
        "logits": _normal((N, V), dtype, device, gen, 2.0),
        "labels": _labels((N,), V, device, gen),
        "grad_logp": _normal((N,), torch.float32, device, gen),
        "grad_entropy": _normal((N,), torch.float32, device, gen),
    }


def _logprobs_call(fn, inp):
    return (fn(inp["logits"], inp["labels"]),)


def _logprobs_entropy_call(fn, inp):
    return tuple(fn(inp["logits"], inp["labels"], return_entropy=True))


def _eager_logprobs(inp):
    # What users write today (TRL/OpenRLHF `selective_log_softmax` without the loop).
    logp_all = torch.log_softmax(inp["logits"].float(), dim=-1)
    return (logp_all.gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1),)


def _eager_logprobs_entropy(inp):
    logp_all = torch.log_softmax(inp["logits"].float(), dim=-1)
    logp = logp_all.gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _gather_minus_lse(inp):
    # The form torch.compile fuses best (ANCHORS.md "gather - logsumexp").
    x = inp["logits"].float()
    return (x.gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1),)


def _liger_ce_logprobs():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss(reduction="none")

    def forward(inp):
        # Liger writes the gradient into the logits in the forward (its default): the values of
        # inp["logits"] change between repetitions, which does not change the work done.
        return (-ce(inp["logits"], inp["labels"]),)

    return forward


def _rlhf_inplace_logprobs():
    # rlhf_fast.logprobs with inplace_backward=True: the backward writes the gradient into the
    # logits' own storage (the issue's "no gradient buffer" target reads this column's memory).
    # Listed after every other peer: it overwrites inp["logits"] (the work done stays the same).
    import rlhf_fast

    def forward(inp):
        return (rlhf_fast.logprobs(inp["logits"], inp["labels"], inplace_backward=True),)

    return forward


def _logprobs_bytes(shape, dtype, mode, with_entropy=False):
    N, V = shape
    es = torch.tensor([], dtype=dtype).element_size()
    logits = N * V * es
    small = N * 8 + N * 4 * (2 if with_entropy else 1)  # labels read, outputs written
    if mode == "fwd":
        return logits + small
    # fwd: 1 read; bwd: 1 read + 1 write of logits; plus upstream grads and the saved per-row stats.
    return 3 * logits + 2 * small


def _logprobs_subset(inp, max_elems):
    N, V = inp["logits"].shape
    k = _rows_subset(max_elems, V, N)
    if k >= N:
        return inp, ""
    return {name: t[:k].contiguous() for name, t in inp.items()}, f"checked on the first {k} of {N} rows"


# ----------------------------------------------------------------------------------------------
# Fused linear + log-probs


def _linear_inputs(shape, dtype, device, gen):
    N, H, V = shape
    return {
        "hidden": _normal((N, H), dtype, device, gen, 1.0),
        "weight": _normal((V, H), dtype, device, gen, H**-0.5),
        "labels": _labels((N,), V, device, gen),
    }


def _linear_call(fn, inp):
    # The mean token NLL, as the fused linear cross-entropy peers compute it.
    return (-fn(inp["hidden"], inp["weight"], inp["labels"]).mean(),)


def _eager_linear(inp):
    logits = inp["hidden"] @ inp["weight"].t()
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1)
    return (-logp.mean(),)


def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda inp: (loss(inp["weight"], inp["hidden"], inp["labels"]),)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda inp: (linear_cross_entropy(inp["hidden"], inp["weight"], inp["labels"]),)


def _linear_bytes(shape, dtype, mode):
    N, H, V = shape
    es = torch.tensor([], dtype=dtype).element_size()
    return (N * H + V * H) * es * 3  # reported, but the floor of this compute-bound op is its matmuls (floor_work)


def _linear_subset(inp, max_elems):
    N = inp["hidden"].shape[0]
    V = inp["weight"].shape[0]
    k = _rows_subset(max_elems, V, N)
    if k >= N:
        return inp, ""
    sub = dict(inp)
    sub["hidden"] = inp["hidden"][:k].contiguous()
    sub["labels"] = inp["labels"][:k].contiguous()
    return sub, f"checked on the first {k} of {N} rows"


# ----------------------------------------------------------------------------------------------
# PPO loss straight from logits (k3 KL + entropy bonus, token-mean)


def _ppo_logits_inputs(shape, dtype, device, gen):
    B, T, V = shape
    logits = _normal((B, T, V), dtype, device, gen, 2.0)
    labels = _labels((B, T), V, device, gen)
    logp = _token_logprobs(logits, labels)
    return {
        "logits": logits,
        "labels": labels,
        # old / ref log-probs near the current ones, so ratios straddle the clip range
        "old_logprobs": logp + 0.2 * _normal((B, T), torch.float32, device, gen),
        "ref_logprobs": logp + 0.2 * _normal((B, T), torch.float32, device, gen),
        "advantages": _normal((B, T), torch.float32, device, gen),
        "mask": _mask((B, T), device, gen),
    }


def _ppo_logits_call(fn, inp):
    loss, _stats = fn(
        inp["logits"],
        inp["labels"],
        inp["old_logprobs"],
        inp["advantages"],
        inp["mask"],
        clip_eps=CLIP_EPS,
        ref_logprobs=inp["ref_logprobs"],
        kl_coef=KL_COEF,
        kl_kind="k3",
        entropy_coef=ENTROPY_COEF,
    )
    return (loss,)


def _eager_ppo_logits(inp):
    logp_all = torch.log_softmax(inp["logits"].float(), dim=-1)
    logp = logp_all.gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    adv, old, ref = inp["advantages"], inp["old_logprobs"], inp["ref_logprobs"]
    m = inp["mask"].float()
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    tok = pg + KL_COEF * kl - ENTROPY_COEF * ent
    return ((tok * m).sum() / m.sum().clamp_min(1),)


def _liger_grpo():
    # Liger's GRPO loss from logits: its own conventions (logits [B, T + 1, V], one advantage per
    # sequence, no entropy bonus), so it does slightly less work than the case; kept as the
    # nearest fused peer.
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    padded = {}

    def forward(inp):
        B, T, V = inp["logits"].shape
        key = id(inp["logits"])
        if key not in padded:
            extra = torch.zeros(B, T + 1, V, dtype=inp["logits"].dtype, device=inp["logits"].device)
            extra[:, :T] = inp["logits"].detach()
            extra.requires_grad_(inp["logits"].requires_grad)
            padded.clear()
            padded[key] = extra
        out = triton_grpo_loss(
            padded[key],
            inp["old_logprobs"],
            inp["ref_logprobs"],
            inp["labels"],
            inp["advantages"][:, 0].contiguous(),
            inp["mask"].int(),
            temperature=1.0,
            beta=KL_COEF,
            eps_low=CLIP_EPS,
            eps_high=CLIP_EPS,
        )
        per_token = out[0] if isinstance(out, (tuple, list)) else out
        if per_token.dim() == 0:
            return (per_token,)
        m = inp["mask"].float()
        return ((per_token * m).sum() / m.sum().clamp_min(1),)

    # the gradient goes to Liger's own padded copy of the logits, not to inp["logits"]
    forward.grad_leaves = lambda inp: [padded[id(inp["logits"])]]
    return forward


def _rlhf_triton_rows():
    # rlhf_fast with the row pass forced onto the Triton kernel (RLHF_FAST_PPO_CLUSTER=0: 2 reads
    # + 1 write of the logits) next to the default (the sm_90 cluster kernel: 1 read + 1 write):
    # what the cluster kernel buys, measured in the same run. Not run where the cluster kernel
    # does not run (rlhf_fast is then this Triton kernel already).
    import rlhf_fast
    from rlhf_fast.kernels.ppo_from_logits import cluster_blocks_on_device, cluster_mode

    if cluster_blocks_on_device() == 0:
        raise RuntimeError("no sm_90 cluster kernel here: rlhf_fast runs the Triton rows already")
    if os.environ.get("RLHF_FAST_PPO_CLUSTER", "").strip() == "0":
        raise RuntimeError("RLHF_FAST_PPO_CLUSTER=0: the rlhf_fast column is the Triton rows already")

    def forward(inp):
        with cluster_mode("0"):
            return _ppo_logits_call(rlhf_fast.ppo_loss_from_logits, inp)

    return forward


def _ppo_logits_bytes(shape, dtype, mode):
    B, T, V = shape
    es = torch.tensor([], dtype=dtype).element_size()
    # gradient written in the forward: 1 read + 1 write of logits; [B, T] inputs read once
    return 2 * B * T * V * es + B * T * (8 + 4 + 4 + 4 + 1)


def _bt_subset(inp, max_elems):
    B, T, V = inp["logits"].shape
    if B * T * V <= max_elems:
        return inp, ""
    t = _rows_subset(max_elems, V, T)
    sub = {name: x[:1, :t].contiguous() for name, x in inp.items()}
    return sub, f"checked on sequence 0, first {t} of {T} tokens"


# ----------------------------------------------------------------------------------------------
# DPO loss straight from logits (sigmoid loss, summed log-probs)


def _dpo_logits_inputs(shape, dtype, device, gen):
    B2, T, V = shape
    if B2 % 2:
        raise ValueError(f"dpo_from_logits needs an even first dim (2B), got {shape}")
    logits = _normal((B2, T, V), dtype, device, gen, 2.0)
    labels = _labels((B2, T), V, device, gen)
    mask = torch.ones(B2, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False  # the prompt does not count
    seq = (_token_logprobs(logits, labels) * mask).sum(-1)
    B = B2 // 2
    noise = 5.0 * _normal((B2,), torch.float32, device, gen)
    return {
        "logits": logits,
        "labels": labels,
        "mask": mask,
        "ref_chosen_logps": (seq[:B] + noise[:B]).contiguous(),
        "ref_rejected_logps": (seq[B:] + noise[B:]).contiguous(),
    }


def _dpo_logits_call(fn, inp):
    loss, _stats = fn(
        inp["logits"],
        inp["labels"],
        inp["mask"],
        inp["ref_chosen_logps"],
        inp["ref_rejected_logps"],
        beta=DPO_BETA,
    )
    return (loss,)


def _eager_dpo_logits(inp):
    logp = torch.log_softmax(inp["logits"].float(), dim=-1).gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1)
    seq = (logp * inp["mask"]).sum(-1)
    B = seq.shape[0] // 2
    d = (seq[:B] - seq[B:]) - (inp["ref_chosen_logps"] - inp["ref_rejected_logps"])
    return (-F.logsigmoid(DPO_BETA * d).mean(),)


def _dpo_logits_bytes(shape, dtype, mode):
    B2, T, V = shape
    es = torch.tensor([], dtype=dtype).element_size()
    # _dpo_logits_inputs masks the prompt (the first T // 4 tokens), whose rows the kernels never
    # read: fwd 1 read and bwd 1 read of the counted rows, 1 write of the whole gradient (zeros in
    # the prompt rows). Counting every row put the floor 20 % too high (1.17 "of the floor").
    counted = T - T // 4
    return (2 * counted + T) * B2 * V * es + B2 * T * (8 + 1)


def _dpo_logits_subset(inp, max_elems):
    B2, T, V = inp["logits"].shape
    B = B2 // 2
    if B2 * T * V <= max_elems:
        return inp, ""
    t = _rows_subset(max_elems // 2, V, T)
    # the last t tokens: the first T // 4 are the (masked-out) prompt
    pick = torch.tensor([0, B], device=inp["logits"].device)
    sub = {name: inp[name].index_select(0, pick)[:, T - t :].contiguous() for name in ("logits", "labels", "mask")}
    sub["ref_chosen_logps"] = inp["ref_chosen_logps"][:1].contiguous()
    sub["ref_rejected_logps"] = inp["ref_rejected_logps"][:1].contiguous()
    return sub, f"checked on pair 0, last {t} of {T} tokens"


def _leading_rows_subset(inp, max_elems):
    """Every input sliced to its first k rows ([B, T] tensors: k sequences; [B]: k entries)."""
    first = next(iter(inp.values()))
    per_row = max(1, first[0].numel()) if first.dim() > 0 else 1
    if first.numel() <= max_elems:
        return inp, ""
    k = max(1, max_elems // per_row)
    return {name: t[:k].contiguous() for name, t in inp.items()}, f"checked on the first {k} of {first.shape[0]} rows"


# ----------------------------------------------------------------------------------------------
# Per-token PPO clipped loss on log-probs


def _ppo_policy_inputs(shape, dtype, device, gen):
    B, T = shape
    logp = -2.0 + _normal((B, T), torch.float32, device, gen).abs().neg()
    return {
        "logprobs": logp,
        "old_logprobs": logp + 0.2 * _normal((B, T), torch.float32, device, gen),
        "advantages": _normal((B, T), torch.float32, device, gen),
        "mask": _mask((B, T), device, gen).float(),
    }


def _ppo_policy_call(fn, inp):
    loss, _stats = fn(inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"], clip_eps=CLIP_EPS)
    return (loss,)


def _eager_ppo_policy(inp):
    # verl compute_policy_loss (clip + the clipfrac / approx_kl stats users log every step)
    logp, old, adv, m = inp["logprobs"], inp["old_logprobs"], inp["advantages"], inp["mask"]
    n = m.sum().clamp_min(1)
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS)
    loss = (torch.maximum(pg1, pg2) * m).sum() / n
    clipfrac = ((pg2 > pg1).float() * m).sum() / n
    approx_kl = ((old - logp).detach() * m).sum() / n
    return loss, clipfrac.detach(), approx_kl


def _rlhf_launch(schedule):
    # rlhf_fast's per-token PPO forward launched another way (RLHF_FAST_PPO_LAUNCH, kernels/ppo.py)
    # next to the default (split: two launches, one after the other): "fused" (one cooperative
    # launch) and "pdl" (two launches, the second with programmatic dependent launch, sm_90+),
    # measured in the same run. Not run where that schedule would not run as such.
    def factory():
        import rlhf_fast
        from rlhf_fast.kernels.ppo import launch_mode, launch_schedule

        with launch_mode(schedule):
            if launch_schedule(torch.device("cuda", torch.cuda.current_device())) != schedule:
                raise RuntimeError(
                    f"the {schedule} launch does not run here (pdl needs sm_90+; fused a cooperative launch)"
                )

        def forward(inp):
            with launch_mode(schedule):
                return _ppo_policy_call(rlhf_fast.ppo_policy_loss, inp)

        return forward

    return factory


def _ppo_policy_bytes(shape, dtype, mode):
    B, T = shape
    return 5 * 4 * B * T  # read logp, old, adv, mask (fp32); write the gradient


# ----------------------------------------------------------------------------------------------
# KL penalty k3


def _kl_inputs(shape, dtype, device, gen):
    B, T = shape
    logp = -2.0 + _normal((B, T), torch.float32, device, gen).abs().neg()
    return {
        "logprobs": logp,
        "ref_logprobs": logp + 0.3 * _normal((B, T), torch.float32, device, gen),
        "grad_kl": _normal((B, T), torch.float32, device, gen),
    }


def _kl_call(fn, inp):
    return (fn(inp["logprobs"], inp["ref_logprobs"], "k3"),)


def _eager_kl(inp):
    d = inp["ref_logprobs"] - inp["logprobs"]
    return (torch.exp(d) - d - 1,)


def _kl_bytes(shape, dtype, mode):
    B, T = shape
    return 7 * 4 * B * T  # fwd: read 2, write 1; bwd: read grad + 2, write 1


# ----------------------------------------------------------------------------------------------
# DPO pair loss on sequence log-probs


def _dpo_pair_inputs(shape, dtype, device, gen):
    (B,) = shape
    base = -200.0 + 20.0 * _normal((4, B), torch.float32, device, gen)
    return {
        "policy_chosen_logps": base[0].contiguous(),
        "policy_rejected_logps": base[1].contiguous(),
        "ref_chosen_logps": (base[0] + 5.0 * _normal((B,), torch.float32, device, gen)).contiguous(),
        "ref_rejected_logps": (base[1] + 5.0 * _normal((B,), torch.float32, device, gen)).contiguous(),
        "grad_losses": _normal((B,), torch.float32, device, gen),
    }


def _dpo_pair_call(fn, inp):
    return tuple(
        fn(
            inp["policy_chosen_logps"],
            inp["policy_rejected_logps"],
            inp["ref_chosen_logps"],
            inp["ref_rejected_logps"],
            beta=DPO_BETA,
        )
    )


def _eager_dpo_pair(inp):
    pc, pr = inp["policy_chosen_logps"], inp["policy_rejected_logps"]
    rc, rr = inp["ref_chosen_logps"], inp["ref_rejected_logps"]
    d = (pc - pr) - (rc - rr)
    return -F.logsigmoid(DPO_BETA * d), (DPO_BETA * (pc - rc)).detach(), (DPO_BETA * (pr - rr)).detach()


def _dpo_pair_bytes(shape, dtype, mode):
    (B,) = shape
    return 4 * B * (4 + 3 + 1 + 4 + 2)  # fwd: read 4, write 3; bwd: read grad + 4, write 2


# ----------------------------------------------------------------------------------------------
# GAE


def _gae_inputs(shape, dtype, device, gen):
    B, T = shape
    return {
        "rewards": 0.1 * _normal((B, T), torch.float32, device, gen),
        "values": _normal((B, T), torch.float32, device, gen),
        "mask": _mask((B, T), device, gen),
    }


def _gae_call(fn, inp):
    return tuple(fn(inp["rewards"], inp["values"], inp["mask"], gamma=GAE_GAMMA, lam=GAE_LAM))


def _eager_gae(inp):
    # The reverse Python loop of the common RL libraries (verl's multi-turn masked form).
    rewards, values = inp["rewards"], inp["values"]
    m = inp["mask"].float()
    B, T = rewards.shape
    nextvalues = torch.zeros(B, device=rewards.device)
    lastgaelam = torch.zeros(B, device=rewards.device)
    reversed_adv = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + GAE_GAMMA * nextvalues - values[:, t]
        lastgaelam_ = delta + GAE_GAMMA * GAE_LAM * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        reversed_adv.append(lastgaelam)
    adv = torch.stack(reversed_adv[::-1], dim=1)
    return adv, adv + values


def _gae_bytes(shape, dtype, mode):
    B, T = shape
    return B * T * (4 + 4 + 1 + 4 + 4)  # read rewards, values, bool mask; write advantages, returns


# ----------------------------------------------------------------------------------------------
# The specs

SPECS: dict[str, OpSpec] = {}


def _add(spec: OpSpec) -> None:
    SPECS[spec.key] = spec


_add(
    OpSpec(
        key="logprobs",
        api="logprobs",
        registry="logprobs",
        tags=("logprobs",),
        make_inputs=_logprobs_inputs,
        call=_logprobs_call,
        grad_inputs=("logits",),
        diff_outputs=(0,),
        grad_out_keys=("grad_logp",),
        output_names=("logp",),
        bytes_moved=lambda s, d, m: _logprobs_bytes(s, d, m),
        peers={"eager": _eager_logprobs, "compile": _gather_minus_lse},
        gpu_peers={"liger": _liger_ce_logprobs, "inplace": _rlhf_inplace_logprobs},
        subset=_logprobs_subset,
        notes="eager: log_softmax(x.float()).gather; compile: torch.compile(gather - logsumexp); "
        "liger: LigerCrossEntropyLoss(reduction='none'), negated (with a per-token upstream gradient "
        "Liger 0.8.5 builds an fp32 [N, V] buffer in its backward: more time and memory than in "
        "the project's anchor runs, which back-propagated a sum); rlhf_fast inplace_backward: the gradient "
        "written into the logits' storage",
    )
)
_add(
    OpSpec(
        key="logprobs+entropy",
        api="logprobs",
        registry="logprobs",
        tags=("logprobs", "entropy"),
        make_inputs=_logprobs_inputs,
        call=_logprobs_entropy_call,
        grad_inputs=("logits",),
        diff_outputs=(0, 1),
        grad_out_keys=("grad_logp", "grad_entropy"),
        output_names=("logp", "entropy"),
        bytes_moved=lambda s, d, m: _logprobs_bytes(s, d, m, with_entropy=True),
        peers={"eager": _eager_logprobs_entropy, "compile": _eager_logprobs_entropy},
        subset=_logprobs_subset,
    )
)
_add(
    OpSpec(
        key="linear_logprobs",
        api="linear_logprobs",
        registry="linear_logprobs",
        tags=("linear_logprobs", "linear"),
        make_inputs=_linear_inputs,
        call=_linear_call,
        grad_inputs=("hidden", "weight"),
        diff_outputs=(0,),
        grad_out_keys=(None,),
        output_names=("mean_nll",),
        bytes_moved=_linear_bytes,
        peers={"eager": _eager_linear, "compile": _eager_linear},
        gpu_peers={"liger": _liger_flce, "cce": _cce},
        subset=_linear_subset,
        shape_label=lambda s: f"{s[0]}x{s[1]} @ {s[2]}x{s[1]}",
        floor_work=lambda inp: inp["hidden"] @ inp["weight"].t(),
        notes="floor = 3 x the time of one hidden @ weight.T matmul, measured in the same run",
    )
)
_add(
    OpSpec(
        key="ppo_from_logits",
        api="ppo_loss_from_logits",
        registry="ppo_loss_from_logits",
        tags=("ppo_from_logits", "ppo"),
        make_inputs=_ppo_logits_inputs,
        call=_ppo_logits_call,
        grad_inputs=("logits",),
        diff_outputs=(0,),
        grad_out_keys=(None,),
        output_names=("loss",),
        bytes_moved=_ppo_logits_bytes,
        peers={"eager": _eager_ppo_logits, "compile": _eager_ppo_logits},
        gpu_peers={"triton-rows": _rlhf_triton_rows, "liger": _liger_grpo},
        subset=_bt_subset,
        notes="k3 KL (coef 0.05) + entropy bonus (0.01), token-mean; triton-rows: rlhf_fast with "
        "RLHF_FAST_PPO_CLUSTER=0 (the Triton row kernel instead of the sm_90 cluster kernel); "
        "liger: triton_grpo_loss (per-sequence advantage, no entropy term)",
    )
)
_add(
    OpSpec(
        key="dpo_from_logits",
        api="dpo_loss_from_logits",
        registry="dpo_loss_from_logits",
        tags=("dpo_from_logits", "dpo"),
        make_inputs=_dpo_logits_inputs,
        call=_dpo_logits_call,
        grad_inputs=("logits",),
        diff_outputs=(0,),
        grad_out_keys=(None,),
        output_names=("loss",),
        bytes_moved=_dpo_logits_bytes,
        peers={"eager": _eager_dpo_logits, "compile": _eager_dpo_logits},
        subset=_dpo_logits_subset,
        notes="sigmoid loss, summed log-probs, logits [2B, T, V]",
    )
)
_add(
    OpSpec(
        key="ppo_policy_loss",
        api="ppo_policy_loss",
        registry="ppo_policy_loss",
        tags=("ppo_policy_loss", "ppo"),
        make_inputs=_ppo_policy_inputs,
        call=_ppo_policy_call,
        grad_inputs=("logprobs",),
        diff_outputs=(0,),
        grad_out_keys=(None,),
        output_names=("loss",),
        bytes_moved=_ppo_policy_bytes,
        peers={"eager": _eager_ppo_policy, "compile": _eager_ppo_policy},
        gpu_peers={"fused": _rlhf_launch("fused"), "pdl": _rlhf_launch("pdl")},
        subset=_leading_rows_subset,
        notes="rlhf_fast: the default split launches (mask pass, then loss pass); fused / pdl: "
        "RLHF_FAST_PPO_LAUNCH=fused (one cooperative launch) / =pdl (the loss pass with programmatic "
        "dependent launch)",
    )
)
_add(
    OpSpec(
        key="kl_penalty",
        api="kl_penalty",
        registry="kl_penalty",
        tags=("kl_penalty", "kl"),
        make_inputs=_kl_inputs,
        call=_kl_call,
        grad_inputs=("logprobs",),
        diff_outputs=(0,),
        grad_out_keys=("grad_kl",),
        output_names=("kl",),
        bytes_moved=_kl_bytes,
        peers={"eager": _eager_kl, "compile": _eager_kl},
        subset=_leading_rows_subset,
    )
)
_add(
    OpSpec(
        key="dpo_loss",
        api="dpo_loss",
        registry="dpo_loss",
        tags=("dpo_loss", "dpo"),
        make_inputs=_dpo_pair_inputs,
        call=_dpo_pair_call,
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        diff_outputs=(0,),
        grad_out_keys=("grad_losses",),
        output_names=("losses", "chosen_rewards", "rejected_rewards"),
        bytes_moved=_dpo_pair_bytes,
        peers={"eager": _eager_dpo_pair, "compile": _eager_dpo_pair},
        subset=_leading_rows_subset,
    )
)
_add(
    OpSpec(
        key="gae",
        api="gae",
        registry="gae",
        tags=("gae",),
        make_inputs=_gae_inputs,
        call=_gae_call,
        grad_inputs=(),
        diff_outputs=(),
        grad_out_keys=(),
        output_names=("advantages", "returns"),
        bytes_moved=_gae_bytes,
        peers={"eager": _eager_gae, "compile": _eager_gae},
        subset=_leading_rows_subset,
        compile_skip="torch.compile unrolls the T-step Python loop (minutes to compile: 230 s at T=1024 on H100)",
        notes="eager: the reverse Python loop over T (verl multi-turn masking)",
    )
)

# Names accepted by --ops: every spec key and every tag.
OP_NAMES = sorted({spec.key for spec in SPECS.values()} | {t for spec in SPECS.values() for t in spec.tags})


# ----------------------------------------------------------------------------------------------
# Case lists


def gpu_cases(logits_dtype: torch.dtype, quick: bool) -> list[Case]:
    """ANCHORS.md sizes (H100-class GPU), plus N and V sweeps of the log-prob forward for the plots."""
    d = logits_dtype
    f32 = torch.float32
    cases = []
    for shape in ((16384, 32000), (16384, 128256), (8192, 151936)):
        for mode in ("fwd", "fwd+bwd"):
            cases.append(Case("logprobs", shape, d, mode))
            cases.append(Case("logprobs+entropy", shape, d, mode))
    cases += [
        Case("ppo_from_logits", (8, 2048, 128256), d, "fwd+bwd"),
        Case("dpo_from_logits", (16, 2048, 128256), d, "fwd+bwd"),
        Case("linear_logprobs", (8192, 4096, 151936), d, "fwd+bwd"),
        Case("ppo_policy_loss", (1024, 8192), f32, "fwd+bwd"),
        Case("kl_penalty", (1024, 8192), f32, "fwd+bwd"),
        Case("dpo_loss", (4096,), f32, "fwd+bwd"),
        Case("gae", (256, 1024), f32, "fwd"),
        Case("gae", (1024, 4096), f32, "fwd"),
    ]
    if not quick:
        cases += [Case("logprobs", (n, 128256), d, "fwd", sweep="N") for n in (1024, 2048, 4096, 8192)]
        cases += [Case("logprobs", (16384, v), d, "fwd", sweep="V") for v in (8192, 65536)]
    return cases


def cpu_cases(logits_dtype: torch.dtype, quick: bool) -> list[Case]:
    """Small sizes: the quick run ends in well under a minute on 2 cores, the full one in minutes."""
    d = logits_dtype
    f32 = torch.float32
    if quick:
        return [
            Case("logprobs", (256, 4096), d, "fwd"),
            Case("logprobs", (256, 4096), d, "fwd+bwd"),
            Case("logprobs+entropy", (256, 4096), d, "fwd+bwd"),
            Case("ppo_from_logits", (2, 64, 4096), d, "fwd+bwd"),
            Case("dpo_from_logits", (4, 64, 4096), d, "fwd+bwd"),
            Case("linear_logprobs", (256, 256, 4096), d, "fwd+bwd"),
            Case("ppo_policy_loss", (256, 1024), f32, "fwd+bwd"),
            Case("kl_penalty", (256, 1024), f32, "fwd+bwd"),
            Case("dpo_loss", (4096,), f32, "fwd+bwd"),
            Case("gae", (256, 1024), f32, "fwd"),
        ]
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        cases.append(Case("logprobs", (256, 4096), d, mode))
        cases.append(Case("logprobs+entropy", (256, 4096), d, mode))
    cases += [
        Case("ppo_from_logits", (2, 64, 4096), d, "fwd+bwd"),
        Case("dpo_from_logits", (4, 64, 4096), d, "fwd+bwd"),
        Case("linear_logprobs", (256, 256, 4096), d, "fwd+bwd"),
        Case("ppo_policy_loss", (256, 1024), f32, "fwd+bwd"),
        Case("kl_penalty", (256, 1024), f32, "fwd+bwd"),
        Case("dpo_loss", (4096,), f32, "fwd+bwd"),
        Case("gae", (64, 256), f32, "fwd"),
        Case("gae", (256, 1024), f32, "fwd"),
    ]
    cases += [Case("logprobs", (n, 4096), d, "fwd", sweep="N") for n in (64, 1024)]
    cases += [Case("logprobs", (256, v), d, "fwd", sweep="V") for v in (1024, 16384)]
    return cases


def select(cases: list[Case], ops: list[str] | None) -> list[Case]:
    """Keep the cases whose op key or one of its tags is in `ops` (None keeps all)."""
    if not ops:
        return list(cases)
    wanted = set(ops)
    return [c for c in cases if c.op in wanted or wanted & set(SPECS[c.op].tags)]
