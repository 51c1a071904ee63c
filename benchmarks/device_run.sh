#!/usr/bin/env bash
# One GPU session's work, in one or two commands: the test suite on the GPU, then the
# benchmarks. Full logs go under $OUT; a short summary is printed last. On the device machine,
# from the repo root:
#   source .device/on-device.sh && bash benchmarks/device_run.sh [tests|bench|all] [pytest args (default: tests)]
set -uo pipefail
OUT=${OUT:-/tmp/ejkernel-nsa-out}
mkdir -p "$OUT"
stage=${1:-all}
shift || true
summary=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

if [[ $stage == tests || $stage == all ]]; then
  ejkernel-nsa info 2>&1 | tee "$OUT/info.txt"
  # Extra arguments replace the default target (all of tests/), e.g. tests/test_backend_triton.py.
  HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} python3 -m pytest -q -p no:cacheprovider -rfEs "${@:-tests}" 2>&1 \
    | tee "$OUT/pytest.txt"
  summary+=("pytest: $(tail -n 1 "$OUT/pytest.txt")")
fi

if [[ $stage == bench || $stage == all ]]; then
  for spec in "triton 16384 fwd" "xla 16384 fwd" "triton 16384 fwd_bwd" "xla 16384 fwd_bwd" \
              "triton 65536 fwd" "xla 65536 fwd" "triton 65536 fwd_bwd" "xla 65536 fwd_bwd"; do
    set -- $spec
    log="$OUT/bench_$1_T$2_$3.txt"
    python3 benchmarks/xla_targets.py --backend "$1" --seq-len "$2" --mode "$3" --repeats 5 > "$log" 2>&1
    summary+=("$1 T=$2 $3: $(grep -h 'median' "$log" | sed 's/.*median/median/') $(grep -h 'peak' "$log")")
    grep -q median "$log" || summary+=("   failed: $(tail -n 2 "$log" | tr '\n' ' ')")
  done
fi

echo
echo "==== summary ($(cat "$OUT/device.txt"))"
printf '%s\n' "${summary[@]}"
