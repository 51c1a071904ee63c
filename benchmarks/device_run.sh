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
  # Kernel compilation, not the GPU, bounds a GPU test run, and it uses one CPU core per process:
  # TEST_SHARDS=N splits the collected tests round-robin over N pytest processes that share the GPU
  # (no preallocation, so N fit). TEST_SHARD_TIMEOUT_S stops every shard in time to report.
  export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
  shards=${TEST_SHARDS:-1}
  # Shard logs stay out of $OUT (only 8 files come back from it); pytest.txt joins them.
  logs=$(mktemp -d)
  python3 -m pytest -q -p no:cacheprovider --collect-only "${@:-tests}" > "$logs/collect.txt" 2>&1
  grep '::' "$logs/collect.txt" > "$logs/nodeids.txt"
  # A collection error (or no test) must show, not pass as an empty run.
  [[ -s $logs/nodeids.txt ]] || { grep -v "^\s*$" "$logs/collect.txt" | tail -n 30 | tee "$logs/pytest-collect.txt"; }
  for ((i = 0; i < shards; i++)); do
    mapfile -t ids < <(awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$logs/nodeids.txt")
    ((${#ids[@]})) || continue
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TEST_SHARD_TIMEOUT_S:-3000}" \
      python3 -m pytest -q -p no:cacheprovider -rfEs "${ids[@]}" > "$logs/pytest-$i.txt" 2>&1 &
  done
  wait
  for f in "$logs"/pytest-*.txt; do echo "== $(basename "$f")"; cat "$f"; done > "$OUT/pytest.txt"
  grep -h -E '^(FAILED|ERROR) ' "$logs"/pytest-*.txt
  summary+=("tests collected: $(wc -l < "$logs/nodeids.txt"), in $shards pytest processes")
  for f in "$logs"/pytest-*.txt; do
    summary+=("$(basename "$f" .txt): $(tail -n 1 "$f")")
  done
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
