#!/usr/bin/env bash
# The GPU check behind the README's "Mixed precision and GPUs", for a machine with an NVIDIA GPU
# after `make setup-gpu`. In order, each step's output in OUT/<step>.log and one line per step in
# OUT/summary.txt (exit status and seconds):
#   devices      the GPU (nvidia-smi) and what TensorFlow sees, with TensorFlow's own log
#   fetch, preprocess, train-<model>, evaluate-<first model>
#                the stages as dvc.yaml runs them, with params.yaml as it is, into a scratch
#                folder (the workspace's data/ is left alone)
#   determinism  tests/test_train.py's two fresh runs (same weights, bit for bit) and the resumed
#                run after a SIGKILL (the same weights as the uninterrupted one), on this machine
#   throughput   python -m benchmarks --quick --only throughput
#
#   bash benchmarks/gpu_check.sh [OUT]          OUT defaults to /tmp/gpu-check
#   PYTHON=... MODELS="cnn mlp" MNIST_MIRROR=... bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mkdir -p "${1:-/tmp/gpu-check}" && cd "${1:-/tmp/gpu-check}" && pwd)
MODELS=${MODELS:-cnn mlp deep_mlp}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT  # the scratch folder goes, however the script ends
# The determinism test runs three trainings side by side: each takes GPU memory as it needs it,
# instead of TensorFlow's default of nearly all of it for the first process.
export TF_FORCE_GPU_ALLOW_GROWTH=true
: > "$OUT/summary.txt"

step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, note its exit status and seconds
    local name=$1 start=$EPOCHREALTIME rc
    shift
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    awk -v n="$name" -v rc="$rc" -v a="$start" -v b="$EPOCHREALTIME" \
        'BEGIN { printf "%-22s exit %-3s %7.1f s\n", n, rc, b - a }' | tee -a "$OUT/summary.txt"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv > "$OUT/gpu.csv" 2>&1
step devices env TF_CPP_MIN_LOG_LEVEL=0 "$PY" -c '
import tensorflow as tf
info = tf.sysconfig.get_build_info()
print("tensorflow", tf.__version__, "built for CUDA", info.get("cuda_version"), info.get("cuda_compute_capabilities"))
gpus = tf.config.list_physical_devices("GPU")
print("GPUs:", gpus)
for gpu in gpus:
    print(tf.config.experimental.get_device_details(gpu))
a = tf.random.stateless_normal((4096, 4096), seed=(1, 2))
print("matmul on", (a @ a).device)
'
step fetch "$PY" stages/fetch.py --out "$W/raw" --tensorboard "$W/tb/fetch"
step preprocess "$PY" stages/preprocess.py --raw "$W/raw" --out "$W/prepared" --report "$W/data_report.json" \
    --tensorboard "$W/tb/preprocess"
first=
for m in $MODELS; do
    first=${first:-$m}
    step "train-$m" "$PY" stages/train.py "$m" --data "$W/prepared" --out "$W/models/$m" --live "$W/live/$m" \
        --resume "$W/resume/$m" --tensorboard "$W/tb/train/$m"
    cp "$W/models/$m/meta.json" "$OUT/meta-$m.json" 2>/dev/null
    cp "$W/models/$m/timings.json" "$OUT/timings-$m.json" 2>/dev/null
done
step "evaluate-$first" "$PY" stages/evaluate.py "$first" --model-dir "$W/models/$first" --live "$W/live/$first" \
    --data "$W/prepared" --out "$W/evaluate/$first" --tensorboard "$W/tb/evaluate/$first"
cp "$W/evaluate/$first/metrics.json" "$OUT/metrics-$first.json" 2>/dev/null
step determinism "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py \
    -k "two_fresh_runs or resumed_run_continues"
step throughput "$PY" -m benchmarks --quick --only throughput --out "$OUT/throughput.json"

# one line per trained model: device, policy, epochs, training seconds, validation accuracy
"$PY" - "$OUT" $MODELS <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for m in sys.argv[2:]:
    try:
        meta, timings = (json.loads((out / f"{kind}-{m}.json").read_text()) for kind in ("meta", "timings"))
    except OSError:
        print(f"{m}: not trained")
        continue
    print(f"{m}: {meta['device']}, {meta['precision']}, {meta['epochs']} epochs, {timings['train_seconds']} s "
          f"(epochs {timings['epoch_seconds']}), val_accuracy {meta['val_accuracy']:.4f}")
EOF
