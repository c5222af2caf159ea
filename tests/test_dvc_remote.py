"""DVC with real remotes: a local folder and an SSH server, pushed to from the small run, pulled into fresh clones.

- Local folder: `dvc push --run-cache`, then a fresh `git clone` pulls everything back: up to date,
  `mnist predict` works, every TensorBoard output is there.
- Run-cache: a clone without dvc.lock reproduces the pipeline from the remote's run-cache
  (`dvc repro --pull`) without running a stage; a param changed and changed back restores again.
- SSH: a throwaway /usr/sbin/sshd on a free port of 127.0.0.1 (its own config, host key and
  client key in a temporary folder), reached by dvc-ssh with the client key.
- S3: moto's S3 server on 127.0.0.1 (tests/s3.py), reached by dvc-s3 through the remote's
  endpointurl and region, with its keys in the environment.

A clone gets by copy what a clone of the real project gets from git but the small run's copy
does not commit: params.yaml, and where the test says so dvc.lock, the outputs DVC leaves to git
(`cache: false`) and the .gitignore files DVC writes beside its outputs. Remotes are added with `--local` (.dvc/config.local), so the small run's
committed config and its default remote stay as they are for the other tests.

The small run's copy commits the project's own dvc.lock (the full default run's). A clone
"without dvc.lock" deletes it: where dvc.lock matches a stage's deps and params, DVC restores
the outputs dvc.lock names and never looks in the run-cache, so fetch (whose deps and params are
the full run's) would run again, its full-run outputs being on no remote of the test.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import SmallRun, edit_params, free_port, project_env
from s3 import REGION, S3_ENV, keys_in, make_bucket, s3_server
from system import needs

SSHD = Path("/usr/sbin/sshd")
MNIST = Path(sys.executable).parent / "mnist"
# The stages whose every output DVC caches: a fresh clone restores them from the run-cache.
CACHED_STAGES = ("fetch", "preprocess", "train", "evaluate", "export")
DVC_TIMEOUT = 1200  # seconds for one dvc command (a repro trains a model)
SSHD_START_TIMEOUT = 30.0


# --- helpers --------------------------------------------------------------------------------


def tail(text: str, chars: int = 4000) -> str:
    """The last `chars` characters of `text`, for assertion messages."""
    return text if len(text) <= chars else "..." + text[-chars:]


def run_dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `dvc ARGS` in `project` under a deadline; fail, showing DVC's output, if it fails."""
    try:
        done = subprocess.run(
            ["dvc", *args],
            cwd=project,
            env={**(env or project_env()), "PYTHONPATH": str(project)},  # the clone's own code
            capture_output=True,
            text=True,
            timeout=DVC_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        output = "".join(s if isinstance(s, str) else s.decode(errors="replace") for s in (exc.stdout, exc.stderr) if s)
        raise AssertionError(f"dvc {' '.join(args)} ran over {DVC_TIMEOUT} s:\n{tail(output)}") from None
    if done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}) in {project}:\n{tail(said(done))}")
    return done


def said(done: subprocess.CompletedProcess[str]) -> str:
    """Everything a command printed, stdout then stderr."""
    return done.stdout + done.stderr


def timed_dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    """`run_dvc`: what DVC printed, and how many seconds it took."""
    start = time.perf_counter()
    done = run_dvc(project, *args, env=env)
    return said(done), time.perf_counter() - start


@dataclass(frozen=True)
class Out:
    """One output declared in dvc.yaml, as DVC resolves it (foreach expanded)."""

    stage: str
    path: str


def declared_outputs(project: Path) -> list[Out]:
    """Every output (outs, metrics, plots) of every stage of `project`'s dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return [Out(stage.name, out.def_path) for stage in repo.index.stages for out in stage.outs]


def cached_stage_names(project: Path) -> list[str]:
    """The names of the fetch, preprocess, train@*, evaluate@* and export@* stages of `project`."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        names = [stage.name for stage in repo.index.stages]  # `addressing` is relative to the cwd
    return [name for name in names if name.split("@")[0] in CACHED_STAGES]


def copy_into(src_root: Path, dest_root: Path, relative: str) -> None:
    """Copy the file `relative` from `src_root` to the same place under `dest_root`."""
    dest = dest_root / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_root / relative, dest)


def uncommitted_files(project: Path) -> list[str]:
    """The files a `git add -A && git commit` in `project` would add or change (deleted ones left out)."""
    status = subprocess.run(
        ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = [entry[3:] for entry in status.split("\0") if entry]
    return [path for path in paths if (project / path).is_file()]


def fresh_clone(project: Path, dest: Path, *, lock: bool) -> Path:
    """`git clone project dest`, plus what a clone of the real project gets from git.

    The small run's copy commits the project but not what the run changed: its params.yaml
    (copied always), and with `lock` everything else git would carry, as a commit after
    `dvc repro` has it: dvc.lock, the outputs DVC leaves to git (`cache: false`) and the
    .gitignore files DVC writes beside its outputs (they are part of the folders' hashes).
    """
    subprocess.run(["git", "clone", "-q", str(project), str(dest)], check=True, capture_output=True)
    for path in uncommitted_files(project) if lock else ["params.yaml"]:
        copy_into(project, dest, path)
    if not lock:
        (dest / "dvc.lock").unlink(missing_ok=True)  # the copy commits the full default run's
    return dest


def add_remote(project: Path, name: str, url: str, *, default: bool = False, env: dict[str, str] | None = None) -> None:
    """`dvc remote add --local [-d] NAME URL`: in .dvc/config.local, which git ignores."""
    run_dvc(project, "remote", "add", "--local", *(["-d"] if default else []), name, url, env=env)


def assert_up_to_date(project: Path, env: dict[str, str] | None = None) -> None:
    """`dvc status --json` in `project` reports nothing: every stage and output matches dvc.lock."""
    done = run_dvc(project, "status", "--json", env=env)
    try:
        status = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"dvc status --json printed no JSON in {project}:\n{tail(said(done))}") from None
    assert status == {}, f"dvc status in {project} is not empty:\n{tail(json.dumps(status, indent=1))}"


def write_test_pngs(project: Path, dest: Path, count: int) -> list[Path]:
    """The first `count` test images of `project`'s data/raw as PNG files (white digit on black)."""
    from PIL import Image

    from pipeline.data import parse_idx

    images = parse_idx((project / "data" / "raw" / "t10k-images-idx3-ubyte").read_bytes(), "t10k images", ndim=3)
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"digit-{i}.png" for i in range(count)]
    for path, image in zip(paths, images):
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(path)
    return paths


def ran(stage: str, output: str) -> bool:
    """Whether DVC's `output` says it ran `stage`."""
    return f"Running stage '{stage}'" in output


def restored(stage: str, output: str) -> bool:
    """Whether DVC's `output` says it restored `stage` from the run-cache instead of running it."""
    return f"Stage '{stage}' is cached - skipping run" in output


# --- local-folder remote ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_remote(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local-folder remote `local` holding everything of the small run, its run-cache included."""
    url = str(tmp_path_factory.mktemp("remote-local"))
    add_remote(small_run.project, "local", url)
    _, seconds = timed_dvc(small_run.project, "push", "--run-cache", "-r", "local")
    print(f"\ndvc push --run-cache to the local remote: {seconds:.1f} s")
    assert any(Path(url).rglob("*")), f"dvc push left the remote {url} empty"
    return url


@pytest.fixture(scope="module")
def local_clone(small_run: SmallRun, local_remote: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the small run with dvc.lock, its default remote `local`, after `dvc pull`."""
    clone = fresh_clone(small_run.project, tmp_path_factory.mktemp("clone-local") / "clone", lock=True)
    add_remote(clone, "local", local_remote, default=True)
    _, seconds = timed_dvc(clone, "pull")
    print(f"\ndvc pull from the local remote into a fresh clone: {seconds:.1f} s")
    return clone


def test_local_remote_pull_leaves_the_clone_up_to_date(local_clone: Path) -> None:
    assert_up_to_date(local_clone)


def test_local_remote_pull_brings_every_tensorboard_run(local_clone: Path) -> None:
    folders = [out for out in declared_outputs(local_clone) if out.path.startswith("data/tensorboard/")]
    assert folders, "dvc.yaml declares no output under data/tensorboard/"
    missing = [f"{out.stage}: {out.path}" for out in folders if not (local_clone / out.path).is_dir()]
    assert not missing, "TensorBoard outputs missing after dvc pull:\n" + "\n".join(missing)
    empty = [f"{out.stage}: {out.path}" for out in folders if not any((local_clone / out.path).rglob("events.out.tfevents.*"))]
    assert not empty, "TensorBoard outputs without an events file after dvc pull:\n" + "\n".join(empty)


def test_local_remote_pull_lets_mnist_predict_classify_a_png(local_clone: Path, tmp_path: Path) -> None:
    pngs = write_test_pngs(local_clone, tmp_path, count=3)
    done = subprocess.run(
        [str(MNIST), "predict", "--model", "cnn", *map(str, pngs)],
        cwd=local_clone,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"mnist predict failed ({done.returncode}) in the clone:\n{tail(output)}"
    for path in pngs:
        line = re.search(rf"^{re.escape(str(path))}: (\d) \(probability ([01]\.\d+)\)$", done.stdout, re.MULTILINE)
        assert line, f"mnist predict printed no class for {path.name}:\n{tail(output)}"
        assert 0.0 < float(line.group(2)) <= 1.0, f"{path.name}: probability out of range: {line.group(0)}"


# --- run-cache ----------------------------------------------------------------------------


@dataclass
class RunCacheClone:
    project: Path
    output: str
    seconds: float


@pytest.fixture(scope="module")
def run_cache_clone(small_run: SmallRun, local_remote: str, tmp_path_factory: pytest.TempPathFactory) -> RunCacheClone:
    """A fresh clone without dvc.lock, default remote `local`, after `dvc repro --pull`."""
    clone = fresh_clone(small_run.project, tmp_path_factory.mktemp("clone-run-cache") / "clone", lock=False)
    add_remote(clone, "local", local_remote, default=True)
    output, seconds = timed_dvc(clone, "repro", "--pull")
    print(f"\ndvc repro --pull in a clone without dvc.lock: {seconds:.1f} s")
    return RunCacheClone(clone, output, seconds)


def test_repro_pull_restores_every_stage_from_the_run_cache(run_cache_clone: RunCacheClone) -> None:
    stages = cached_stage_names(run_cache_clone.project)
    output = run_cache_clone.output
    assert any(name.startswith("train@") for name in stages), f"no train@ stage among {stages}"
    executed = [name for name in stages if ran(name, output)]
    assert not executed, f"stages ran instead of being restored from the run-cache: {executed}\n{tail(output)}"
    not_restored = [name for name in stages if not restored(name, output)]
    assert not not_restored, f"stages not restored from the run-cache: {not_restored}\n{tail(output)}"


def test_param_changed_and_changed_back_restores_from_the_run_cache(run_cache_clone: RunCacheClone) -> None:
    clone = run_cache_clone.project

    def epochs(n: int):
        def edit(raw: dict) -> dict:
            raw["models"]["logreg"]["epochs"] = n
            return raw

        return edit

    edit_params(clone, epochs(2))
    changed = said(run_dvc(clone, "repro"))
    assert ran("train@logreg", changed), f"models.logreg.epochs=2 did not run train@logreg:\n{tail(changed)}"
    edit_params(clone, epochs(1))
    back = said(run_dvc(clone, "repro"))
    assert "Running stage 'train@" not in back, f"a train stage ran after changing the epochs back:\n{tail(back)}"
    for stage in ("train@logreg", "evaluate@logreg", "export@logreg"):
        assert restored(stage, back), f"{stage} not restored from the run-cache:\n{tail(back)}"


# --- SSH remote ---------------------------------------------------------------------------


@dataclass
class SshServer:
    port: int
    key: Path  # the client's private key, authorized for root
    log: Path
    seconds: float  # from start to the SSH banner

    def url(self, path: Path) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{path}"


def keygen(path: Path) -> Path:
    """A new ed25519 key pair at `path` and `path`.pub, without passphrase."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dvc-test", "-f", str(path)], check=True)
    return path


def sshd_config(folder: Path, port: int, host_key: Path, authorized: Path) -> Path:
    """An sshd_config for a throwaway server on 127.0.0.1:`port`: public keys only, SFTP in-process."""
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\n"  # the tests run as root
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # the tmp folders' modes are not sshd's business here
        "Subsystem sftp internal-sftp\n"
    )
    return config


def wait_for_banner(process: subprocess.Popen, port: int, log: Path, deadline: float) -> None:
    """Poll 127.0.0.1:`port` until it greets with an SSH banner; fail if sshd exits or the deadline passes."""
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.settimeout(2)
                banner = sock.recv(64)
            if banner.startswith(b"SSH-2.0-"):
                return
            last = f"greeting {banner!r}"
        except OSError as exc:
            last = repr(exc)
        try:  # the pause between polls, which also notices sshd exiting
            code = process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"sshd exited ({code}) before listening on port {port}:\n{tail(log.read_text())}")
    pytest.fail(f"sshd on port {port} gave no SSH banner in time ({last}):\n{tail(log.read_text())}")


def stop(process: subprocess.Popen) -> None:
    """Terminate `process` and wait for it; kill it if it does not stop."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A real sshd on a free port of 127.0.0.1 accepting one throwaway client key for root."""
    folder = tmp_path_factory.mktemp("sshd")
    host_key = keygen(folder / "host_ed25519")
    client_key = keygen(folder / "client_ed25519")
    authorized = folder / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    config = sshd_config(folder, port, host_key, authorized)
    checked = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, f"sshd rejects its config {config}:\n{checked.stdout}{checked.stderr}"
    log = folder / "sshd.log"
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_banner(process, port, log, start + SSHD_START_TIMEOUT)
        seconds = time.monotonic() - start
        print(f"\nsshd on 127.0.0.1:{port} ready in {seconds:.2f} s")
        yield SshServer(port, client_key, log, seconds)
    finally:
        stop(process)


def ssh_env(home: Path) -> dict[str, str]:
    """The project's environment with its own empty HOME and no SSH agent.

    asyncssh (under dvc-ssh) would otherwise read ~/.ssh/config and offer the agent's keys; the
    test uses only the key configured on the remote. dvc-ssh checks no host key (sshfs connects
    with known_hosts=None), so no known_hosts file is read or written.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = project_env(HOME=str(home))
    env.pop("SSH_AUTH_SOCK", None)
    return env


def add_ssh_remote(project: Path, server: SshServer, path: Path, env: dict[str, str], *, default: bool = False) -> None:
    """Remote `ssh` at `path` on `server`, logging in as root with the server's client key."""
    add_remote(project, "ssh", server.url(path), default=default, env=env)
    run_dvc(project, "remote", "modify", "--local", "ssh", "keyfile", str(server.key), env=env)


@needs("openssh-server")
def test_ssh_remote_push_then_pull_into_a_fresh_clone(
    small_run: SmallRun, sshd: SshServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("ssh-remote")
    storage = folder / "storage"  # on this machine, reached through sshd
    env = ssh_env(folder / "home")
    add_ssh_remote(small_run.project, sshd, storage, env)
    _, pushed = timed_dvc(small_run.project, "push", "--run-cache", "-r", "ssh", env=env)
    print(f"\ndvc push --run-cache over SSH: {pushed:.1f} s")
    assert (storage / "files" / "md5").is_dir(), f"dvc push over SSH left no objects in {storage}"

    clone = fresh_clone(small_run.project, folder / "clone", lock=True)
    add_ssh_remote(clone, sshd, storage, env, default=True)
    _, pulled = timed_dvc(clone, "pull", env=env)
    print(f"dvc pull over SSH into a fresh clone: {pulled:.1f} s")
    assert_up_to_date(clone, env=env)
    model = Path("data/models/cnn/model.keras")
    assert (clone / model).is_file(), f"{model} missing in the clone after dvc pull over SSH"
    assert (clone / model).read_bytes() == (small_run.project / model).read_bytes(), f"{model} differs after the round trip"
    assert not (Path(env["HOME"]) / ".ssh").exists(), "dvc-ssh wrote into ~/.ssh"


# --- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (tests/s3.py) with the bucket `mnist-dvc` in s3.REGION."""
    with s3_server(tmp_path_factory.mktemp("s3") / "moto.log") as endpoint:
        make_bucket(endpoint, "mnist-dvc")
        yield endpoint


def add_s3_remote(project: Path, endpoint: str, env: dict[str, str], *, default: bool = False) -> None:
    """Remote `s3` at s3://mnist-dvc/store on the server at `endpoint`, as for any S3-compatible server:
    its endpoint URL and region in the config, its keys in the environment."""
    add_remote(project, "s3", "s3://mnist-dvc/store", default=default, env=env)
    run_dvc(project, "remote", "modify", "--local", "s3", "endpointurl", endpoint, env=env)
    run_dvc(project, "remote", "modify", "--local", "s3", "region", REGION, env=env)


def test_s3_remote_push_then_pull_into_a_fresh_clone(
    small_run: SmallRun, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {**project_env(), **S3_ENV}
    add_s3_remote(small_run.project, s3_endpoint, env)
    _, pushed = timed_dvc(small_run.project, "push", "--run-cache", "-r", "s3", env=env)
    print(f"\ndvc push --run-cache to S3 (moto on 127.0.0.1): {pushed:.1f} s")
    keys = keys_in(s3_endpoint, "mnist-dvc")
    assert any(k.startswith("store/files/md5/") for k in keys) and any(k.startswith("store/runs/") for k in keys), keys[:20]

    clone = fresh_clone(small_run.project, tmp_path_factory.mktemp("s3-clone") / "clone", lock=True)
    add_s3_remote(clone, s3_endpoint, env, default=True)
    _, pulled = timed_dvc(clone, "pull", env=env)
    print(f"dvc pull from S3 into a fresh clone: {pulled:.1f} s")
    assert_up_to_date(clone, env=env)
    model = Path("data/models/cnn/model.keras")
    assert (clone / model).read_bytes() == (small_run.project / model).read_bytes(), f"{model} differs after the round trip"
    for config in (clone / ".dvc" / "config", clone / ".dvc" / "config.local"):
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in (config.read_text() if config.exists() else ""), config
