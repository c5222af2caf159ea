"""What the benchmarks share: result rows, the run context, machine facts, timed subprocesses."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    subject: str
    figure: float | None  # None: not measured (the note says why)
    unit: str
    note: str = ""


@dataclass
class Context:
    """What one `python -m benchmarks` run shares between the benchmarks."""

    quick: bool
    tmp: Path  # scratch folder of this run, deleted at the end
    stack: ExitStack  # closes what the benchmarks started (the Prefect server)
    run_id: str | None = None  # the pipeline run in Prefect's database for orchestration (c); None: the latest complete
    shared: dict[str, Any] = field(default_factory=dict)  # results one benchmark hands to another
    details: dict[str, Any] = field(default_factory=dict)  # raw figures per benchmark, for results.json

    def prefect_api(self) -> str:
        """The API URL of a Prefect server for this run, started on first use on a free port."""
        if "prefect_api" not in self.shared:
            from pipeline.servers import prefect_server

            home = self.tmp / "prefect-server-home"
            home.mkdir(exist_ok=True)
            start = time.perf_counter()
            with environ(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false"):
                api = self.stack.enter_context(prefect_server("127.0.0.1", free_port(), log=home / "server.log"))
            self.shared["prefect_api"] = api
            self.shared["prefect_server_start_s"] = time.perf_counter() - start
        return self.shared["prefect_api"]


# --- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mnist_mirror() -> Path | None:
    """A local folder holding the four MNIST files: $MNIST_MIRROR, ../shared/datasets/mnist, or data/raw."""
    for candidate in (os.environ.get("MNIST_MIRROR"), REPO.parent / "shared" / "datasets" / "mnist", REPO / "data" / "raw"):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("train-images-idx3-ubyte*")):
            return Path(candidate)
    return None


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a helper process: the venv first on PATH, the repo importable, quiet TF logs."""
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PREFECT_API_URL", None)  # each caller says which Prefect it wants
    env.update(extra)
    return env


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- timed, measured subprocesses --------------------------------------------------------------


@dataclass
class Measured:
    """One helper process: wall seconds seen from outside, its peak RSS, how it ended."""

    wall_s: float
    peak_rss_mb: float | None
    returncode: int
    output: str  # the tail of stdout + stderr


def run_measured(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 600) -> Measured:
    """Run `python <args>` under benchmarks.peak_rss; wall time includes interpreter start and imports.

    `args` is what follows `python`: a script path and its arguments, or `-m module ...`.
    """
    rss_file = cwd / f".peak-rss-{time.monotonic_ns()}.json"
    cmd = [PYTHON, "-m", "benchmarks.peak_rss", str(rss_file), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    peak = None
    if rss_file.exists():
        peak = json.loads(rss_file.read_text())["peak_rss_mb"]
        rss_file.unlink()
    return Measured(wall, peak, done.returncode, (done.stdout + done.stderr)[-3000:])


# --- the machine --------------------------------------------------------------------------------


def cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (empty where there is none)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    info = {}
    for line in block.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import keras
    import tensorflow as tf

    cpu = cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_mhz": float(cpu["cpu MHz"]) if "cpu MHz" in cpu else None,
        "simd": sorted(f for f in ("fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "os": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(info: dict[str, Any]) -> str:
    """The machine in one line, to print beside every figure: CPU model, vector extensions, cores.

    The family and model numbers tell apart CPUs sold under one name (two AVX-512 "AMD EPYC"s of
    different generations ran this project's figures); AMX is named when it is missing too.
    """
    cpu = info["cpu_model"]
    if info.get("cpu_family") and info.get("cpu_model_number"):
        cpu += f" (family {info['cpu_family']}, model {info['cpu_model_number']})"
    simd = ", ".join(info["simd"])
    if not simd:
        simd = "no AVX2 or AVX-512"
    elif "avx512f" not in info["simd"]:
        simd += ", no AVX-512"
    if "amx_tile" not in info["simd"]:
        simd += ", no AMX"
    return f"{cpu}, {simd}, {info['cores']} cores"


# --- output ------------------------------------------------------------------------------------


def format_figure(value: float | None) -> str:
    """A figure with about three significant digits; '-' when not measured."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def format_table(rows: list[Row]) -> str:
    """The rows as one aligned text table."""
    header = ["benchmark", "subject", "figure", "unit", "note"]
    cells = [[r.benchmark, r.subject, format_figure(r.figure), r.unit, r.note] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]
    lines = []
    for i, c in enumerate([header, *cells]):
        lines.append(
            "  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].rjust(widths[2]), c[3].ljust(widths[3]), c[4]]).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
