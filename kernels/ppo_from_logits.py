"""Fused PPO / GRPO actor loss straight from logits: Triton kernels + launchers.

Per token row n (x = z / tau in fp32 with tau the temperature, y the label, w_n the aggregation
weight of the token):
    lse   = logsumexp(x);  logp = x_y - lse;  H = -sum_j p_j log p_j
    r     = exp(logp - old)                          (log-ratio taken as 0 where w_n == 0)
    P     = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  dual clip c, A < 0: min(P, -c A)
    KL    = kl(logp, ref) (k1 | k2 | k3 | abs)       (only when a reference is given, kl_coef != 0)
    L     = P + kl_coef KL - entropy_coef H;         loss = sum_n w_n L_n
Every aggregation mode is linear in L (rlhf_fast.aggregation.aggregation_weights), so the kernel
knows dloss/dlogp_n and dloss/dH_n during the forward and writes the logits gradient then:
    grad_z_j = (a [j == y] - p_j (a - b (log p_j + H)))
    a = w_n (dP/dlogp + kl_coef dKL/dlogp) / tau,  b = w_n entropy_coef / tau.

Kernel plan: one program per token row (int64 offsets), two passes over the row:
  pass 1: online max / sum-exp / sum e (x - m) (entropy) over BLOCK_V chunks -> lse, H, logp,
          then the per-token scalars (ratio, clip branch, KL and their derivatives);
  pass 2: re-read the row and write its gradient in the logits' dtype.
Traffic: 2 reads + 1 write of the logits. The 1 read + 1 write floor (ANCHORS.md) needs the row
to stay on chip between the passes: a row of 128k bf16 (256 KB) does not fit one SM, and L2 does
not keep it between passes at full occupancy. On sm_90 the launcher therefore hands the row pass
to a CUDA kernel (csrc/cuda/ppo_from_logits_cuda.cu, op rlhf_fast::ppo_from_logits_rows) that
splits each row over a thread-block cluster holding it in shared memory and exchanges the partial
max / sums through distributed shared memory: 1 read + 1 write. This Triton kernel runs
everywhere else (pre-sm_90 GPUs, the interpreter, rows not 16-byte aligned, no compiled
extension) and when RLHF_FAST_PPO_CLUSTER=0; see `cluster_size`.
Rows with weight 0 (masked or ignore_index tokens) are not read in pass 2 (their gradient row is
written as zeros), and ignore_index rows are not read at all. When no gradient is wanted
(grad_out=None: no_grad, logits not requiring grad) pass 2 is compiled out: 1 read in all.
(In the kernels T is the sequence length: row n is token (n // T, n % T) of logits [B, T, V].)

The scalar reduction into the loss and the stats runs in a second, single-program kernel over the
per-token log-probs and entropies (deterministic: fixed order, no atomics), recomputing the cheap
per-token policy terms with the same @triton.jit helper as the main kernel.

`_scale_grad_kernel` folds the caller's grad_output g into the gradient in place during backward.
Every program first loads g from its pointer and returns at once when g == 1, so the common
`loss.backward()` moves no [N, V] bytes and never syncs with the host. (Eager only: under
torch.compile the autograd in rlhf_fast/ppo_from_logits.py multiplies instead, see `_backward`.)

The pass-1 loop and the safe lse / entropy finalisation are the shared helpers of `_rows` (also
used by the log-prob kernels), the per-token policy / KL math those of `_terms`. Block size and
warp count (`_rows.row_config`) depend only on V and the dtype (never on the number of rows), so a
token's results are bitwise the same whatever batch it is in.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import env_set, load_C, on_input_device

from ._rows import row_config, row_lse_entropy, row_offset, row_online_stats
from ._terms import KL_CODES, KL_NONE, clamp_kl, kl_term, ppo_clip_term

# Layout of the stats vector written by the stats kernel.
STAT_NAMES = ("policy_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_max", "kl", "dual_clipfrac")
N_STATS = len(STAT_NAMES)


@triton.jit
def _token_terms(
    logp,
    old,
    adv,
    ref,
    counted,
    eps_low,
    eps_high,
    dual_clip,
    kl_clamp,
    HAS_DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
):
    """Per-token policy and KL terms and their derivatives w.r.t. logp (scalars or blocks).

    Returns (P, dP/dlogp, ratio, clipped, dual_active, kl, dkl/dlogp); the math and its gradient
    conventions are the shared helpers of `_terms` (eps_low / eps_high are clip widths; with
    HAS_KL_CLAMP the KL is torch.clamp'ed to [-kl_clamp, kl_clamp], verl's low_var_kl clamp).
    Here only the masking: an uncounted token uses log-ratio 0 (exp() of a garbage old log-prob
    there must not give inf) and logp := ref (every KL estimator gives 0, never exp(huge)).
    """
    log_ratio = tl.where(counted, logp - old, 0.0)
    policy, d_policy, ratio, clipped, dual_active = ppo_clip_term(
        log_ratio, adv, eps_low, eps_high, dual_clip, HAS_DUAL
    )
    kl, d_kl = kl_term(tl.where(counted, logp - ref, 0.0), KL_KIND)
    if HAS_KL_CLAMP:
        kl, d_kl = clamp_kl(kl, d_kl, kl_clamp, KL_KIND)
    return policy, d_policy, ratio, clipped, dual_active, kl, d_kl


@triton.jit
def _ppo_from_logits_fwd_kernel(
    logits_ptr,
    logits_stride_b,
    logits_stride_t,
    grad_ptr,
    grad_stride_b,
    grad_stride_t,
    labels_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    weight_ptr,
    logp_ptr,
    entropy_ptr,
    T,
    V,
    inv_temperature,
    ignore_index,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    kl_clamp,
    entropy_coef,
    HAS_DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, T, logits_stride_b, logits_stride_t)
    out_ptr = grad_ptr + row_offset(row, T, grad_stride_b, grad_stride_t)
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    w = tl.load(weight_ptr + row).to(tl.float32)
    counted = w != 0.0

    # ---- pass 1: running max m, s = sum e, t_acc = sum e (x - m) with e = exp(x - m) ----------
    # (evict_last: pass 2 reads the row again.) ignore_index rows are not read (n_cols = 0).
    n_cols = tl.where(ignored, 0, V)
    m, s, t_acc = row_online_stats(row_ptr, n_cols, inv_temperature, True, BLOCK_V, "evict_last")
    # Safe where s == 0 (ignored, or a row of only -inf): lse = -inf, entropy 0 (the reference's).
    lse, ent = row_lse_entropy(m, s, t_acc)
    # Clamped gather: a bad label never reads out of bounds; it gives NaN (and NaN gradient).
    safe_label = tl.where(in_range, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32) * inv_temperature
    logp = tl.where(in_range, x_label - lse, float("nan"))
    logp = tl.where(ignored, 0.0, logp)
    ent = tl.where(ignored, 0.0, ent)
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, ent)

    if WRITE_GRAD:
        # ---- per-token scalars: dloss/dlogp and dloss/dH --------------------------------------
        old = tl.load(old_ptr + row).to(tl.float32)
        adv = tl.load(adv_ptr + row).to(tl.float32)
        if KL_KIND != 0:
            ref = tl.load(ref_ptr + row).to(tl.float32)
        else:
            ref = logp
        _, d_policy, _, _, _, _, d_kl = _token_terms(
            logp, old, adv, ref, counted, eps_low, eps_high, dual_clip, kl_clamp, HAS_DUAL, KL_KIND, HAS_KL_CLAMP
        )
        g_logp = d_policy + kl_coef * d_kl
        a = tl.where(counted, w * g_logp * inv_temperature, 0.0)
        bcoef = tl.where(counted, w * entropy_coef * inv_temperature, 0.0)
        lse_k = tl.where(counted, lse, 0.0)
        ent_k = tl.where(counted, ent, 0.0)

        # ---- pass 2: gradient row (rows with weight 0 are not read, their gradient is 0) -----
        n_read = tl.where(counted, V, 0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            x = tl.load(row_ptr + offs, mask=offs < n_read, other=-float("inf"), eviction_policy="evict_first")
            x = x.to(tl.float32) * inv_temperature
            # p = 0 where x = -inf: its term is 0, not 0 * (-inf) = NaN (log p is zeroed first,
            # so not even the discarded lanes compute 0 * inf).
            log_p = tl.where(x > -float("inf"), x - lse_k, 0.0)
            p = tl.exp(x - lse_k)
            soft = p * (a - bcoef * (log_p + ent_k))
            grad = tl.where(offs == label, a, 0.0) - soft
            tl.store(out_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _ppo_from_logits_stats_kernel(
    logp_ptr,
    entropy_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    weight_ptr,
    mask_ptr,
    loss_ptr,
    stats_ptr,
    N,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    kl_clamp,
    entropy_coef,
    HAS_DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    HAS_KL_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: loss = sum w L and the masked-mean stats, in a fixed order (deterministic)."""
    offs0 = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_policy = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_akl = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_rmax = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + offs0
        valid = offs < N
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
        ent = tl.load(entropy_ptr + offs, mask=valid, other=0.0)
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs, mask=valid, other=0.0)
        mk = tl.load(mask_ptr + offs, mask=valid, other=0.0)
        if KL_KIND != 0:
            ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            ref = logp
        counted = mk != 0.0
        policy, _, ratio, clipped, dual_active, kl, _ = _token_terms(
            logp, old, adv, ref, counted, eps_low, eps_high, dual_clip, kl_clamp, HAS_DUAL, KL_KIND, HAS_KL_CLAMP
        )
        total = policy + kl_coef * kl - entropy_coef * ent
        # where(): NaN / inf at an uncounted token never leaks into a sum.
        acc_loss += tl.where(w != 0.0, w * total, 0.0)
        acc_policy += tl.where(w != 0.0, w * policy, 0.0)
        acc_m += tl.where(counted, mk, 0.0)
        acc_ent += tl.where(counted, mk * ent, 0.0)
        acc_clip += tl.where(counted & clipped, mk, 0.0)
        acc_akl += tl.where(counted, mk * (old - logp), 0.0)
        acc_ratio += tl.where(counted, mk * ratio, 0.0)
        acc_kl += tl.where(counted, mk * kl, 0.0)
        acc_dual += tl.where(counted & dual_active, mk, 0.0)
        acc_rmax = tl.maximum(acc_rmax, tl.where(counted, ratio, -float("inf")))
    total_m = tl.sum(acc_m, axis=0)
    denom = tl.where(total_m > 0.0, total_m, 1.0)  # not max(., 1): a fractional mask may sum to < 1
    rmax = tl.max(acc_rmax, axis=0)  # skips NaN: a NaN ratio shows in the ratio sum instead
    ratio_sum = tl.sum(acc_ratio, axis=0)
    is_nan = ratio_sum != ratio_sum  # noqa: PLR0124 (the NaN test)
    rmax = tl.where(is_nan, float("nan"), tl.where(rmax == -float("inf"), 0.0, rmax))
    tl.store(loss_ptr, tl.sum(acc_loss, axis=0))
    tl.store(stats_ptr + 0, tl.sum(acc_policy, axis=0))
    tl.store(stats_ptr + 1, tl.sum(acc_ent, axis=0) / denom)
    tl.store(stats_ptr + 2, tl.sum(acc_clip, axis=0) / denom)
    tl.store(stats_ptr + 3, tl.sum(acc_akl, axis=0) / denom)
    tl.store(stats_ptr + 4, ratio_sum / denom)
    tl.store(stats_ptr + 5, rmax)
    tl.store(stats_ptr + 6, tl.sum(acc_kl, axis=0) / denom)
    tl.store(stats_ptr + 7, tl.sum(acc_dual, axis=0) / denom)


@triton.jit
def _scale_grad_kernel(grad_ptr, stride_b, stride_t, g_ptr, N, T, V, BLOCK_V: tl.constexpr):
    """grad[row, :] *= g in place for every row (grid-stride over the N rows: the grid is capped,
    so the common g == 1 costs a few programs' scalar load, not N programs); nothing when g == 1."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        cols = tl.arange(0, BLOCK_V)
        first = tl.program_id(0).to(tl.int64)  # int64 rows: row * stride may pass 2**31
        step = tl.num_programs(0)
        for k in range(tl.cdiv(N - tl.program_id(0), step)):  # the grid never exceeds N
            row_ptr = grad_ptr + row_offset(first + k * step, T, stride_b, stride_t)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                valid = offs < V
                x = tl.load(row_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                tl.store(row_ptr + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------------------------
# Launchers

CLUSTER_ENV = "RLHF_FAST_PPO_CLUSTER"
_CLUSTER_SIZES = (1, 2, 4, 8)
_MAX_SLICE_BYTES = 192 * 1024  # kMaxSliceBytes in csrc/cuda/ppo_from_logits_cuda.cu


@functools.cache
def _cluster_size_for(V: int, elem_size: int, device_index: int) -> int:
    C = load_C()
    query = getattr(C, "ppo_rows_cluster_size", None)  # None: no extension, or one built before it
    if query is None or not C.with_cuda() or not _rows_op_is_current():
        return 0
    return int(query(V, elem_size, device_index))


def _rows_op_is_current() -> bool:
    """The extension's rlhf_fast::ppo_from_logits_rows takes the arguments this launcher passes
    (an extension built from older sources, without kl_clamp, would fail at the call: the Triton
    rows run instead)."""
    op = getattr(torch.ops.rlhf_fast, "ppo_from_logits_rows", None)
    return op is not None and any(a.name == "kl_clamp" for a in op.default._schema.arguments)


def cluster_blocks_on_device(device_index: int | None = None, V: int = 128256, elem_size: int = 2) -> int:
    """Blocks per row the cluster kernel uses for rows of V elements of `elem_size` bytes on CUDA
    device `device_index` (default: the current one); 0 where it cannot run (no GPU, pre-sm_90, an
    extension without CUDA code). Initialises CUDA where a GPU exists."""
    if not torch.cuda.is_available():
        return 0
    index = torch.cuda.current_device() if device_index is None else device_index
    return _cluster_size_for(V, elem_size, index)


def cluster_mode(mode: str):
    """RLHF_FAST_PPO_CLUSTER=mode inside the block, restored after (benchmarks time the Triton rows
    beside the cluster kernel with mode "0")."""
    return env_set(CLUSTER_ENV, mode)


def _rows_aligned16(t: torch.Tensor) -> bool:
    e = t.element_size()
    return (
        t.data_ptr() % 16 == 0
        and (t.shape[-1] * e) % 16 == 0
        and (t.stride(0) * e) % 16 == 0
        and (t.stride(1) * e) % 16 == 0
    )


def cluster_size(logits: torch.Tensor, grad_out: torch.Tensor | None) -> int:
    """Blocks per row of the sm_90 cluster kernel for this call, or 0 for the Triton kernel.

    The cluster kernel runs when a gradient is written (without one the Triton kernel reads the
    row once: already the floor), the tensors are on a CUDA device of compute capability >= 9.0,
    rlhf_fast._C was built with compute_90+ code, and the rows of logits and grad_out are 16-byte
    aligned. The environment variable RLHF_FAST_PPO_CLUSTER picks: unset / "auto" (the kernel's
    own choice from V and the dtype), "0" (always Triton), or 1 / 2 / 4 / 8 (that many blocks per
    row where the kernel can run at all: for tuning).
    """
    mode = os.environ.get(CLUSTER_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0") and (not mode.isdigit() or int(mode) not in _CLUSTER_SIZES):
        raise ValueError(f"{CLUSTER_ENV}={mode!r}: expected auto, 0, 1, 2, 4 or 8")
    if mode == "0" or grad_out is None or logits.device.type != "cuda":
        return 0
    if not (_rows_aligned16(logits) and _rows_aligned16(grad_out)):
        return 0
    auto = _cluster_size_for(logits.shape[-1], logits.element_size(), logits.device.index or 0)
    if auto == 0 or mode == "auto":
        return auto
    # A forced size whose slices would not fit the kernel's shared memory falls back to auto.
    forced = int(mode)
    n_vec = logits.shape[-1] * logits.element_size() // 16
    return forced if -(-n_vec // forced) * 16 <= _MAX_SLICE_BYTES else auto


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(stride_b, stride_t) of a [B, T, V] tensor whose last stride is 1."""
    return t.stride(0), t.stride(1)


@on_input_device
def ppo_from_logits_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    stat_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    *,
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_kind: str,
    entropy_coef: float,
    ignore_index: int,
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused forward; writes the logits gradient into `grad_out`.

    logits [B, T, V] (fp32/bf16/fp16, last stride 1, any B/T strides); labels [B, T] int;
    old_logprobs, advantages, ref_logprobs (or None) [B, T] float; weights [B, T] fp32
    aggregation weights (0 = token does not count); stat_mask [B, T] fp32 (mask values of counted
    tokens, 0 elsewhere) for the masked-mean stats. grad_out [B, T, V] in the logits' dtype, last
    stride 1 (may be `logits` itself: each element is read before it is overwritten, by the same
    program), or None: no gradient, the second pass is skipped (1 read of the logits in all).
    kl_kind is a name or alias in KL_CODES (k1|k2|k3|abs|k1+|k3+|abs+ and aliases), used only
    when ref_logprobs is given and kl_coef != 0; kl_clamp (or None) clamps the per-token KL to
    [-kl_clamp, kl_clamp] (torch.clamp: gradient 0 outside, except for the straight-through
    kinds, whose k2 gradient is never clamped). eps_low / eps_high are clip widths (ratio bounds
    1 - eps_low, 1 + eps_high). Returns (loss 0-d fp32, logp [B, T] fp32, entropy [B, T] fp32,
    stats [N_STATS] fp32 in STAT_NAMES order).
    """
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    write_grad = grad_out is not None
    if logits.stride(-1) != 1 or (write_grad and grad_out.stride(-1) != 1):
        raise ValueError("ppo_from_logits_fwd: logits and grad_out need last stride 1")
    if not write_grad:
        grad_out = logits  # dummy pointer, never written
    labels_f = labels.reshape(N).contiguous()
    old_f = old_logprobs.reshape(N).contiguous()
    adv_f = advantages.reshape(N).contiguous()
    w_f = weights.to(torch.float32).reshape(N).contiguous()
    m_f = stat_mask.to(torch.float32).reshape(N).contiguous()
    use_kl = ref_logprobs is not None and kl_coef != 0.0
    kl_code = KL_CODES[kl_kind] if use_kl else KL_NONE
    ref_f = ref_logprobs.reshape(N).contiguous() if use_kl else old_f  # dummy pointer when unused
    has_dual = dual_clip is not None
    dual = float(dual_clip) if has_dual else 0.0
    has_kl_clamp = use_kl and kl_clamp is not None
    kl_clamp = float(kl_clamp) if has_kl_clamp else 0.0
    inv_t = 1.0 / float(temperature)
    eps_low, eps_high, kl_coef, entropy_coef = float(eps_low), float(eps_high), float(kl_coef), float(entropy_coef)

    logp = torch.empty(N, dtype=torch.float32, device=device)
    ent = torch.empty(N, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    stats = torch.empty(N_STATS, dtype=torch.float32, device=device)
    if N == 0:
        loss.zero_()
        stats.zero_()
        return loss, logp.view(B, T), ent.view(B, T), stats

    # The per-token terms' scalars and switches, the same for the row kernel and the stats kernel
    # (their signatures end alike): one tuple, so the two can never be passed different values.
    term_args = (eps_low, eps_high, dual, kl_coef, kl_clamp, entropy_coef)
    term_flags = {"HAS_DUAL": has_dual, "KL_KIND": kl_code, "HAS_KL_CLAMP": has_kl_clamp}
    cluster = cluster_size(logits, grad_out if write_grad else None)
    if cluster:
        torch.ops.rlhf_fast.ppo_from_logits_rows(
            logits,
            grad_out,
            labels_f.to(torch.int64),
            old_f.to(torch.float32),
            adv_f.to(torch.float32),
            ref_f.to(torch.float32) if use_kl else None,
            w_f,
            logp,
            ent,
            inv_t,
            int(ignore_index),
            eps_low,
            eps_high,
            dual if has_dual else None,
            kl_coef,
            kl_code,
            kl_clamp if has_kl_clamp else None,
            entropy_coef,
            cluster,
        )
    else:
        block_v, num_warps = row_config(V, logits.dtype)
        lb, lt = _row_strides(logits)
        gb, gt = _row_strides(grad_out)
        _ppo_from_logits_fwd_kernel[(N,)](
            logits,
            lb,
            lt,
            grad_out,
            gb,
            gt,
            labels_f,
            old_f,
            adv_f,
            ref_f,
            w_f,
            logp,
            ent,
            T,
            V,
            inv_t,
            int(ignore_index),
            *term_args,
            **term_flags,
            WRITE_GRAD=write_grad,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    _ppo_from_logits_stats_kernel[(1,)](
        logp,
        ent,
        old_f,
        adv_f,
        ref_f,
        w_f,
        m_f,
        loss,
        stats,
        N,
        *term_args,
        **term_flags,
        BLOCK=1024,
        num_warps=8,
    )
    return loss, logp.view(B, T), ent.view(B, T), stats


@on_input_device
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad [B, T, V] (last stride 1) *= grad_output (0-d tensor), in place, no host sync.

    When grad_output == 1 every program returns after one scalar load: no [N, V] traffic.
    """
    B, T, V = grad.shape
    N = B * T
    if N == 0 or V == 0:
        return
    if grad.stride(-1) != 1:
        raise ValueError("scale_grad_: grad needs last stride 1")
    g = grad_output.reshape(1).to(device=grad.device, dtype=torch.float32).contiguous()
    block_v, num_warps = row_config(V, grad.dtype)
    sb, st = _row_strides(grad)
    grid = (min(N, _scale_grid_cap(grad.device)),)
    _scale_grad_kernel[grid](grad, sb, st, g, N, T, V, BLOCK_V=block_v, num_warps=num_warps)


@functools.cache
def _scale_grid_cap(device: torch.device) -> int:
    """Programs for the in-place scale: 8 per SM on CUDA (enough to stream when g != 1); off CUDA
    (the interpreter) a small cap, so tests run the grid-stride loop."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
