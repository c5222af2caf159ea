#!/usr/bin/env bash
# make setup's first step: the Python it would use is there, is 3.11, 3.12 or 3.13, and is the one
# an existing venv was made with. Each failure says what to do; nothing is changed.
set -uo pipefail
supported="3.11, 3.12 or 3.13"
if [ -z "${PYTHON:-}" ]; then
    echo "make setup: no python3.13, python3.12 or python3.11 on PATH runs." >&2
    echo "  Install one (Debian/Ubuntu: apt-get install python3-venv), or name it: make setup PYTHON=/path/to/python3.12" >&2
    exit 1
fi
if ! version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "make setup: PYTHON=$PYTHON does not run. Name a Python $supported: make setup PYTHON=python3.12" >&2
    exit 1
fi
case "$version" in
    3.11|3.12|3.13) ;;
    *) echo "make setup: PYTHON=$PYTHON is Python $version; this project supports $supported." >&2
       echo "  Name one: make setup PYTHON=python3.12" >&2
       exit 1 ;;
esac
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "make setup: $PYTHON has no venv/ensurepip (Debian/Ubuntu: apt-get install python$version-venv)." >&2
    exit 1
fi
if [ -x "$VENV/bin/python" ]; then
    had=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)
    if [ "$had" != "$version" ]; then
        echo "make setup: $VENV was made with Python $had, and PYTHON=$PYTHON is $version." >&2
        echo "  To switch, remove it first: rm -rf $VENV && make setup PYTHON=$PYTHON" >&2
        exit 1
    fi
fi
