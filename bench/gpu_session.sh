#!/usr/bin/env bash
# Everything a session with a GPU owes, in as few device calls as possible.
# Run on the device machine from the repository root (the `device` tool runs commands there);
# results land in $OUT (or ./gpu_out when OUT is unset), ready to copy into bench/RESULTS.md.
#
#   bash bench/gpu_session.sh build   # wheel for sm_80 + sm_90, cuobjdump, install away from the tree,
#                                     # the whole test suite on CUDA against the installed wheel (~6-8 min)
#   bash bench/gpu_session.sh report logprobs,logprobs+entropy,linear_logprobs
#   bash bench/gpu_session.sh report ppo_from_logits,dpo_from_logits,ppo_policy_loss,kl_penalty,dpo_loss,gae
#                                     # python -m rlhf_fast.bench at the ANCHORS.md sizes, in two calls
#                                     # so each stays under the 10-minute limit of one device command
#   bash bench/gpu_session.sh suites  # the pytest-benchmark suites (--benchmark-json in $OUT)
#   bash bench/gpu_session.sh tune    # bench/tune_gpu.py: row width / warps, cluster size and the
#                                     # per-token PPO tile, each timed and checked (tune.json in $OUT)
# If `build` reports the sm_90 cluster kernel of ppo_loss_from_logits broken (tests-cluster.log),
# run the later stages with RLHF_FAST_PPO_CLUSTER=0 in front (the Triton rows) and fix it after.
# Each stage after `build` reinstalls into /tmp when the machine is fresh (a ~1.5 min sm_90 build).
#
# Peers missing on the device image (liger-kernel, cut-cross-entropy) travel as wheels in ./.whl
# (see the device tool's README: `pip download --no-deps --only-binary=:all: --python-version 3.12
# ... -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1`, carry ".whl"); they are installed when
# present. Both are pure-Python wheels (~0.9 MB together) whose needs, torch and triton, are in the
# image; the APIs the report calls (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
# liger_kernel.transformers.grpo_loss.triton_grpo_loss, cut_cross_entropy.linear_cross_entropy)
# were checked in those versions on 2026-11-23.
set -uo pipefail
stage=${1:-build}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=/tmp/rlhf_site
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/*.whl && export PYTHONPATH=/tmp/peers
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u +%F;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"

# pytest_in_time_left LOG ARGS...: the copied tests/ (minus the cluster file, run first) with
# ARGS, bounded by what remains of the device command's 10 minutes (counted from the script's
# start, 30 s kept for the copy back); skipped, saying so in LOG, when under 30 s remain.
pytest_in_time_left() {
  local log=$1
  shift
  local left=$((570 - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "no time left for: pytest $* ($SECONDS s used)" | tee "$log"
    return 0
  fi
  timeout -k 15 "$left" python3 -m pytest tests -v -p no:cacheprovider "$@" \
    --ignore=tests/test_ppo_from_logits_cluster.py 2>&1 | tee "$log" | tail -30
}

build_and_test() {
  rm -rf /tmp/dist "$site" /tmp/rlhf_tests
  local t0=$SECONDS
  TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=16 python3 -m pip wheel -q --no-build-isolation --no-deps . -w /tmp/dist \
    2>&1 | tail -20 | tee "$OUT/build.log"
  echo "wheel build: $((SECONDS - t0)) s" | tee -a "$OUT/build.log"
  ls -la /tmp/dist | tee -a "$OUT/build.log"
  python3 -m pip install -q --no-deps --no-compile --target "$site" /tmp/dist/*.whl || return 1
  cuobjdump --list-elf "$site"/rlhf_fast/_C*.so | tee "$OUT/cuobjdump.txt"
  # The suite runs from a directory away from the source tree, against the installed wheel.
  mkdir -p /tmp/rlhf_tests && cp -r tests examples /tmp/rlhf_tests/
  cd /tmp/rlhf_tests || return 1
  export PYTHONPATH="$site:${PYTHONPATH:-}"
  python3 -m rlhf_fast.info | tee "$OUT/info.txt"
  # The sm_90 cluster kernel first, bounded: a cluster-barrier bug would hang rather than fail.
  # If it fails or hangs, the rest of the suite runs on the Triton rows (RLHF_FAST_PPO_CLUSTER=0)
  # so one broken kernel does not hide the others' results.
  # -k: a process stuck in a driver wait may ignore SIGTERM. -v: a killed run still names the
  # tests it got through.
  timeout -k 15 180 python3 -m pytest tests/test_ppo_from_logits_cluster.py -v -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests-cluster.log" | tail -25
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "cluster kernel tests: rc=$rc (124 = timed out / hang); the suite below runs with RLHF_FAST_PPO_CLUSTER=0" \
      | tee -a "$OUT/tests-cluster.log"
    export RLHF_FAST_PPO_CLUSTER=0
  fi
  # The device image has pytest-xdist and pytest-timeout. Most tests run on 4 workers (each
  # JIT-compiles its own Triton variants, the slow part of a first GPU run; tests/conftest.py
  # empties the CUDA cache after every gpu test); the big int64-offset cases (marked slow, up to
  # ~37 GB each) then run one at a time. Both within the time left (pytest_in_time_left).
  local par="" per_test=""
  python3 -c "import xdist" 2>/dev/null && par="-n 4 --dist loadfile"
  python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 240"
  pytest_in_time_left "$OUT/tests.log" --maxfail=25 --durations=15 $par $per_test -m "not slow"
  pytest_in_time_left "$OUT/tests-slow.log" $per_test -m slow
  cd - >/dev/null || true
}

install_if_fresh() {
  if [ ! -d "$site/rlhf_fast" ]; then
    TORCH_CUDA_ARCH_LIST="9.0" python3 -m pip install -q --no-build-isolation --no-deps --target "$site" . || return 1
  fi
  export PYTHONPATH="$site:${PYTHONPATH:-}"
}

report() {
  install_if_fresh || return 1
  local ops=${1:-}
  local tag=${ops:+-$(echo "$ops" | tr ',+' '__' | cut -c1-40)}
  # Bounded by the device command's 10 minutes: on SIGINT the bench stops after the case in
  # progress and still prints and writes what it has (it also rewrites its JSON after each case).
  (cd /tmp && timeout -s INT -k 30 $((560 - SECONDS)) python3 -m rlhf_fast.bench --out "$OUT" ${ops:+--ops "$ops"} 2>&1) \
    | tee "$OUT/bench$tag.log" | tail -60
}

suites() {
  install_if_fresh || return 1
  # From a copy away from the source tree, so the installed package (with its _C) is the one imported.
  rm -rf /tmp/rlhf_bench && mkdir -p /tmp/rlhf_bench && cp -r bench /tmp/rlhf_bench/
  # SIGINT before the 10 minutes are up: pytest-benchmark still writes the rounds it has.
  (cd /tmp/rlhf_bench && timeout -s INT -k 30 $((560 - SECONDS)) python3 -m pytest bench -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/pytest-benchmark.json" --benchmark-columns=min,median,max --benchmark-sort=name 2>&1) \
    | tee "$OUT/pytest-bench.log" | tail -60
}

tune() {
  install_if_fresh || return 1
  # From /tmp so the installed package (with its _C) is imported, not the source tree.
  (cd /tmp && timeout -k 15 $((570 - SECONDS)) python3 "$OLDPWD/bench/tune_gpu.py" --out "$OUT" 2>&1) \
    | tee "$OUT/tune.log" | tail -60
}

case "$stage" in
  build) build_and_test ;;
  report) report "${2:-}" ;;
  suites) suites ;;
  tune) tune ;;
  *) echo "usage: $0 build | report [OPS] | suites | tune" >&2; exit 2 ;;
esac
