#!/usr/bin/env bash
# The tests that start services (service, faults, access, service start, helm's serve deploy),
# RUNS times in a row (default 5) while one CPU-burning process per core keeps the machine busy.
# Prints each run's result and "passed N of RUNS"; logs in runs/stress/. Exit 0 only if all passed.
#   tests/stress.sh [RUNS]        (make stress)
# The burners run at the niceness Ray gives its workers (RAY_worker_niceness, 15): at nice 0 they
# would leave a replica ~3% of a core (CFS weights 1024 vs 36), a 30x slowdown that measures the
# scheduler rather than the tests. BURNER_NICE=0 tests/stress.sh runs that harsher case.
set -u
cd "$(dirname "$0")/.."
runs=${1:-5}
py=${PY:-.venv/bin/python}
logs=runs/stress
mkdir -p "$logs"
burners=()
for _ in $(seq "$(nproc)"); do
  nice -n "${BURNER_NICE:-15}" "$py" -c "while True: pass" &
  burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null' EXIT
passed=0
for run in $(seq "$runs"); do
  start=$(date +%s)
  if "$py" -m pytest -q -p no:cacheprovider tests/test_service.py tests/test_faults.py tests/test_access.py \
      tests/test_service_start.py tests/test_helm.py >"$logs/run-$run.log" 2>&1; then
    passed=$((passed + 1))
    result=passed
  else
    result="FAILED (see $logs/run-$run.log)"
  fi
  echo "run $run: $result in $(($(date +%s) - start)) s, $(tail -1 "$logs/run-$run.log")"
done
echo "passed $passed of $runs with $(nproc) CPU burners"
[ "$passed" -eq "$runs" ]
