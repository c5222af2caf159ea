"""The fan-out's commands and parameters: no credentials in what the server stores or the logs show,
and a command past its time limit ends with everything it started. No server needed."""

from __future__ import annotations

import hashlib
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


# --- a worker's own workspace: reused, or rebuilt when it cannot be trusted ------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def origin(tmp_path: Path) -> tuple[str, list[str]]:
    """A bare git origin with two commits (README.md and dvc.lock change between them), and their hashes."""
    source = tmp_path / "source"
    source.mkdir()
    git(source, "init", "-q")
    (source / ".dvc").mkdir()
    (source / ".dvc" / ".gitignore").write_text("/cache\n/tmp\n/config.local\n")  # as `dvc init` writes it
    commits = []
    for text in ("one\n", "two\n"):
        (source / "README.md").write_text(text)
        (source / "dvc.lock").write_text(text)
        git(source, "add", ".")
        git(source, "commit", "-qm", text)
        commits.append(git(source, "rev-parse", "HEAD").strip())
    subprocess.run(["git", "clone", "-q", "--bare", str(source), str(tmp_path / "origin.git")], check=True)
    return str(tmp_path / "origin.git"), commits


def put_object(workspace: Path, data: bytes) -> Path:
    """`data` as an object of `workspace`'s DVC cache, named by its MD5 as DVC names it."""
    digest = hashlib.md5(data).hexdigest()
    path = workspace / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def take(repo: str, commit: str) -> tuple[Path, str]:
    with fanout.chain_workspace(repo, commit, "w1") as (workspace, how):
        return workspace, how


def test_a_worker_keeps_its_workspace_between_chains_and_checks_out_each_commit(
    origin: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fanout.WORKSPACES_ENV, str(tmp_path / "workspaces"))
    repo, (first, second) = origin
    workspace, how = take(repo, first)
    assert how == "new" and (workspace / "README.md").read_text() == "one\n"
    kept = put_object(workspace, b"prepared data")  # what an earlier chain pulled
    (workspace / "dvc.lock").write_text("written by dvc repro\n")  # DVC's own writes do not count as changes
    (workspace / "data").mkdir()
    (workspace / "data" / "out.txt").write_text("an output\n")
    again, how = take(repo, second)
    assert (again, how) == (workspace, "reused")
    assert (workspace / "README.md").read_text() == "two\n" and (workspace / "dvc.lock").read_text() == "two\n"
    assert kept.read_bytes() == b"prepared data"
    with fanout.chain_workspace(repo, first, "w1") as (held, _):  # a second chain at once gets a clone of its own
        with fanout.chain_workspace(repo, first, "w1") as (other, how):
            assert other != held and how.startswith("new") and (other / "README.md").read_text() == "one\n"
        assert not other.exists()
    assert take(repo, first)[0] == workspace


@pytest.mark.parametrize("fault", ["edited", "untracked", "damaged", "other origin"])
def test_a_workspace_that_cannot_be_trusted_is_rebuilt(
    fault: str, origin: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fanout.WORKSPACES_ENV, str(tmp_path / "workspaces"))
    repo, (first, second) = origin
    workspace, _ = take(repo, first)
    good = put_object(workspace, b"an object")
    stray = workspace / "stray.py"
    if fault == "edited":
        (workspace / "README.md").write_text("edited by hand\n")
    elif fault == "untracked":
        stray.write_text("import os\n")
    elif fault == "damaged":
        damaged = put_object(workspace, b"prepared data")
        damaged.write_bytes(b"prepared dat\x00")
    else:
        git(workspace, "remote", "set-url", "origin", str(tmp_path / "elsewhere.git"))
    expected = {
        "edited": "files were changed in it: README.md",
        "untracked": "files were changed in it: stray.py",
        "damaged": "its DVC cache is damaged: ",
        "other origin": "it was cloned from ",
    }[fault]
    assert expected in (fanout.workspace_problem(workspace, repo) or "")
    again, how = take(repo, second)
    assert again == workspace and how.startswith(f"rebuilt: {expected}"), how
    assert (workspace / "README.md").read_text() == "two\n" and not stray.exists() and not good.exists()
    assert fanout.workspace_problem(workspace, repo) is None
