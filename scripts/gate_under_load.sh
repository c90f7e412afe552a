#!/usr/bin/env bash
# Run the pre-merge gate (the README's test command) several times while CPU-bound processes
# compete for the cores, as on a shared, loaded CI machine. A red/green test whose answer
# depends on machine speed shows up here.
#
#   scripts/gate_under_load.sh [-n BUSY] [-r RUNS] [-- PYTEST_ARGS...]
#
#   -n BUSY   CPU-bound busy processes (`python3 -c "while True: pass"`) beside the gate (default 2)
#   -r RUNS   how many times the gate runs (default 3)
#   PYTEST_ARGS replace the gate's `-n auto` (e.g. `-- -n auto -m overfit_stage1` to try a subset)
#
# Prints each run's wall time and result, then a summary. Exits 0 only when every run passed.
# The busy processes are stopped on every exit (normal end, failure, Ctrl-C).
set -uo pipefail
cd "$(dirname "$0")/.."

busy=2
runs=3
while getopts "n:r:h" opt; do
  case "$opt" in
    n) busy="$OPTARG" ;;
    r) runs="$OPTARG" ;;
    h) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gate_under_load: usage: $0 [-n BUSY] [-r RUNS] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
for value in "$busy" "$runs"; do
  case "$value" in
    ''|*[!0-9]*) echo "gate_under_load: -n and -r take a whole number, got '$value'" >&2; exit 2 ;;
  esac
done
if [ "$runs" -lt 1 ]; then
  echo "gate_under_load: -r must be >= 1, got $runs" >&2
  exit 2
fi
pytest_args=("$@")
[ ${#pytest_args[@]} -eq 0 ] && pytest_args=(-n auto)

busy_pids=()
stop_busy() {
  for pid in "${busy_pids[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${busy_pids[@]}"; do
    wait "$pid" 2>/dev/null
  done
  busy_pids=()
}
trap stop_busy EXIT
trap 'stop_busy; exit 130' INT
trap 'stop_busy; exit 143' TERM

for _ in $(seq 1 "$busy"); do
  python3 -c "while True: pass" &
  busy_pids+=("$!")
done
echo "gate_under_load: $busy busy process(es) (pids ${busy_pids[*]:-none}) on $(nproc) core(s); $runs run(s) of: scripts/bootstrap.sh && .venv/bin/python -m pytest ${pytest_args[*]}"

failed=0
results=()
for run in $(seq 1 "$runs"); do
  start=$(date +%s)
  log=$(mktemp -t gate_under_load.XXXXXX)
  scripts/bootstrap.sh && .venv/bin/python -m pytest "${pytest_args[@]}" >"$log" 2>&1
  code=$?
  # bootstrap failing leaves the log empty: its own messages went to the terminal
  wall=$(( $(date +%s) - start ))
  summary=$(grep -E "(passed|failed|errors?|no tests ran).* in [0-9.]+s" "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  if [ "$code" -eq 0 ]; then
    verdict="PASSED"
  else
    verdict="FAILED (exit $code)"
    failed=$((failed + 1))
    grep -E "^(FAILED|ERROR) " "$log" | head -20
    verdict="$verdict, log $log"
  fi
  line="run $run/$runs: ${wall} s, $verdict: ${summary:-no pytest summary}"
  echo "$line"
  results+=("$line")
  [ "$code" -eq 0 ] && rm -f "$log"
done

echo "gate_under_load: summary ($busy busy process(es))"
printf '  %s\n' "${results[@]}"
if [ "$failed" -gt 0 ]; then
  echo "gate_under_load: $failed of $runs run(s) failed" >&2
  exit 1
fi
echo "gate_under_load: all $runs run(s) passed"
