"""The short form of `make chaos`: one kill per signal, one start-up of the dashboards, two runs at
once, on the quick configuration with one model, at the moments of one fixed seed (MNIST_CHAOS_SEED picks
another; `make chaos` draws a new one each time), so a failure here happens again with the same seed.

Its other cases (a Prefect server killed mid-run, full disks, damaged files) each have a test of
their own in test_faults.py, with stricter checks, so they are left out here to keep CI short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, project_env

SHORT = ("sigkill", "sigterm", "two-at-once", "dashboards")
SEED = 20261207


def test_short_chaos_recovers_every_case_with_nothing_left_over(tmp_path: Path) -> None:
    seed = int(os.environ.get("MNIST_CHAOS_SEED", SEED))
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.chaos",
            "--kills",
            "1",
            "--models",
            "logreg",
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--cases",
            ",".join(SHORT),
        ],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, f"seed {seed}:\n{report}"
    cases = {case["name"]: case for case in json.loads(out.read_text())["cases"]}
    assert set(cases) == set(SHORT), report
    for case in cases.values():
        assert case["recovered"] and not (case["mismatches"] or case["leftovers"] or case["orphans"]), f"seed {seed}: {case}"
    assert cases["dashboards"]["faults"] >= 1, report
    assert "no AVX-512" in done.stdout or "avx512f" in done.stdout, report  # the machine's vector extensions, beside the figures


def test_the_machine_line_names_the_cpu_and_its_vector_extensions() -> None:
    from benchmarks.common import describe

    base = {"cpu_model": "AMD EPYC", "cores": 2}
    assert describe({**base, "simd": ["avx2", "fma"]}) == "AMD EPYC, avx2, fma, no AVX-512, no AMX, 2 cores"
    assert (
        describe({**base, "simd": ["avx2", "avx512_bf16", "avx512f", "fma"]})
        == "AMD EPYC, avx2, avx512_bf16, avx512f, fma, no AMX, 2 cores"
    )
    assert describe({**base, "simd": []}) == "AMD EPYC, no AVX2 or AVX-512, no AMX, 2 cores"
    xeon = {"cpu_model": "Intel(R) Xeon(R)", "cpu_family": "6", "cpu_model_number": "143", "cores": 16}
    assert describe({**xeon, "simd": ["amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"]}) == (
        "Intel(R) Xeon(R) (family 6, model 143), amx_tile, avx2, avx512_bf16, avx512f, fma, 16 cores"
    )
