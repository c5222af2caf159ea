"""The stages that build no model (fetch, preprocess, report) load neither TensorFlow nor Keras: each is
imported alone in a fresh Python process, which then lists the ones it loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras")
LOADED = "import json, sys\nimport {module}\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"


@pytest.mark.parametrize("module", ["stages.fetch", "stages.preprocess", "stages.report"])
def test_stage_imports_no_tensorflow_or_keras(module: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module, heavy=HEAVY)],
        cwd=REPO,
        env={**os.environ, "PREFECT_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [], f"importing {module} loads TensorFlow or Keras"
