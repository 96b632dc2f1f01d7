"""The sm_90 cluster kernel behind ppo_loss_from_logits (csrc/cuda/ppo_from_logits_cuda.cu).

On an H100 / H200 with a CUDA build of rlhf_fast._C the launcher hands the row pass to the CUDA
kernel (1 read + 1 write of the logits) instead of the Triton kernel (2 reads + 1 write). These
tests hold it to the reference composition and to the Triton kernel on the same inputs
(RLHF_FAST_PPO_CLUSTER=0 forces Triton), for every option, dtype, cluster size, masking case and
inplace_backward. They need such a GPU; the selection logic is tested everywhere.
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from rlhf_fast.kernels import ppo_from_logits as pfl_kernels
from test_ppo_from_logits import OPTIONS, check_all, expected_from_pieces

from rlhf_fast import reference
from rlhf_fast._backend import load_C
from rlhf_fast.ppo_from_logits import ppo_loss_from_logits

ENV = pfl_kernels.CLUSTER_ENV


def cluster_available() -> bool:
    return HAS_CUDA and pfl_kernels.cluster_blocks_on_device() > 0


@pytest.fixture
def cluster_kernel():
    """Skips unless the cluster kernel can run (asked at test time, never at collection: asking
    initialises CUDA)."""
    if not cluster_available():
        pytest.skip("needs an sm_90 GPU and a CUDA build of rlhf_fast._C")


needs_cluster = pytest.mark.usefixtures("cluster_kernel")


def make_inputs(B, T, V, dtype, *, seed=0, device="cuda", temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 2.0).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[0, 1] = 0
    mask[-1, T // 2 :] = 0
    labels[0, 2 % T] = -100
    logp = reference.logprobs(logits.float(), labels, temperature=temperature)
    old = logp + 0.5 * torch.randn(B, T, generator=gen)
    ref = logp + 0.5 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    old[:, 0] = logp[:, 0] - 1.0  # dual-clipped with A < 0
    adv[:, 0] = -adv[:, 0].abs() - 0.1
    return [t.to(device) for t in (logits, labels, old, adv, mask, ref)]


def run(logits, labels, old, adv, mask, *, inplace=False, grad_scale=1.0, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton", inplace_backward=inplace, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad


def force_cluster(monkeypatch, cluster: str, logits):
    """RLHF_FAST_PPO_CLUSTER=cluster for this test, and check that this size is the one that runs."""
    monkeypatch.setenv(ENV, cluster)
    assert pfl_kernels.cluster_size(logits, logits) == int(cluster)


def check_kl_entropy_run(logits, labels, old, adv, mask, ref):
    """The kernel with a k3 KL and an entropy bonus against the reference, bf16 tolerances."""
    kw = {"ref_logprobs": ref, "kl_coef": 0.1, "entropy_coef": 0.01}
    check_all(run(logits, labels, old, adv, mask, **kw), reference_run(logits, labels, old, adv, mask, **kw),
              torch.bfloat16)


def reference_run(logits, labels, old, adv, mask, *, grad_scale=1.0, **kw):
    xr = logits.detach().float().clone().requires_grad_(True)
    loss_r, stats_r = expected_from_pieces(xr, labels, old, adv, mask, **kw)
    (loss_r * grad_scale).backward()
    return loss_r.detach(), stats_r, xr.grad


# ----------------------------------------------------------------------------------------------
# Selection (runs everywhere)


def test_cluster_size_is_zero_off_gpu_and_validates_the_env(monkeypatch):
    x = torch.zeros(1, 2, 128256, dtype=torch.bfloat16)
    assert pfl_kernels.cluster_size(x, x) == 0  # CPU tensors: the Triton kernel
    monkeypatch.setenv(ENV, "0")
    assert pfl_kernels.cluster_size(x, x) == 0
    for bad in ("3", "16", "yes"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            pfl_kernels.cluster_size(x, x)


def test_cluster_mode_sets_and_restores_the_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pfl_kernels.cluster_mode("0"):
        assert pfl_kernels.os.environ[ENV] == "0"
    assert ENV not in pfl_kernels.os.environ
    monkeypatch.setenv(ENV, "4")
    with pytest.raises(KeyError), pfl_kernels.cluster_mode("0"):
        raise KeyError  # restored on the way out of an exception too
    assert pfl_kernels.os.environ[ENV] == "4"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU answer")
def test_no_cluster_kernel_without_a_gpu():
    assert pfl_kernels.cluster_blocks_on_device() == 0


def test_no_gradient_never_uses_the_cluster_kernel():
    # Without a gradient the Triton kernel reads each row once: already the floor.
    x = torch.zeros(1, 2, 128256, dtype=torch.bfloat16, device=DEVICE)
    assert pfl_kernels.cluster_size(x, None) == 0


def test_extension_exposes_the_op_and_the_size_query():
    C = load_C()
    if C is None:
        pytest.skip("rlhf_fast._C is not built")
    assert hasattr(torch.ops.rlhf_fast, "ppo_from_logits_rows")
    # The built op takes what the launcher passes (a stale build would make dispatch skip it).
    assert pfl_kernels._rows_op_is_current(), "rlhf_fast._C is older than csrc/ops.cpp: rebuild it"
    if not C.with_cuda():
        assert C.ppo_rows_cluster_size(128256, 2, 0) == 0


# ----------------------------------------------------------------------------------------------
# GPU: the kernel against the reference and the Triton kernel


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize(
    "V,dtype,expect_cluster",
    [
        (2048, torch.float32, 1),
        (32000, torch.bfloat16, 2),
        (32000, torch.float32, 4),
        (128256, torch.bfloat16, 8),
        (151936, torch.float16, 8),
        (256000, torch.bfloat16, 8),
        (128256, torch.float32, 8),
    ],
)
def test_matches_reference_and_triton(V, dtype, expect_cluster, monkeypatch):
    kw = OPTIONS["everything"]
    inputs = make_inputs(2, 5, V, dtype, temperature=kw["temperature"])
    logits, labels, old, adv, mask, ref = inputs
    assert pfl_kernels.cluster_size(logits, logits) == expect_cluster
    got = run(logits, labels, old, adv, mask, ref_logprobs=ref, grad_scale=0.7, **kw)
    want = reference_run(logits, labels, old, adv, mask, ref_logprobs=ref, grad_scale=0.7, **kw)
    check_all(got, want, grad_dtype=dtype)
    monkeypatch.setenv(ENV, "0")
    triton_got = run(logits, labels, old, adv, mask, ref_logprobs=ref, grad_scale=0.7, **kw)
    check_all(got, triton_got, grad_dtype=dtype)


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_option(name, dtype):
    kw = dict(OPTIONS[name])
    logits, labels, old, adv, mask, ref = make_inputs(3, 4, 32000, dtype, temperature=kw.get("temperature", 1.0))
    if "kl_kind" in kw:
        kw["ref_logprobs"] = ref
    check_all(run(logits, labels, old, adv, mask, **kw), reference_run(logits, labels, old, adv, mask, **kw), dtype)


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize("cluster", ["1", "2", "4", "8"])
def test_forced_cluster_sizes(cluster, monkeypatch):
    logits, labels, old, adv, mask, ref = make_inputs(2, 3, 16000, torch.bfloat16)
    force_cluster(monkeypatch, cluster, logits)
    check_kl_entropy_run(logits, labels, old, adv, mask, ref)


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize(
    "V,cluster",
    [
        (8008, "8"),  # 1001 vectors: 7 slices of 126, the last of 119
        (8008, "4"),
        (1000, "2"),  # 125 vectors: 63 + 62
        (40, "8"),  # 5 vectors over 8 blocks: blocks 5..7 hold nothing and still take part
    ],
)
def test_ragged_and_empty_slices(V, cluster, monkeypatch):
    logits, labels, old, adv, mask, ref = make_inputs(2, 3, V, torch.bfloat16)
    labels[1, 0] = V - 1  # the label in the last, shorter slice
    force_cluster(monkeypatch, cluster, logits)
    check_kl_entropy_run(logits, labels, old, adv, mask, ref)


@pytest.mark.gpu
@needs_cluster
def test_forced_cluster_too_small_for_the_row_falls_back_to_auto(monkeypatch):
    x = torch.empty(1, 2, 128256, device="cuda", dtype=torch.bfloat16)  # 1 block: a 250 KB slice
    monkeypatch.setenv(ENV, "1")
    assert pfl_kernels.cluster_size(x, x) == 8


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_and_grad_output(dtype):
    logits, labels, old, adv, mask, ref = make_inputs(2, 4, 128256, dtype)
    kw = {"ref_logprobs": ref, "kl_coef": 0.2, "entropy_coef": 0.03}
    a = run(logits, labels, old, adv, mask, grad_scale=-2.5, **kw)
    b = run(logits, labels, old, adv, mask, grad_scale=-2.5, inplace=True, **kw)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)  # same kernel, same bits
    check_all(b, reference_run(logits, labels, old, adv, mask, grad_scale=-2.5, **kw), dtype)


@pytest.mark.gpu
@needs_cluster
def test_masking_neg_inf_and_bad_labels():
    V = 32000
    logits, labels, old, adv, mask, _ref = make_inputs(2, 4, V, torch.bfloat16)
    logits[0, 3, ::3] = -float("inf")  # a counted row with -inf entries
    labels[0, 3] = 3 * (int(labels[0, 3]) // 3) + 1  # whose label's logit stays finite
    logits[1, 0, 100:] = -float("inf")
    labels[1, 0] = 5
    mask[1, 1] = 0  # weight-0 row: read for its log-prob, gradient zeros
    got = run(logits, labels, old, adv, mask, entropy_coef=0.05)
    want = reference_run(logits, labels, old, adv, mask, entropy_coef=0.05)
    check_all(got, want, torch.bfloat16)
    assert torch.all(got[2][1, 1] == 0) and torch.all(got[2][0, 2] == 0)  # masked row, ignore_index row
    assert got[1]["logprobs"][0, 2] == 0  # ignore_index

@pytest.mark.gpu
@needs_cluster
def test_bad_label_matches_the_triton_rows(monkeypatch):
    V = 32000
    logits, labels, old, adv, mask, _ref = make_inputs(2, 4, V, torch.bfloat16)
    labels[0, 0] = V + 7
    loss, stats, grad = run(logits, labels, old, adv, mask)
    assert torch.isnan(stats["logprobs"][0, 0])
    assert torch.isnan(grad[0, 0]).all()  # the whole row, as the Triton kernel gives
    assert not torch.isnan(grad[0, 3]).any()  # other rows untouched
    monkeypatch.setenv(ENV, "0")
    loss_t, _stats_t, grad_t = run(logits, labels, old, adv, mask)
    torch.testing.assert_close(loss, loss_t, equal_nan=True)  # the shared stats kernel decides
    assert torch.isnan(grad_t[0, 0]).all()


@pytest.mark.gpu
@needs_cluster
@pytest.mark.parametrize("cluster", ["1", "8"])
def test_nan_logits_give_nan_rows_for_every_cluster_size(cluster, monkeypatch):
    # A NaN in one slice (or a whole slice of NaN) must not be merged away across the cluster:
    # the row's log-prob, entropy and gradient are NaN, the other rows untouched.
    V = 16000
    logits, labels, old, adv, mask, _ref = make_inputs(2, 4, V, torch.bfloat16)
    logits[0, 3, V - 10] = float("nan")  # in the last slice
    logits[1, 0, : V // 8] = float("nan")  # the whole first slice (cluster 8)
    mask[1, 0] = 1
    force_cluster(monkeypatch, cluster, logits)
    loss, stats, grad = run(logits, labels, old, adv, mask, entropy_coef=0.05)
    bad = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
    bad[0, 3] = bad[1, 0] = True
    assert torch.isnan(loss)
    assert stats["logprobs"][bad].isnan().all() and torch.isnan(stats["entropy"])
    assert grad[bad].isnan().all()
    assert torch.isfinite(stats["logprobs"][~bad]).all() and torch.isfinite(grad[~bad]).all()


@pytest.mark.gpu
@needs_cluster
def test_nan_old_logprob_under_dual_clip_gives_nan_row_as_triton(monkeypatch):
    # A NaN ratio (here from old_logprobs) with A < 0 and dual clip on: the dual clip must not
    # zero the NaN gradient of that row (a NaN-skipping max would make the loss look clipped).
    V = 16000
    logits, labels, old, adv, mask, _ref = make_inputs(2, 4, V, torch.bfloat16)
    old[1, 2] = float("nan")
    adv[1, 2] = -1.0
    mask[1, 2] = 1
    got = run(logits, labels, old, adv, mask, dual_clip=3.0)
    monkeypatch.setenv(ENV, "0")
    want = run(logits, labels, old, adv, mask, dual_clip=3.0)
    for g in (got[2], want[2]):
        assert torch.isnan(g[1, 2]).all()
        rest = torch.ones(2, 4, dtype=torch.bool, device="cuda")
        rest[1, 2] = False
        assert torch.isfinite(g[rest]).all()
    assert torch.isnan(got[0]) and torch.isnan(want[0])


@pytest.mark.gpu
@needs_cluster
def test_unaligned_rows_fall_back_to_triton():
    V = 1271  # V * 2 bytes is not a multiple of 16
    x = torch.randn(1, 3, V, device="cuda", dtype=torch.bfloat16)
    assert pfl_kernels.cluster_size(x, x) == 0
    y = torch.randn(1, 3, 4096 + 8, device="cuda", dtype=torch.bfloat16)[..., :4096]  # aligned V, row stride 4104
    assert pfl_kernels.cluster_size(y, y) == 1  # 4104 * 2 bytes is a multiple of 16: still eligible
    z = torch.randn(8 * 4096 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(1, 8, 4096)  # base off by 2 bytes
    assert pfl_kernels.cluster_size(z, z) == 0


@pytest.mark.gpu
@needs_cluster
def test_strided_slice_and_batch_invariance():
    V = 128256
    logits, labels, old, adv, mask, ref = make_inputs(2, 6, V, torch.bfloat16)
    kw = {"ref_logprobs": ref[:, :-1], "kl_coef": 0.1, "entropy_coef": 0.01}
    leaf = logits.clone().requires_grad_(True)
    view = leaf[:, :-1]  # [B, T-1, V] view with stride_b = T * V: read in place, no copy
    assert pfl_kernels.cluster_size(view.detach(), view.detach()) == 8
    loss, stats = ppo_loss_from_logits(view, labels[:, :-1], old[:, :-1], adv[:, :-1], mask[:, :-1], **kw)
    loss.backward()
    got = (loss.detach(), {k: v.detach() for k, v in stats.items()}, leaf.grad[:, :-1])
    want = reference_run(logits[:, :-1], labels[:, :-1], old[:, :-1], adv[:, :-1], mask[:, :-1], **kw)
    check_all(got, want, torch.bfloat16)
    assert torch.all(leaf.grad[:, -1] == 0)
    # A row's log-prob and entropy do not depend on the batch it is in (bitwise).
    full = ppo_loss_from_logits(logits.clone().requires_grad_(True), labels, old, adv, mask, entropy_coef=0.01)[1]
    # Row [1, 2] counts in both (mask[1, 3:] = 0 in the batch).
    one = ppo_loss_from_logits(logits[1:2, 2:3].clone().requires_grad_(True), labels[1:2, 2:3], old[1:2, 2:3],
                               adv[1:2, 2:3], torch.ones(1, 1, device="cuda"), entropy_coef=0.01)[1]
    assert torch.equal(full["logprobs"][1, 2], one["logprobs"][0, 0])
