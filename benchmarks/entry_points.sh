#!/usr/bin/env bash
# `dvc repro` and a queued experiment against `mnist run`, in one fresh clone of HEAD, one after the other:
#   bash benchmarks/entry_points.sh default|quick OUTDIR
# runs `mnist run --force`, a bare `dvc repro --force` twice (no PREFECT_API_URL: the first starts the
# project's Prefect and warm stage servers in the background, the second finds them), then one queued
# experiment (`dvc exp run --queue --force`, `dvc queue start`, until the queue is empty), and prints the
# seconds of each and their ratios to `mnist run`'s. quick: 2,000 images, one epoch per model.
# Needs MNIST_MIRROR (or the internet); uses its own PREFECT_HOME and Prefect port 4311.
set -euo pipefail
kind=${1:?default or quick}; out=$(mkdir -p "${2:?output folder}" && cd "$2" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$repo/.venv/bin:$PATH" PREFECT_HOME="$out/prefect-home" MNIST_PREFECT_PORT=4311
unset PREFECT_API_URL PREFECT_API_AUTH_STRING SHELL  # DVC then runs each stage with /bin/sh, as on a fresh machine
rm -rf "$out/clone" && git clone -q "$repo" "$out/clone" && cd "$out/clone"
if [ "$kind" = quick ]; then
  python - <<'PY'
import sys, yaml
sys.path.insert(0, "tests")
from conftest import small_params
raw = small_params(yaml.safe_load(open("params.yaml")))
raw["data"]["limit"], raw["data"]["val_size"] = 2000, 400
open("params.yaml", "w").write(yaml.safe_dump(raw, sort_keys=False))
PY
  git -c user.name=bench -c user.email=bench@localhost commit -qam "quick configuration"
fi
export PYTHONPATH=$PWD
: > "$out/times.txt"
timed() {
  local name=$1 start; shift; start=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1 || { echo "$name failed: $out/$name.log" >&2; exit 1; }
  echo "$name $(echo "$(date +%s.%N) - $start" | bc)" >> "$out/times.txt"
}
queued() {
  local status
  dvc exp run --queue --force --name bench && dvc queue start
  while status=$(dvc queue status) && grep -qE "Queued|Running" <<< "$status"; do sleep 1; done
  grep -q Success <<< "$status"
}
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
timed mnist-run-force mnist run --force
timed bare-repro-force-1 dvc repro --force
timed bare-repro-force-2 dvc repro --force
timed queued-experiment-force queued
mnist dashboards --stop > "$out/stop.log" 2>&1
awk 'NR == 1 { base = $2 } { printf "%-24s %7.1f s  %.2fx\n", $1, $2, $2 / base }' "$out/times.txt"
