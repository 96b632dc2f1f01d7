#!/usr/bin/env bash
# Everything a session with a GPU owes, in as few device calls as possible.
# Run on the device machine from the repository root (the `device` tool runs commands there);
# results land in $OUT (or ./gpu_out when OUT is unset), ready to copy into bench/RESULTS.md.
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]     stages run in order, all within one command's
#                                                  10 minutes (each is bounded by what is left)
# Stages:
#   build             wheel for sm_80 + sm_90 (also copied to $OUT/wheel for later calls), cuobjdump,
#                     the sm_90 cluster tests, then the whole suite on CUDA against the installed
#                     wheel (~6-8 min)
#   report=OPS        python -m rlhf_fast.bench at the ANCHORS.md sizes for OPS (comma-separated);
#                     `report OPS` (two arguments) is the same
#   report            every op (longer than one command allows: use two report=OPS calls)
#   suites            the pytest-benchmark suites (--benchmark-json in $OUT)
#   tune              bench/tune_gpu.py: row width / warps, cluster size and the per-token PPO tile,
#                     each timed and checked (tune.json in $OUT); tune=SECTIONS runs a subset
#                     (comma-separated: rows, cluster, ppo_tile, ppo_count)
#   profile[=OPS]     bench/profile_gpu.py: torch.profiler kernel tables of rlhf_fast's step for each
#                     case an issue target reads, beside its floor (profile.txt): where the time goes
# Order that gets the issues' targets first (one device call per line; times measured on an H100,
# 2026-11-23): a session has 30 device-minutes, and a fresh machine costs ~1 min of them to start
# (a warm one is given back after 30 s idle), so issue the calls back to back and read the
# outputs after.
#   bash bench/gpu_session.sh build                                     # 9.5 min with 4 workers (cut
#                                                                       # off at 93 %); 12 now, est. ~5
#   bash bench/gpu_session.sh report=ppo_from_logits,dpo_from_logits,ppo_policy_loss,kl_penalty,dpo_loss,gae report=linear_logprobs
#                                                                       # 2 min
#   bash bench/gpu_session.sh report=logprobs,logprobs+entropy          # 2 min
#   bash bench/gpu_session.sh profile tune                              # 35 s
#   bash bench/gpu_session.sh suites                                    # optional: the report covers the targets
# What the session after 2026-11-23 owes (the first run's report is committed; see bench/RESULTS.md):
#   bash bench/gpu_session.sh build
#   bash bench/gpu_session.sh report=ppo_policy_loss,linear_logprobs suites tune=ppo_tile,ppo_count
# then, where the files come back: python -m rlhf_fast.bench --merge <the report JSONs> --out bench/results
# (one report from the per-call ones: JSON, Markdown, plots, the issues' targets over every case).
# A machine given back between calls comes back bare. Calls after `build` install the wheel it
# left in $OUT/wheel when that is carried as ./.gpu_wheel (copy the fetched files there, where
# .gitignore keeps them out of git, and name ".gpu_wheel" in carry): seconds instead of a
# ~1.5 min sm_90 build, as long as csrc/ and setup.py are unchanged (their hash is checked; the
# Python files always come from the tree). Otherwise they rebuild for sm_90.
# If `build` reports the sm_90 cluster kernel of ppo_loss_from_logits broken (tests-cluster.log),
# run the later stages with RLHF_FAST_PPO_CLUSTER=0 in front (the Triton rows) and fix it after;
# if it reports the per-token PPO loss's opt-in fused launch broken (tests-fused.log), leave the
# default (split) as it is and fix the fused launch before timing it.
#
# Peers missing on the device image (liger-kernel, cut-cross-entropy) travel as wheels in ./.whl
# (see the device tool's README: `pip download --no-deps --only-binary=:all: --python-version 3.12
# ... -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1`, carry ".whl"); they are installed when
# present. Both are pure-Python wheels (~0.9 MB together) whose needs, torch and triton, are in the
# image; the calls the report makes to them are held to eager formulas by tests/test_bench_peers.py.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=/tmp/rlhf_site
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/*.whl && export PYTHONPATH=/tmp/peers
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u +%F;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"

# time_for WHAT LOG: prints the seconds left for one more stage of the device command's 10 minutes
# (counted from the script's start; 40 s kept for the kill grace and the copy back of $OUT). Under
# 30 s left: says so (on stderr and in LOG) and fails, so the caller skips the stage.
time_for() {
  local left=$((560 - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "no time left for $1 ($SECONDS s used)" | tee "$2" >&2
    return 1
  fi
  echo "$left"
}

# run_first LOG SECONDS FALLBACK ARGS...: pytest ARGS before the rest of the suite, bounded by
# SECONDS; if they fail or time out (124), FALLBACK (VAR=VALUE) is exported for everything after.
# -k 15: a process stuck in a driver wait may ignore SIGTERM. -v: a killed run still names the
# tests it got through.
run_first() {
  local log=$1 seconds=$2 fallback=$3 rc
  shift 3
  timeout -k 15 "$seconds" python3 -m pytest -v -p no:cacheprovider "$@" 2>&1 | tee "$log" | tail -25
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "pytest $*: rc=$rc (124 = timed out / hang); the suite below runs with $fallback" | tee -a "$log"
    export "$fallback"
  fi
}

# pytest_in_time_left LOG ARGS...: the copied tests/ (minus the cluster file, run first) with
# ARGS, bounded by what remains of the command (time_for).
pytest_in_time_left() {
  local log=$1 left
  shift
  left=$(time_for "pytest $*" "$log") || return 0
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
  # For the later calls (see the header): the wheel and the hash of what its _C was built from.
  mkdir -p "$OUT/wheel" && cp /tmp/dist/*.whl "$OUT/wheel/" && csrc_hash > "$OUT/wheel/csrc.sha256"
  python3 -m pip install -q --no-deps --no-compile --target "$site" /tmp/dist/*.whl || return 1
  # (Into build.log: the device tool brings back at most 8 files from $OUT.)
  cuobjdump --list-elf "$site"/rlhf_fast/_C*.so | tee -a "$OUT/build.log"
  # The suite runs from a directory away from the source tree, against the installed wheel.
  mkdir -p /tmp/rlhf_tests && cp -r tests examples /tmp/rlhf_tests/
  cd /tmp/rlhf_tests || return 1
  export PYTHONPATH="$site:${PYTHONPATH:-}"
  python3 -m rlhf_fast.info | tee -a "$OUT/build.log"
  # Kernels whose bugs would hang rather than fail run first, bounded (run_first), and are left out
  # of the whole-suite run below, so one broken kernel neither stalls nor hides the others' results:
  # the sm_90 cluster kernel of ppo_loss_from_logits (a cluster barrier), falling back to the
  # Triton rows; and the per-token PPO loss's opt-in fused launch (its programs wait for each other
  # inside the kernel); the split launches are the default already, so that fallback only pins it.
  run_first "$OUT/tests-cluster.log" 180 RLHF_FAST_PPO_CLUSTER=0 tests/test_ppo_from_logits_cluster.py
  local fused_tests="fused or schedule or large_gpu" fused_ids id deselect=()
  mapfile -t fused_ids < <(python3 -m pytest tests/test_ppo.py -q --co -p no:cacheprovider -k "$fused_tests" 2>/dev/null \
    | grep '::')
  for id in "${fused_ids[@]}"; do deselect+=(--deselect "$id"); done
  run_first "$OUT/tests-fused.log" 240 RLHF_FAST_PPO_LAUNCH=split tests/test_ppo.py -k "$fused_tests"
  # The device image has pytest-xdist and pytest-timeout. Most tests run on 12 workers (each
  # JIT-compiles its own Triton variants, the slow part of a first GPU run; tests/conftest.py
  # empties the CUDA cache after every gpu test); the big int64-offset cases (marked slow, up to
  # ~37 GB each) then run one at a time. Both within the time left (pytest_in_time_left).
  # Measured on the H100 (2026-11-23): 4 workers with --dist loadfile had not finished the
  # non-slow tests after ~7 min; 14 workers with the default distribution took 131 s.
  local par="" per_test=""
  python3 -c "import xdist" 2>/dev/null && par="-n 12"
  python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 240"
  pytest_in_time_left "$OUT/tests.log" --maxfail=25 --durations=15 $par $per_test -m "not slow" "${deselect[@]}"
  pytest_in_time_left "$OUT/tests-slow.log" $per_test -m slow "${deselect[@]}"
  # build: device.txt, build.log, tests-cluster.log, tests-fused.log, tests.log, tests-slow.log,
  # wheel/ (2) = 8 files
  cd - >/dev/null || true
}

# What the compiled extension is built from: a carried wheel is reused only while this matches.
csrc_hash() {
  cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1
}

install_if_fresh() {
  if [ ! -d "$site/rlhf_fast" ]; then
    if ls .gpu_wheel/*.whl >/dev/null 2>&1 && [ "$(cat .gpu_wheel/csrc.sha256 2>/dev/null)" = "$(csrc_hash)" ]; then
      python3 -m pip install -q --no-deps --no-compile --target "$site" .gpu_wheel/*.whl || return 1
      # The wheel's _C is current (same csrc/ and setup.py); the Python side comes from this tree.
      cp rlhf_fast/*.py "$site/rlhf_fast/" && cp kernels/*.py "$site/rlhf_fast/kernels/" || return 1
      echo "installed the carried wheel $(ls .gpu_wheel/*.whl) with this tree's Python files"
    else
      if [ -d .gpu_wheel ]; then
        if ls .gpu_wheel/*.whl >/dev/null 2>&1 && [ -f .gpu_wheel/csrc.sha256 ]; then
          echo "carried wheel not used: csrc/ or setup.py changed since it was built"
        else
          echo "carried wheel not used: .gpu_wheel lacks the wheel or csrc.sha256"
        fi
      fi
      TORCH_CUDA_ARCH_LIST="9.0" python3 -m pip install -q --no-build-isolation --no-deps --target "$site" . || return 1
    fi
  fi
  export PYTHONPATH="$site:${PYTHONPATH:-}"
}

report() {
  install_if_fresh || return 1
  local ops=${1:-}
  local tag=${ops:+-$(echo "$ops" | tr ',+' '__' | cut -c1-40)}
  # Bounded by the device command's 10 minutes: on SIGINT the bench stops after the case in
  # progress and still prints and writes what it has (it also rewrites its JSON after each case).
  local left
  left=$(time_for "report $ops" "$OUT/bench$tag.log") || return 0
  (cd /tmp && timeout -s INT -k 30 "$left" python3 -m rlhf_fast.bench --out "$OUT" ${ops:+--ops "$ops"} 2>&1) \
    | tee "$OUT/bench$tag.log" | tail -60
}

suites() {
  install_if_fresh || return 1
  # From a copy away from the source tree, so the installed package (with its _C) is the one imported.
  rm -rf /tmp/rlhf_bench && mkdir -p /tmp/rlhf_bench && cp -r bench /tmp/rlhf_bench/
  # SIGINT before the 10 minutes are up: pytest-benchmark still writes the rounds it has.
  local left
  left=$(time_for suites "$OUT/pytest-bench.log") || return 0
  (cd /tmp/rlhf_bench && timeout -s INT -k 30 "$left" python3 -m pytest bench -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/pytest-benchmark.json" --benchmark-columns=min,median,max --benchmark-sort=name 2>&1) \
    | tee "$OUT/pytest-bench.log" | tail -60
}

profile() {
  install_if_fresh || return 1
  local ops=${1:-} left repo=$PWD
  left=$(time_for profile "$OUT/profile.log") || return 0
  (cd /tmp && timeout -s INT -k 15 "$left" python3 "$repo/bench/profile_gpu.py" --out "$OUT" ${ops:+--ops "$ops"} 2>&1) \
    | tail -40
}

tune() {  # tune [SECTIONS]: all of bench/tune_gpu.py's sections when empty
  install_if_fresh || return 1
  # From /tmp so the installed package (with its _C) is imported, not the source tree.
  local left repo=$PWD sections=(${1:+--sections "$1"})
  left=$(time_for tune "$OUT/tune.log") || return 0
  (cd /tmp && timeout -k 15 "$left" python3 "$repo/bench/tune_gpu.py" --out "$OUT" "${sections[@]}" 2>&1) \
    | tee "$OUT/tune.log" | tail -60
}

usage() {
  echo "usage: $0 STAGE [STAGE ...]  with STAGE one of: build, report, report=OPS, suites, tune, tune=SECTIONS, profile, profile=OPS" >&2
  echo "       $0 report OPS" >&2
}

# The older two-argument form `report OPS`.
if [ "${1:-}" = report ] && [ $# -eq 2 ] && [[ "$2" != *=* ]] && [[ ! "$2" =~ ^(build|report|suites|tune|profile)$ ]]; then
  set -- "report=$2"
fi
[ $# -eq 0 ] && set -- build
for stage in "$@"; do
  case "$stage" in
    build|report|report=*|suites|tune|tune=*|profile|profile=*) ;;
    *) usage; exit 2 ;;
  esac
done
# The device tool brings back at most 8 files from $OUT: if the stages of one command wrote more,
# the logs go into one archive (the JSON, Markdown, plots and the wheel stay as they are).
pack_if_over_eight() {
  local n
  n=$(find "$OUT" -type f | wc -l)
  if [ "$n" -gt 8 ]; then
    (cd "$OUT" && tar czf logs.tar.gz $(find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.txt' \) -printf '%P\n') \
      && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.txt' \) -delete)
    echo "$n files in \$OUT: logs packed into logs.tar.gz, $(find "$OUT" -type f | wc -l) files now"
  fi
}
trap pack_if_over_eight EXIT

for stage in "$@"; do
  echo "== $stage ($SECONDS s into the command)"
  case "$stage" in
    build) build_and_test ;;
    report) report "" ;;
    report=*) report "${stage#report=}" ;;
    suites) suites ;;
    tune) tune "" ;;
    tune=*) tune "${stage#tune=}" ;;
    profile) profile "" ;;
    profile=*) profile "${stage#profile=}" ;;
  esac
done
