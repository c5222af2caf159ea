"""The install: what `make setup` puts in the venv is the lock, whatever pip and the index hold.

`test_installed_packages_are_the_lock` reads this venv. `test_make_setup_ignores_newer_releases`
runs `make setup` into a fresh venv made by the Python this venv was made from (its bundled pip,
23.2.1 on Python 3.11.7), with a local index on 127.0.0.1 that offers an httpx newer than the
lock's: a pip that resolves Prefect's `httpx[http2]` itself takes it, and hash mode refuses the
install. About a minute: every locked wheel is installed again (from pip's download cache).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from helpers import REPO, serve_directory

LOCKS = ("runtime.lock", "test.lock")
NEWER_HTTPX = "0.99.0"


def locked_versions(*names: str) -> dict[str, str]:
    """{package: version} of the lock files' lines whose environment markers hold here."""
    pins: dict[str, str] = {}
    for name in names:
        for line in (REPO / "requirements" / name).read_text().splitlines():
            if not line or line[0] in " #-":
                continue
            requirement, _, marker = line.rstrip(" \\").partition(";")
            if marker.strip() and not Marker(marker.strip()).evaluate():
                continue
            package, version = requirement.strip().split("==")
            pins[canonicalize_name(package)] = version
    return pins


def installed_versions(python: Path) -> dict[str, str]:
    """{package: version} of every distribution in the venv of `python` but the project itself."""
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'], d.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {canonicalize_name(n): v for n, v in (line.split() for line in out.splitlines())}
    found.pop("mnist-pipeline", None)
    return found


def test_installed_packages_are_the_lock() -> None:
    expected = locked_versions("bootstrap.lock", *LOCKS)
    assert installed_versions(Path(sys.executable)) == expected


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty but valid wheel `name`==`version` (METADATA, WHEEL and RECORD only)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def base_python() -> Path:
    """The interpreter this venv was made from (the one `make setup` found)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.base_prefix) / "bin" / version


def test_make_setup_ignores_newer_releases(tmp_path: Path) -> None:
    index = tmp_path / "index"
    (index / "httpx").mkdir(parents=True)
    wheel = fake_wheel(index / "httpx", "httpx", NEWER_HTTPX)
    (index / "httpx" / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PIP_"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    with serve_directory(index) as url:
        env["PIP_EXTRA_INDEX_URL"] = url  # beside the user's index: pip sees both
        done = subprocess.run(
            ["make", "--no-print-directory", "setup", f"VENV={venv}", f"PYTHON={base_python()}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    installed = installed_versions(venv / "bin" / "python")
    assert installed["httpx"] == locked_versions(*LOCKS)["httpx"]
    assert installed == locked_versions("bootstrap.lock", *LOCKS)


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("", "no python3.13, python3.12 or python3.11 on PATH runs"),
        ("/nonexistent/python3", "does not run"),
        ("old-python", "is Python 3.10; this project supports 3.11, 3.12 or 3.13"),
    ],
)
def test_make_setup_names_a_missing_python(tmp_path: Path, python: str, message: str) -> None:
    if python == "old-python":  # answers the version question as a Python 3.10 would
        python = str(tmp_path / python)
        Path(python).write_text("#!/bin/sh\necho 3.10\n")
        Path(python).chmod(0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", "setup", f"VENV={tmp_path / 'venv'}", f"PYTHON={python}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "venv").exists()


def test_missing_system_packages_end_the_run_in_one_line() -> None:
    import system

    assert set(system.packages()) == {"chromium", "openssh-server", "postgresql", "socat"}
    reasons = ["needs Debian's chromium (sudo make system-packages)"] * 3 + [
        "needs Debian's openssh-server (sudo make system-packages)",
        "some other reason",
    ]
    assert system.summary(reasons) == (
        "skipped for want of Debian packages: chromium (3 tests), openssh-server (1 test); "
        "install them with: sudo make system-packages"
    )
    assert system.summary(["some other reason"]) is None
