#!/usr/bin/env bash
# One GPU session's work, in one or two commands: the test suite on the GPU, then the
# benchmarks. Full logs go under $OUT; a short summary is printed last. On the device machine,
# from the repo root:
#   source .device/on-device.sh && bash benchmarks/device_run.sh [tests|bench|all] [args]
# args: for `tests`, pytest's (default: tests); for `bench`, the harness's (benchmarks/nsa_bench.py --help).
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
  # The harness (benchmarks/nsa_bench.py) in one process, within BENCH_BUDGET_S seconds. Arguments
  # after `bench` go to it (with `all`, set BENCH_ARGS instead). Records are written after every
  # case. If it ends itself (exit 3: a case hung, or an error left the GPU context unusable), it
  # starts again on the same records (--resume) with what is left of the budget; if it overruns
  # the budget by a minute it is killed, and the tables are printed from the records it left
  # (--report-only).
  [[ $stage == bench ]] && bench_args=("$@") || read -r -a bench_args <<< "${BENCH_ARGS:-}"
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
  json="benchmarks/results/${device:-gpu}_$(date -u +%Y-%m-%dT%H%MZ).json"
  deadline=$((SECONDS + ${BENCH_BUDGET_S:-420}))
  while :; do
    left=$((deadline - SECONDS))
    timeout -k 10 $((left + 60)) python3 benchmarks/nsa_bench.py --json "$json" --resume --budget-s "$left" \
      "${bench_args[@]}" 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    [[ $rc == 3 && $((deadline - SECONDS)) -gt 30 ]] || break
    echo "device_run: a case hung (exit 3); resuming on $json" | tee -a "$OUT/bench.log"
  done
  if [[ $rc != 0 && -f $json ]]; then
    python3 benchmarks/nsa_bench.py --json "$json" --report-only "${bench_args[@]}" 2>&1 | tee -a "$OUT/bench.log"
  fi
  for f in "$json" "${json%.json}.png"; do [[ -f $f ]] && cp "$f" "$OUT/"; done
  git diff --quiet -- registry/tuning.json 2>/dev/null || cp registry/tuning.json "$OUT/tuning.json"
  summary+=("bench: exit $rc, records $json (copied to \$OUT; the table is in bench.log)")
fi

echo
echo "==== summary ($(cat "$OUT/device.txt"))"
printf '%s\n' "${summary[@]}"
