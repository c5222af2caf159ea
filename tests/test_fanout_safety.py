"""The fan-out's commands and parameters: no credentials in what the server stores or the logs show,
and a command past its time limit ends with everything it started. No server needed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import fanout
from pipeline.errors import PipelineError


@pytest.mark.parametrize(
    "url", ["https://user:tok3n@git.example/repo.git", "https://tok3n@git.example/repo.git", "ssh://user:tok3n@host/srv/remote"]
)
def test_a_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    with pytest.raises(PipelineError) as refused:
        fanout.refuse_credentials(url, "DVC remote")
    assert "carries credentials" in str(refused.value) and "tok3n" not in str(refused.value)


@pytest.mark.parametrize("url", ["ssh://git@host/repo.git", "https://git.example/repo.git", "s3://bucket/path", "/srv/remote"])
def test_a_url_without_credentials_passes(url: str) -> None:
    assert fanout.refuse_credentials(url, "DVC remote") == url


def test_the_default_remote_with_a_password_never_becomes_a_parameter(tmp_path: Path) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "remote", "add", "-d", "shared", "https://mnist:s3cret@dvc.example/store"], cwd=tmp_path, check=True)
    with pytest.raises(PipelineError) as refused:
        fanout.default_remote(tmp_path)
    assert "s3cret" not in str(refused.value) and "dvc remote modify --local" in str(refused.value)


def test_the_workers_get_the_remotes_address_and_region_and_none_of_its_credentials(tmp_path: Path) -> None:
    """An S3-compatible remote: its endpoint URL and region reach a worker's workspace; its keys (in
    config.local, as `dvc remote modify --local` puts them) do not."""
    dvc = Path(sys.executable).parent / "dvc"
    coordinator, worker = tmp_path / "coordinator", tmp_path / "worker"
    for folder in (coordinator, worker):
        folder.mkdir()
        subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=folder, check=True)
    for args in (
        ["remote", "add", "-d", "shared", "s3://mnist/dvc"],
        ["remote", "modify", "shared", "endpointurl", "http://127.0.0.1:9000"],
        ["remote", "modify", "shared", "region", "eu-west-3"],
        ["remote", "modify", "--local", "shared", "access_key_id", "AKIDSECRET"],
        ["remote", "modify", "--local", "shared", "secret_access_key", "s3cret"],
    ):
        subprocess.run([dvc, *args], cwd=coordinator, check=True, capture_output=True)
    remote = fanout.default_remote(coordinator)
    assert {k: remote[k] for k in ("url", "endpointurl", "region")} == {
        "url": "s3://mnist/dvc",
        "endpointurl": "http://127.0.0.1:9000",
        "region": "eu-west-3",
    }
    assert "s3cret" not in str(remote) and "AKIDSECRET" not in str(remote)
    fanout.add_remote(worker, remote)
    assert fanout.default_remote(worker) == remote


def test_a_failed_commands_message_masks_the_credentials_in_its_urls(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as failed:
        fanout.command(["git", "ls-remote", "http://mnist:s3cret@127.0.0.1:1/repo.git"], tmp_path)
    assert "s3cret" not in str(failed.value) and "http://***@127.0.0.1:1/repo.git" in str(failed.value)


def test_a_command_past_its_time_limit_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(PipelineError, match="took longer than"):
        fanout.command(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], tmp_path, timeout_s=2)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, f"the command's child {pid} outlived the time limit"
        time.sleep(0.1)


CHAINS_YAML = """\
stages:
  train:
    foreach: [a, b]
    do:
      cmd: echo trained > ${item}.model
      deps: [seed.txt]
      outs:
        - ${item}.model
  evaluate:
    foreach: [a, b]
    do:
      cmd: echo evaluated > ${item}.metrics
      deps:
        - ${item}.model
      outs:
        - ${item}.metrics
  export:
    foreach: [a, b]
    do:
      cmd: echo exported > ${item}.export
      deps:
        - ${item}.model
      outs:
        - ${item}.export
"""


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_the_stale_models_are_those_whose_chain_dvc_status_reports(tmp_path: Path) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(CHAINS_YAML)
    (tmp_path / "seed.txt").write_text("seed\n")
    assert fanout.stale_models(tmp_path, ["a", "b"]) == ["a", "b"]
    subprocess.run([dvc, "repro", *fanout.chain_targets("a")], cwd=tmp_path, check=True, capture_output=True)
    assert fanout.stale_models(tmp_path, ["a", "b"]) == ["b"]
    (tmp_path / "a.metrics").write_text("changed\n")
    assert fanout.stale_models(tmp_path, ["a", "b"]) == ["a", "b"]
    (tmp_path / "dvc.yaml").write_text("stages: [")
    with pytest.raises(PipelineError, match="`dvc status` failed"):
        fanout.stale_models(tmp_path, ["a"])
