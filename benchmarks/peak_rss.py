"""Run a Python script or module in this process and write its peak RSS to a JSON file at exit.

    python -m benchmarks.peak_rss OUT.json stages/fetch.py --out ... --tensorboard ...
    python -m benchmarks.peak_rss OUT.json -m benchmarks.plain_fetch --out ...

The peak is the larger of this process's VmHWM (/proc/self/status: the RSS high-water mark of
its memory since exec) and getrusage's ru_maxrss of the children it waited for (such as
export's fresh-process check). Not this process's own ru_maxrss: Linux carries the parent's
RSS at fork time over into it, so a child of a big benchmark process would report that.
The script runs as `__main__` with the given argv, so a stage behaves as under `dvc repro`.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
from pathlib import Path


def high_water_kib() -> int:
    """VmHWM of this process in KiB: its peak RSS since exec (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb() -> float:
    """Peak RSS in MB of this process or of any child it waited for (both in KiB on Linux)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(high_water_kib(), children) / 1024


def main(argv: list[str]) -> int:
    """Run argv[1:] as `python argv[1:]`; write {"peak_rss_mb": ...} to argv[0]; return the exit status."""
    out, target = Path(argv[0]), argv[1:]
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = target
            sys.path.insert(0, str(Path(target[0]).resolve().parent))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        out.write_text(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
