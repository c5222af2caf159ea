#!/usr/bin/env bash
# `make test-pythons`: the project on each supported Python, from a clean clone of HEAD each:
# `make setup` (timed), the unit tests, and a quick `mnist run` (the tests' small configuration:
# 1,500 images, one epoch per model). Then the trained weights and the test-set predictions of
# the three runs compared byte for byte. The whole suite runs on the Python `make test` picks.
#
#   bash tests/pythons.sh [3.11 3.12 3.13]     (a version with no interpreter here fails the script)
#
# An interpreter is found as python3.X on PATH (a pyenv shim that does not run is skipped), else
# in pyenv's versions folder. MNIST comes from $MNIST_MIRROR (.ci/run sets it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -gt 0 ]; then versions=("$@"); else versions=(3.11 3.12 3.13); fi
: "${MNIST_MIRROR:?set MNIST_MIRROR to a folder or URL holding the MNIST files (.ci/run does)}"
UNIT_TESTS=(tests/test_config.py tests/test_data.py tests/test_fetch.py tests/test_preprocess.py
            tests/test_models.py tests/test_lock.py tests/test_install.py)

find_python() {
    local v=$1 candidate
    if candidate=$(command -v "python$v") && "$candidate" -c '' 2>/dev/null; then
        echo "$candidate"; return
    fi
    for candidate in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$v".*/bin/python"$v"; do
        [ -x "$candidate" ] && "$candidate" -c '' 2>/dev/null && { echo "$candidate"; return; }
    done
    return 1
}

work=$(mktemp -d /tmp/mnist-pythons.XXXXXX)
trap 'rm -rf "$work"' EXIT
# the tests look for the local mirror beside the project, as in the repository's own folder
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/.." && pwd)/shared" "$work/shared"
summary=()
for v in "${versions[@]}"; do
    python=$(find_python "$v") || { echo "pythons: no Python $v found (PATH, pyenv)" >&2; exit 1; }
    echo "=== Python $v: $python"
    clone="$work/py$v"
    git clone --quiet "$repo" "$clone"
    cd "$clone"
    start=$SECONDS
    make --no-print-directory setup PYTHON="$python" 2>&1 | grep -v "^WARNING: Location" | tail -3
    setup_s=$((SECONDS - start))
    start=$SECONDS
    .venv/bin/python -m pytest -q -p no:cacheprovider "${UNIT_TESTS[@]}" -k "not make_setup_ignores_newer" 2>&1 | tail -3
    unit_s=$((SECONDS - start))
    .venv/bin/python - <<'EOF'
import sys, yaml
sys.path.insert(0, "tests")
from conftest import small_params
raw = yaml.safe_load(open("params.yaml"))
yaml.safe_dump(small_params(raw), open("params.yaml", "w"), sort_keys=False)
EOF
    start=$SECONDS
    env -u PREFECT_API_URL PREFECT_HOME="$work/prefect-$v" .venv/bin/mnist run >"$work/run-$v.log" 2>&1 || {
        tail -40 "$work/run-$v.log"; echo "pythons: mnist run failed on Python $v" >&2; exit 1; }
    run_s=$((SECONDS - start))
    # every model's weights and test-set predictions, as dvc.lock records their md5
    .venv/bin/python - "$work/hashes-$v" <<'EOF'
import sys, yaml
stages = yaml.safe_load(open("dvc.lock"))["stages"]
with open(sys.argv[1], "w") as out:
    for stage, body in sorted(stages.items()):
        for o in body.get("outs", []):
            if o["path"].endswith(("model.keras", "predictions.csv")):
                out.write(f"{o['path']} {o['md5']}\n")
EOF
    cd "$repo"
    summary+=("Python $v ($("$python" -c 'import platform; print(platform.python_version())')): make setup ${setup_s} s, unit tests ${unit_s} s, quick mnist run ${run_s} s")
done

echo "=== summary (CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores)"
printf '%s\n' "${summary[@]}"
first=${versions[0]}
for v in "${versions[@]:1}"; do
    if cmp -s "$work/hashes-$first" "$work/hashes-$v"; then
        echo "Python $v: every model.keras and predictions.csv the same bytes as on Python $first"
    else
        echo "Python $v: differs from Python $first in:"
        diff "$work/hashes-$first" "$work/hashes-$v" | grep '^>' | cut -c3- | cut -d' ' -f1 | sed 's/^/  /'
    fi
done
