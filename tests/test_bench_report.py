"""The benchmark report (`python -m rlhf_fast.bench`), run in-process on CPU with tiny cases.

Checks that it prints the table, writes the JSON and Markdown files, fills the check column, and
that a wrong implementation (injected through bench.FAST_OVERRIDES) is flagged FAIL with a
non-zero exit status. matplotlib and tqdm are hidden so the fallbacks run whatever is installed.
"""

import json
import sys

import pytest
import torch
from conftest import INTERPRETED

from rlhf_fast import _bench_cases, bench
from rlhf_fast import reference as ref
from rlhf_fast._bench_cases import Case

TINY = [
    Case("logprobs", (32, 512), torch.float32, "fwd"),
    Case("logprobs", (32, 512), torch.float32, "fwd+bwd"),
    Case("logprobs+entropy", (32, 512), torch.float32, "fwd+bwd"),
]


@pytest.fixture
def tiny_cases(monkeypatch):
    """Replace the CPU case list by a few small log-prob cases (fast, and the op exists)."""
    monkeypatch.setattr(
        _bench_cases, "cpu_cases", lambda dtype, quick: [Case(c.op, c.shape, dtype, c.mode) for c in TINY]
    )
    # Optional packages hidden: the plain stderr counter and the "plots skipped" notice run.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _run(tmp_path, *extra):
    return bench.main(
        [
            "--quick",
            "--ops",
            "logprobs",
            "--out",
            str(tmp_path),
            "--no-compile",
            "--device",
            "cpu",
            "--reps",
            "2",
            "--threads",
            "1",
            *extra,
        ]
    )


def _report(tmp_path):
    files = sorted(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text())


def test_quick_run_prints_table_and_writes_files(tmp_path, capsys, tiny_cases):
    rc = _run(tmp_path)
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "| op" in out and "max err" in out and "rlhf_fast ms" in out
    assert "copy bandwidth" in out
    assert "plots skipped: matplotlib is not installed" in out
    assert "[1/3]" in err  # progress fallback
    data = _report(tmp_path)
    assert data["failures"] == 0
    assert data["copy_bandwidth_GBps"] > 0
    assert len(data["cases"]) == 3
    for case in data["cases"]:
        assert case["check"]["status"] == "ok"
        assert case["check"]["max_abs_err"] is not None
        names = {t["name"] for t in case["check"]["tensors"]}
        assert "logp" in names
        if case["mode"] == "fwd+bwd":
            assert "grad logits" in names  # gradients are checked too
        if INTERPRETED:  # the Triton kernel itself, under the interpreter, on a slice
            assert case["kernel_check"]["status"] == "ok", case["kernel_check"]
        assert case["peers"]["rlhf_fast"]["status"] == "ok"
        assert case["peers"]["eager"]["ms"] > 0
        assert case["peers"]["compile"]["status"] == "skipped"
        assert case["floor_ms"] > 0
    md = next(tmp_path.glob("cpu-*.md")).read_text()
    assert "| logprobs" in md


def test_wrong_gradient_is_flagged(tmp_path, capsys, tiny_cases, monkeypatch):
    def wrong(logits, labels, *, return_entropy=False, **kwargs):
        # Right forward values, gradient off by 0.5 on every logit.
        out = ref.logprobs(logits, labels, return_entropy=return_entropy)
        bump = 0.5 * (logits - logits.detach()).float().sum(-1)
        return (out[0] + bump, out[1]) if return_entropy else out + bump

    monkeypatch.setitem(bench.FAST_OVERRIDES, "logprobs", wrong)
    rc = _run(tmp_path)
    out, _ = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in out
    data = _report(tmp_path)
    status = {(c["op"], c["mode"]): c["check"]["status"] for c in data["cases"]}
    assert status[("logprobs", "fwd")] == "ok"  # the forward is right
    assert status[("logprobs", "fwd+bwd")] == "fail"
    assert status[("logprobs+entropy", "fwd+bwd")] == "fail"
    assert data["failures"] == 2


def test_raising_implementation_fails_the_run(tmp_path, capsys, tiny_cases, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(bench.FAST_OVERRIDES, "logprobs", broken)
    rc = _run(tmp_path)
    out, _ = capsys.readouterr()
    assert rc == 1
    assert "ERROR" in out and "kernel launch failed" in out


def test_missing_op_is_unavailable_not_a_failure(tmp_path, capsys, tiny_cases, monkeypatch):
    spec = _bench_cases.SPECS["logprobs"]
    import dataclasses

    monkeypatch.setitem(_bench_cases.SPECS, "logprobs", dataclasses.replace(spec, api="not_written_yet"))
    rc = _run(tmp_path)
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "unavailable" in out
    data = _report(tmp_path)
    row = next(c for c in data["cases"] if c["op"] == "logprobs")
    assert row["peers"]["rlhf_fast"]["status"] == "unavailable"
    assert row["check"]["status"] == "not run"
    assert row["peers"]["eager"]["status"] == "ok"  # the peers still run


def test_interrupted_run_still_prints_and_writes(tmp_path, capsys, tiny_cases, monkeypatch):
    """Ctrl-C or SIGTERM (the device command's time limit) during a case: the finished cases are
    printed and written, the files say the run is partial, the exit status is 130."""
    calls = []

    def interrupted_on_second_case(logits, labels, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the first case calls it twice (check, then timing)
            raise KeyboardInterrupt
        return ref.logprobs(logits, labels, **kwargs)

    monkeypatch.setitem(bench.FAST_OVERRIDES, "logprobs", interrupted_on_second_case)
    monkeypatch.setattr(bench.Timer, "measure", lambda self, fn, warmup=None: (fn(), (1.0, 1, 0.0))[1])
    rc = _run(tmp_path)
    out, _ = capsys.readouterr()
    assert rc == 130
    assert "interrupted after 1 of 3 cases" in out and "| logprobs" in out
    data = _report(tmp_path)
    assert len(data["cases"]) == 1 and data["cases"][0]["check"]["status"] == "ok"
    assert data["partial"].startswith("interrupted after 1 of 3 cases")


def test_case_that_raises_is_a_harness_error(tmp_path, capsys, tiny_cases, monkeypatch):
    spec = _bench_cases.SPECS["logprobs"]
    import dataclasses

    def broken_inputs(*args):
        raise RuntimeError("CUDA out of memory while building inputs")

    monkeypatch.setitem(_bench_cases.SPECS, "logprobs", dataclasses.replace(spec, make_inputs=broken_inputs))
    rc = _run(tmp_path)
    out, _ = capsys.readouterr()
    assert rc == 1 and "harness error" in out
    data = _report(tmp_path)
    row = next(c for c in data["cases"] if c["op"] == "logprobs")
    assert "out of memory while building inputs" in row["harness_error"]
    assert data["failures"] == 2  # both logprobs cases; logprobs+entropy has its own spec


def test_cuda_timer_queues_short_calls_and_flushes_by_reading(monkeypatch):
    """The CUDA branch of Timer.measure, on fakes of torch.cuda's events, sleep and sync: a short
    call gets the GPU held by a spin kernel so the host queues every rep; L2 is flushed by a read
    before each rep; the median of the event intervals comes back."""
    log = []

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            FakeEvent.count += 1
            self.t = FakeEvent.count
            log.append("record")

        def elapsed_time(self, end):
            return 0.05 * (end.t - self.t)

    class Flush(torch.Tensor):
        def sum(self, *args, **kwargs):
            log.append("flush-read")
            return super().sum(*args, **kwargs)

        def zero_(self):
            raise AssertionError("a zero_ flush leaves dirty lines in L2")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", cycles)))
    timer = bench.Timer(torch.device("cpu"), reps=4, warmup=2, budget_s=1.0)
    timer.cuda = True
    timer.flush = torch.zeros(16, dtype=torch.int32).as_subclass(Flush)
    ms, reps, _ = timer.measure(lambda: log.append("call"))
    assert reps == 4 and ms == pytest.approx(0.05)
    first_sleep = next(i for i, e in enumerate(log) if isinstance(e, tuple))
    assert 0 < log[first_sleep][1] <= 0.25 * 2e9
    timed = log[first_sleep + 1 :]
    assert timed == ["flush-read", "record", "call", "record"] * 4


def test_merge_of_two_runs_is_one_report(tmp_path, capsys, monkeypatch):
    """A GPU session runs the ops in several device calls; --merge makes the one report of them
    (every case, the targets over all of them), and a case read back equals what was written."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(
        _bench_cases,
        "cpu_cases",
        lambda dtype, quick: [
            Case("logprobs", (16, 300), dtype, "fwd"),
            Case("gae", (4, 64), dtype, "fwd"),
            Case("dpo_loss", (64,), dtype, "fwd+bwd"),
        ],
    )
    common = ["--quick", "--no-compile", "--device", "cpu", "--reps", "1", "--threads", "1", "--no-kernel-check"]
    assert bench.main([*common, "--ops", "logprobs", "--out", str(tmp_path / "a")]) == 0
    assert bench.main([*common, "--ops", "gae,dpo_loss", "--out", str(tmp_path / "b")]) == 0
    parts = [next((tmp_path / d).glob("cpu-*.json")) for d in ("a", "b")]
    capsys.readouterr()
    assert bench.main(["--merge", *map(str, parts), "--out", str(tmp_path / "m")]) == 0
    out, _ = capsys.readouterr()
    assert "| logprobs" in out and "| gae" in out and "| dpo_loss" in out
    merged = list((tmp_path / "m").glob("cpu-*.json"))
    assert len(merged) == 1 and merged[0].with_suffix(".md").exists()
    data = json.loads(merged[0].read_text())
    assert sorted(c["op"] for c in data["cases"]) == ["dpo_loss", "gae", "logprobs"]
    assert data["meta"]["merged_from"] == [p.name for p in parts]
    assert "merged from 2 runs" in data["copy_bandwidth_how"]
    # Round trip: the merged entry of a case is the entry of its run (floor and times unchanged).
    first = {c["op"]: c for c in json.loads(parts[0].read_text())["cases"]}
    again = {c["op"]: c for c in data["cases"]}
    assert again["logprobs"] == first["logprobs"]
    assert bench.main(["--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m")]) == 2

    # A run cut short and a run with other versions are merged and said so; an unreadable file
    # (a run killed mid-write before the writes were atomic, say) is skipped.
    b = json.loads(parts[1].read_text())
    b["partial"] = "interrupted after 1 of 2 cases"
    b["meta"]["triton"] = "0.0-other"
    parts[1].write_text(json.dumps(b))
    broken = tmp_path / "broken.json"
    broken.write_text('{"meta": ')
    capsys.readouterr()
    assert bench.main(["--merge", *map(str, parts), str(broken), "--out", str(tmp_path / "m2")]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "broken.json" in err
    data = json.loads(next((tmp_path / "m2").glob("cpu-*.json")).read_text())
    assert data["partial"] == f"{parts[1].name}: interrupted after 1 of 2 cases"
    assert any("differ in triton" in n for n in data["notes"])
    md = next((tmp_path / "m2").glob("cpu-*.md")).read_text()
    assert "partial run" in md and "differ in triton" in md


def test_compare_flags_nan_and_tolerance():
    want = torch.tensor([1.0, -2.0, 3.0])
    assert bench.compare("x", want.clone(), want, torch.float32)["ok"]
    assert not bench.compare("x", want + 1e-3, want, torch.float32)["ok"]
    assert bench.compare("x", want + 1e-3, want, torch.bfloat16)["ok"]
    assert not bench.compare("x", torch.tensor([1.0, float("nan"), 3.0]), want, torch.float32)["ok"]
    assert not bench.compare("x", want[:2], want, torch.float32)["ok"]
    inf = torch.tensor([float("-inf"), 0.5])
    assert bench.compare("x", inf.clone(), inf, torch.float32)["ok"]


def test_cli_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "no_such_op"])


def test_case_lists_cover_every_op():
    ops = {s.key for s in _bench_cases.SPECS.values()}
    for quick in (True, False):
        assert {c.op for c in _bench_cases.cpu_cases(torch.float32, quick)} == ops
        assert {c.op for c in _bench_cases.gpu_cases(torch.bfloat16, quick)} == ops


@pytest.mark.parametrize(
    "op", ["logprobs", "logprobs+entropy", "ppo_from_logits", "dpo_from_logits", "linear_logprobs"]
)
def test_check_on_a_subset(op):
    """At GPU sizes the check runs on a slice of the inputs: the slice must be a valid input."""
    spec = _bench_cases.SPECS[op]
    shape = {"ppo_from_logits": (2, 16, 64), "dpo_from_logits": (4, 16, 64), "linear_logprobs": (16, 8, 64)}.get(
        op, (16, 64)
    )
    case = Case(op, shape, torch.float32, "fwd+bwd")
    inputs = spec.make_inputs(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    sub, note = spec.subset(inputs, 256)
    assert note
    big = "hidden" if op == "linear_logprobs" else "logits"
    assert sub[big].numel() < inputs[big].numel()
    fn = getattr(ref, spec.api)
    result = bench.run_check(spec, case, inputs, fn, fn)
    assert result.status == "ok", result.note


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dpo_from_logits_floor_counts_only_the_rows_the_kernels_read(dtype):
    """The case masks each sequence's prompt; the kernels read no masked row (forward or backward)
    but write the whole gradient. A floor that counted every row was 20 % too high, which made the
    H100 run look faster than its floor (1.17)."""
    spec = _bench_cases.SPECS["dpo_from_logits"]
    shape = (4, 16, 64)
    B2, T, V = shape
    inputs = spec.make_inputs(shape, dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
    counted_rows = int(inputs["mask"].sum())
    assert 0 < counted_rows < B2 * T
    row_bytes = V * dtype.itemsize
    labels_and_mask = B2 * T * (inputs["labels"].element_size() + inputs["mask"].element_size())
    want = 2 * counted_rows * row_bytes + B2 * T * row_bytes + labels_and_mask  # 2 reads, 1 write
    assert spec.bytes_moved(shape, dtype, "fwd+bwd") == want


# ----------------------------------------------------------------------------------------------
# The issues' targets table (printed on GPU runs)


def _result(op, shape, mode, dtype, ms, floor_ms=None, extra_gb=None):
    r = bench.CaseResult(Case(op, shape, dtype, mode))
    r.floor_ms = floor_ms
    r.peers["rlhf_fast"] = bench.PeerResult("ok", ms=ms, extra_gb=extra_gb)
    return r


def _verdict(bt, results, text):
    (verdict,) = {r[4] for r in bt.targets_rows(results) if r[1] == text}
    return verdict


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs the Triton kernels")
def test_inplace_backward_peer_gives_the_reference_gradient(monkeypatch):
    """The report's "rlhf_fast inplace_backward" column runs the Triton kernels with the gradient
    written into the logits' storage, through the same make_step the report times."""
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    spec = _bench_cases.SPECS["logprobs"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inp = spec.make_inputs((6, 1271), torch.float32, dev, torch.Generator(device=dev).manual_seed(3))
    x = inp["logits"].clone().requires_grad_(True)
    want = ref.logprobs(x, inp["labels"])
    (want_grad,) = torch.autograd.grad(want, x, inp["grad_logp"])
    leaves = bench._leaves(spec, inp, "fwd+bwd")
    storage = leaves["logits"].data_ptr()
    (logp,), (grad,) = bench.make_step(spec, spec.gpu_peers["inplace"](), leaves, "fwd+bwd")()
    torch.testing.assert_close(logp, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)
    assert grad.data_ptr() == storage  # in the logits' own storage


def test_every_target_reads_a_case_of_the_gpu_run():
    from rlhf_fast import _bench_targets

    cases = {(c.op, c.shape, c.mode, c.dtype) for c in _bench_cases.gpu_cases(torch.bfloat16, quick=True)}
    for t in _bench_targets.TARGETS:
        assert (t.op, t.shape, t.mode, t.dtype) in cases, t
        if t.versus is not None:
            assert (t.versus, t.shape, t.mode, t.dtype) in cases, t
        spec = _bench_cases.SPECS[t.op]
        assert t.peer == "rlhf_fast" or t.peer in spec.peers or t.peer in spec.gpu_peers, t


def test_targets_are_judged_per_metric():
    from rlhf_fast import _bench_targets as bt

    bf16, f32 = torch.bfloat16, torch.float32
    results = [
        _result("logprobs", (16384, 32000), "fwd", bf16, ms=0.40, floor_ms=0.36),  # 0.90: met
        _result("logprobs", (16384, 128256), "fwd", bf16, ms=2.00, floor_ms=1.39),  # 0.70: missed
        _result("logprobs+entropy", (16384, 32000), "fwd", bf16, ms=0.43),  # 1.075 x: met
        _result("logprobs+entropy", (16384, 128256), "fwd", bf16, ms=2.40),  # 1.2 x: missed
        _result("logprobs", (16384, 128256), "fwd+bwd", bf16, ms=4.9, extra_gb=9.0),  # ms met, memory missed
        _result("gae", (1024, 4096), "fwd", f32, ms=0.2),  # missed
    ]
    rows = {(r[1], r[2]): (r[3], r[4]) for r in bt.targets_rows(results)}
    frac = "log-probs forward >= 85 % of copy bandwidth"
    assert rows[(frac, "logprobs fwd 16384x32000 bf16")][1] == "met"
    assert rows[(frac, "logprobs fwd 16384x128256 bf16")] == ("0.69 of copy bw (2 ms)", "MISSED")
    assert rows[(frac, "logprobs fwd 8192x151936 bf16")][1] == "not run"
    ent = "entropy in the same pass costs <= 10 % more"
    assert rows[(ent, "logprobs+entropy fwd 16384x32000 bf16")][1] == "met"
    assert rows[(ent, "logprobs+entropy fwd 16384x128256 bf16")][1] == "MISSED"
    assert rows[("log-probs fwd+bwd <= 5.0 ms (1.2 x floor)", "logprobs fwd+bwd 16384x128256 bf16")][1] == "met"
    mem = "log-probs fwd+bwd extra memory <= one logits-sized gradient"
    assert rows[(mem, "logprobs fwd+bwd 16384x128256 bf16")][1] == "MISSED"
    assert rows[("gae <= 0.1 ms", "gae fwd 1024x4096 fp32")][1] == "MISSED"
    assert rows[("dpo_loss_from_logits fwd+bwd <= 10 ms (1.2 x floor)", "dpo_from_logits fwd+bwd 16x2048x128256 bf16")][
        1
    ] == "not run"
    # Never "met" when rlhf_fast raised, ran out of memory or gave wrong results.
    gae = "gae fwd 1024x4096 fp32"
    for status, verdict in (("error", "error"), ("oom", "MISSED")):
        broken = _result("gae", (1024, 4096), "fwd", f32, ms=0.01)
        broken.peers["rlhf_fast"] = bench.PeerResult(status)
        assert {r[4] for r in bt.targets_rows([broken]) if r[2] == gae} == {verdict}
    wrong = _result("gae", (1024, 4096), "fwd", f32, ms=0.01)
    wrong.check = bench.CheckResult("fail", max_abs_err=1.0)
    assert {r[4] for r in bt.targets_rows([wrong]) if r[2] == gae} == {"CHECK FAILED"}
    # Memory targets read from a named column: rlhf_fast's forward, and the inplace_backward peer.
    on = "log-probs forward extra memory O(N)"
    inplace = "log-probs fwd+bwd, inplace_backward=True: no gradient buffer"
    big = (16384, 128256)
    fwd_small = _result("logprobs", big, "fwd", bf16, ms=1.5, extra_gb=0.0004)
    fwd_big = _result("logprobs", big, "fwd", bf16, ms=1.5, extra_gb=4.2)
    both = _result("logprobs", big, "fwd+bwd", bf16, ms=4.5, extra_gb=4.3)
    assert _verdict(bt, [fwd_small], on) == "met" and _verdict(bt, [fwd_big], on) == "MISSED"
    assert _verdict(bt, [both], inplace) == "not run"  # no inplace column in the run
    both.peers["inplace"] = bench.PeerResult("ok", ms=4.4, extra_gb=0.001)
    assert _verdict(bt, [both], inplace) == "met"
    both.peers["inplace"] = bench.PeerResult("ok", ms=4.4, extra_gb=4.2)
    assert _verdict(bt, [both], inplace) == "MISSED"
    harness = _result("gae", (1024, 4096), "fwd", f32, ms=0.01)
    harness.harness_error = "CUDA out of memory while building inputs"
    assert {r[4] for r in bt.targets_rows([harness]) if r[2] == gae} == {"harness error"}


@pytest.mark.skipif(not INTERPRETED, reason="the CPU dry run of the sweep; on a GPU the session script runs it")
def test_tune_sweep_dry_run(tmp_path):
    """bench/tune_gpu.py (the GPU session's launch-config sweep) runs end to end at tiny sizes:
    every config launches, agrees with the default config, and lands in tune.json."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "tune_gpu.py"
    if not script.exists():  # tests/ copied next to an installed wheel, without bench/
        pytest.skip(f"{script} not found")
    run = subprocess.run([sys.executable, str(script), "--small", "--out", str(tmp_path)], check=False, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "tune.json").read_text())
    for section, n in (("rows", 12), ("cluster", 6), ("ppo_tile", 18), ("ppo_count", 6)):
        entries = result[section]
        assert len(entries) == n, section
        for e in entries:
            assert "error" not in e, e
            assert e["ms"] > 0 and e["max_err_vs_default"] < 1e-4, e

    # --sections runs only the named sweeps (the GPU session's `tune=SECTIONS` stage).
    run = subprocess.run([sys.executable, str(script), "--small", "--out", str(tmp_path), "--sections", "ppo_count"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "tune.json").read_text())
    assert [len(result[s]) for s in ("rows", "cluster", "ppo_tile", "ppo_count")] == [0, 0, 0, 6]
    bad = subprocess.run([sys.executable, str(script), "--small", "--out", str(tmp_path), "--sections", "nope"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown sections" in bad.stderr


def test_profile_dry_run(tmp_path):
    """bench/profile_gpu.py (where the time goes, per issue-target case) runs end to end on the CPU
    quick cases and writes one profile.txt with a kernel table per case."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "profile_gpu.py"
    if not script.exists():  # tests/ copied next to an installed wheel, without bench/
        pytest.skip(f"{script} not found")
    run = subprocess.run(
        [sys.executable, str(script), "--small", "--ops", "gae,dpo_loss", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = (tmp_path / "profile.txt").read_text()
    n_cases = len(_bench_cases.select(_bench_cases.cpu_cases(torch.float32, True), ["gae", "dpo_loss"]))
    assert n_cases >= 2 and text.count("## ") == n_cases
    assert "raised" not in text and "floor" in text and "Name" in text
    for case in ("## gae fwd", "## dpo_loss fwd+bwd"):
        assert case in text


def test_profile_cases_are_the_targets_cases():
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not (bench_dir / "profile_gpu.py").exists():  # tests/ copied without bench/
        pytest.skip(f"{bench_dir / 'profile_gpu.py'} not found")
    sys.path.insert(0, str(bench_dir))
    try:
        import profile_gpu
    finally:
        sys.path.pop(0)
    from rlhf_fast import _bench_targets

    got = {(c.op, c.shape, c.mode, c.dtype) for c in profile_gpu.target_cases(False, None)}
    for t in _bench_targets.TARGETS:
        assert (t.op, t.shape, t.mode, t.dtype) in got, t
    assert {c.op for c in profile_gpu.target_cases(False, ["gae"])} == {"gae"}
