#!/usr/bin/env bash
# Run the README's test command while BURNERS CPU-bound processes (default 4) keep every core busy, to show
# that no test depends on an idle machine. Extra arguments go to pytest (default: the whole suite, `test`).
# Usage: bash scripts/loaded_test_run.sh [pytest args...]    e.g. BURNERS=8 bash scripts/loaded_test_run.sh test/test_nodes.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. install/env.sh

burners=()
stop_burners() {
    if ((${#burners[@]})); then
        kill "${burners[@]}" 2>/dev/null || true
        wait "${burners[@]}" 2>/dev/null || true
    fi
}
trap stop_burners EXIT
trap 'exit 130' INT TERM

for _ in $(seq "${BURNERS:-4}"); do
    python -c 'while 1: pass' &
    burners+=("$!")
done
echo "loaded_test_run: ${#burners[@]} CPU burners running (pids ${burners[*]}); load average $(cut -d' ' -f1-3 /proc/loadavg)"
start=$SECONDS
status=0
python -m pytest -q "${@:-test}" || status=$?
echo "loaded_test_run: pytest exit status ${status} after $((SECONDS - start)) s with ${#burners[@]} burners; load average $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
