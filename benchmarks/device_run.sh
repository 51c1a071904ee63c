#!/usr/bin/env bash
# One GPU session, in one command: the test suite on the GPU, then the benchmarks. Full logs go
# under $OUT; a short summary is printed last. Run on the device machine from the repo root:
#   source .device/on-device.sh && bash benchmarks/device_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/ejkernel-nsa-out}
mkdir -p "$OUT"
summary=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
ejkernel-nsa info 2>&1 | tee "$OUT/info.txt"

HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} python3 -m pytest tests -q -p no:cacheprovider -rfEs 2>&1 \
  | tee "$OUT/pytest.txt"
summary+=("pytest: $(tail -n 1 "$OUT/pytest.txt")")

for spec in "65536 fwd_bwd" "65536 fwd" "16384 fwd" "16384 fwd_bwd"; do
  set -- $spec
  log="$OUT/xla_T$1_$2.txt"
  python3 benchmarks/xla_targets.py --seq-len "$1" --mode "$2" --repeats 3 2>&1 | tee "$log"
  summary+=("xla T=$1 $2: $(grep -h 'median' "$log" | sed 's/.*median/median/') $(grep -h 'peak' "$log")")
done

echo
echo "==== summary ($(cat "$OUT/device.txt"))"
printf '%s\n' "${summary[@]}"
