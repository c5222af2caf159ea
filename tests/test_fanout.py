"""Beyond one machine, on loopback: the model chains fanned out over two Prefect process workers.

Everything is real and throwaway (tests/loopback.py): a PostgreSQL 15 cluster, a Prefect
server on it with basic authentication, a bare git origin, a DVC remote on an S3 server (moto; a
local folder for the killed-worker project), two
`prefect worker start` processes each in its own clone, and the coordinator's clone running
`mnist deploy` and `mnist flow --work-pool`. The quick configuration, with two models.
A sequential `dvc repro` of the same commit is the reference.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from conftest import dvc, edit_params, project_env, small_params
from loopback import (
    BIN,
    Loopback,
    Project,
    auth_header,
    clone,
    in_namespaces,
    loopback,
    psql_value,
    run,
    stop_tree,
    workspaces,
)
from s3 import REGION, S3_ENV, keys_in
from sweep import RATES, Sweep, logreg_at_a_constant_rate
from system import needs

pytestmark = [
    needs("postgresql"),
    needs("socat"),
    pytest.mark.skipif(os.geteuid() != 0, reason="each worker runs in namespaces of its own (unshare), as root"),
]

MODELS = ("logreg", "mlp")
POOL = "loopback"
WORKERS = ["worker-1", "worker-2"]
ZOMBIE_AFTER_S = 45  # a killed worker's chain is marked Crashed this long after its last heartbeat (30 s apart)


def two_models(raw: dict) -> dict:
    """The quick configuration with two models only."""
    raw = small_params(raw)
    raw["models"] = {name: raw["models"][name] for name in MODELS}
    raw["gates"] = {name: raw["gates"][name] for name in MODELS}
    return raw


@dataclass
class Runs:
    cluster: Loopback
    project: Project
    sequential: Path
    first: str
    second: str
    seconds: float


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    with loopback(tmp_path_factory.mktemp("fanout")) as made:
        yield made


@pytest.fixture(scope="module")
def runs(cluster: Loopback) -> Runs:
    project = cluster.project("quick", two_models)
    print(run([str(BIN / "mnist"), "deploy", "--work-pool", POOL], project.coordinator, cluster.env()))
    cluster.start_workers(project, POOL, WORKERS)
    start = time.perf_counter()
    first = run([str(BIN / "mnist"), "flow", "--work-pool", POOL], project.coordinator, cluster.env())
    seconds = time.perf_counter() - start
    print(f"\ndistributed run, {len(MODELS)} chains on {len(WORKERS)} workers: {seconds:.1f} s")
    second = run([str(BIN / "mnist"), "flow", "--work-pool", POOL], project.coordinator, cluster.env())
    sequential = clone(project.origin, project.root / "sequential")
    run(["dvc", "repro"], sequential, project_env(PYTHONPATH=str(sequential)))
    return Runs(cluster, project, sequential, first, second, seconds)


def test_the_server_refuses_a_client_without_the_auth_string(cluster: Loopback) -> None:
    assert httpx.get(f"{cluster.api}/health", timeout=10).status_code == 200  # health stays open for probes
    refused = httpx.post(f"{cluster.api}/flow_runs/filter", json={}, timeout=10)
    assert refused.status_code == 401, f"a client without the auth string got {refused.status_code}"
    allowed = httpx.post(f"{cluster.api}/flow_runs/filter", json={}, headers=auth_header(), timeout=10)
    assert allowed.status_code == 200, allowed.text


def test_the_server_keeps_its_records_in_postgresql(runs: Runs) -> None:
    count = int(psql_value(runs.cluster.database_url, "SELECT count(*) FROM flow_run"))
    assert count >= len(runs.cluster.flow_runs()) > 0, f"the Prefect server wrote {count} flow runs into PostgreSQL"


def test_every_chain_ran_on_a_worker_and_was_restored_by_the_coordinator(runs: Runs) -> None:
    flows = runs.cluster.flow_runs()
    chains = [f for f in flows if f["deployment_id"]]
    seen = [(f["name"], f["state_type"], f["tags"]) for f in chains]
    assert len(chains) == len(MODELS), f"expected one chain run per model, found {seen}"
    assert all(f["state_type"] == "COMPLETED" for f in chains), seen
    assert sorted(f["name"].split("@")[0] for f in chains) == sorted(MODELS), seen
    assert all(f["name"].split("@")[1] in WORKERS and f"worker:{f['name'].split('@')[1]}" in f["tags"] for f in chains), seen
    parents = {f["parent_task_run_id"] for f in chains}
    assert None not in parents, f"a chain run is not a subflow of the coordinator's run: {seen}"
    assert "Running stage 'train@" not in runs.first, runs.first[-4000:]
    stages = [f"{stage}@{m}" for m in MODELS for stage in ("train", "evaluate", "export")]
    not_restored = [s for s in stages if f"Stage '{s}' is cached - skipping run" not in runs.first]
    assert not not_restored, f"the coordinator did not restore {not_restored} from the run-cache:\n{runs.first[-4000:]}"


def test_the_workers_reach_the_s3_remote_by_its_endpoint_and_no_key_is_a_parameter(runs: Runs) -> None:
    """The chains' parameters carry the S3 remote's endpoint URL and region (a worker could not reach the
    server without them), never its keys; what the workers pushed is in the bucket."""
    chains = [f for f in runs.cluster.flow_runs() if f["deployment_id"]]
    assert chains and all(
        {k: f["parameters"]["remote"].get(k) for k in ("url", "endpointurl", "region")}
        == {"url": runs.project.remote, "endpointurl": runs.cluster.s3(), "region": REGION}
        for f in chains
    ), [f["parameters"] for f in chains]
    flows = str([f["parameters"] for f in runs.cluster.flow_runs()])
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in flows and S3_ENV["AWS_ACCESS_KEY_ID"] not in flows
    keys = keys_in(runs.cluster.s3(), "mnist")
    assert any(k.startswith("quick/files/md5/") for k in keys) and any(k.startswith("quick/runs/") for k in keys), keys[:20]


def test_stage_runs_inside_the_chains_carry_the_pipeline_run_tag(runs: Runs) -> None:
    flows = runs.cluster.flow_runs()
    trains = [f for f in flows if f["name"] in {f"train-{m}" for m in MODELS}]
    assert len(trains) == len(MODELS), [f["name"] for f in flows]
    coordinator_tags = {
        t for f in flows if f["name"] and not f["deployment_id"] for t in f["tags"] if t.startswith("pipeline-run:")
    }
    for train in trains:
        tags = [t for t in train["tags"] if t.startswith("pipeline-run:")]
        assert tags and set(tags) <= coordinator_tags, (train["name"], train["tags"])


def test_a_second_distributed_run_trains_nothing(runs: Runs) -> None:
    assert "0 of 2 chains" in runs.second, runs.second[-4000:]
    for stage in ("fetch", "preprocess", "train@", "evaluate@", "export@"):
        assert f"Running stage '{stage}" not in runs.second, runs.second[-4000:]


def test_distributed_equals_sequential(runs: Runs) -> None:
    import keras

    coordinator = runs.project.coordinator
    for model in MODELS:
        for name in ("metrics.json", "predictions.csv"):
            got = (coordinator / "data" / "evaluate" / model / name).read_bytes()
            want = (runs.sequential / "data" / "evaluate" / model / name).read_bytes()
            assert got == want, f"{model}'s {name} differs between the distributed and the sequential run"
        a = keras.models.load_model(coordinator / "data" / "models" / model / "model.keras", compile=False)
        b = keras.models.load_model(runs.sequential / "data" / "models" / model / "model.keras", compile=False)
        for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
            assert np.array_equal(wa, wb), f"{model}'s weights differ between the distributed and the sequential run"
    status = run(["dvc", "status", "--json"], coordinator, project_env(PYTHONPATH=str(coordinator)))
    assert status.strip().splitlines()[-1] == "{}", f"dvc status in the coordinator is not clean:\n{status[-3000:]}"
    leaderboard = "data/leaderboard.json"
    assert (coordinator / leaderboard).read_bytes() == (runs.sequential / leaderboard).read_bytes()
    got, want = locked_hashes(coordinator), locked_hashes(runs.sequential)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    differ = sorted(path for path in got if got[path] != want[path] and path.endswith(SAME_BYTES))
    assert not differ, f"dvc.lock hashes differ between the distributed and the sequential run: {differ}"


def test_workers_keep_their_workspaces_rebuild_a_changed_one_and_start_stages_warm(runs: Runs) -> None:
    """A new commit that changes both models: each chain checks it out in its worker's workspace of the
    first run, except where a file was edited there by hand: that workspace is rebuilt. Every stage of
    every chain, the first one's too, forks from the workspace's warm stage server (kept from the first
    run, or started and waited for), and so do the report and publish on the coordinator. A second
    coordinator clone, so that the first one's outputs stay those of the first run."""
    cluster, project = runs.cluster, runs.project
    kept = {w: [p for p in workspaces(project, w).iterdir() if p.is_dir()] for w in WORKERS}
    assert all(len(found) == 1 for found in kept.values()), kept
    (kept["worker-1"][0] / "README.md").write_text("edited on the worker\n")
    source = clone(project.origin, project.root / "changed")
    edit_params(source, lambda raw: {**raw, "seed": raw["seed"] + 1})  # every model trains again
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "seed"], cwd=source, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD"], cwd=source, check=True, capture_output=True)
    coordinator = clone(project.origin, project.root / "coordinator-2")
    git(coordinator, "remote", "set-url", "origin", cluster.git_url(project.origin))  # the workers' way to it
    shutil.copy(project.coordinator / ".dvc" / "config.local", coordinator / ".dvc" / "config.local")  # the S3 remote
    before = {f["id"] for f in cluster.flow_runs()}
    output = run([str(BIN / "mnist"), "flow", "--work-pool", POOL], coordinator, cluster.env())
    assert "2 of 2 chains to run on the pool" in output, output[-4000:]
    flows = [f for f in cluster.flow_runs() if f["id"] not in before]
    chains = sorted((f for f in flows if f["deployment_id"]), key=lambda f: f["start_time"])
    assert len(chains) == 2 and all(f["state_type"] == "COMPLETED" for f in chains), [
        (f["name"], f["state_type"]) for f in chains
    ]
    first_on = {}
    for chain in chains:
        worker = chain["name"].split("@")[1]
        expected = "rebuilt" if worker == "worker-1" and worker not in first_on else "reused"
        first_on.setdefault(worker, chain["name"])
        assert f"workspace:{expected}" in chain["tags"], (chain["name"], chain["tags"])
    assert [p for p in workspaces(project, "worker-1").iterdir() if p.is_dir()] == kept["worker-1"]
    assert (kept["worker-1"][0] / "README.md").read_text() != "edited on the worker\n"
    stages = [
        f for f in flows if f["name"].split("-")[0] in ("train", "evaluate", "export") and f["name"].split("-")[-1] in MODELS
    ]
    assert len(stages) == 6, [f["name"] for f in flows]
    starts = {f["name"]: f["labels"].get("mnist.start") for f in stages}
    assert all(starts[f"{stage}-{m}"] == "warm" for stage in ("train", "evaluate", "export") for m in MODELS), starts
    coordinator_starts = {f["name"]: f["labels"].get("mnist.start") for f in flows if f["name"] in ("report", "publish")}
    assert coordinator_starts == {"report": "warm", "publish": "warm"}, coordinator_starts  # the coordinator's own server


def test_each_worker_sees_only_its_own_folder_and_the_servers_ports(runs: Runs) -> None:
    """Probes run in worker-1's own namespaces: the Prefect server answers, by address; PostgreSQL's port, the
    coordinator's clone, the bare origin and worker-2's workspaces are not there."""
    cluster, project = runs.cluster, runs.project
    postgres_port = cluster.database_url.split("@127.0.0.1:")[1].split("/")[0]

    def inside(check: str) -> int:
        return in_namespaces(cluster.workers["worker-1"], ["bash", "-c", check]).returncode

    assert inside(f"exec 3<>/dev/tcp/127.0.0.1/{urlsplit(cluster.api).port}") == 0
    assert inside(f"test -d {workspaces(project, 'worker-1')}") == 0
    assert inside(f"exec 3<>/dev/tcp/127.0.0.1/{postgres_port}") != 0
    for hidden in (project.coordinator / "dvc.yaml", project.origin / "HEAD", workspaces(project, "worker-2")):
        assert inside(f"test -e {hidden}") != 0, f"worker-1 sees {hidden}"


SAME_BYTES = ("model.keras", "meta.json", "metrics.json", "predictions.csv", "per_class.csv", "data/raw", "data/prepared")


def locked_hashes(project: Path) -> dict[str, str]:
    """Each output path in `project`'s dvc.lock, with its md5."""
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for entry in lock["stages"].values() for out in entry.get("outs", [])}


def chain_running_on(cluster: Loopback, worker: str, timeout_s: float) -> str:
    """The model whose chain runs on `worker` (named <model>@<worker> once it started), once it does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for flow in cluster.flow_runs():
            if flow["deployment_id"] and flow["name"].endswith(f"@{worker}") and flow["state_type"] == "RUNNING":
                return flow["name"].split("@")[0]
        time.sleep(1)
    raise AssertionError(f"no chain started on {worker} within {timeout_s:.0f} s")


def test_a_killed_worker_fails_its_chain_only_and_a_second_run_completes_it(cluster: Loopback) -> None:
    project = cluster.project("fault", two_models)
    pool = "fault"
    run(
        [str(BIN / "mnist"), "deploy", "--work-pool", pool, "--zombie-after", str(ZOMBIE_AFTER_S)],
        project.coordinator,
        cluster.env(),
    )
    cluster.start_workers(project, pool, ["fault-1", "fault-2"])
    coordinator = subprocess.Popen(
        [str(BIN / "mnist"), "flow", "--work-pool", pool],
        cwd=project.coordinator,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim = chain_running_on(cluster, "fault-2", 600)
    stop_tree(cluster.workers["fault-2"], signal.SIGKILL, 0)  # the machine is gone: no clean-up, no last report
    output, _ = coordinator.communicate(timeout=900)
    survivor = next(m for m in MODELS if m != victim)
    assert coordinator.returncode == 1, output[-4000:]
    assert f"chain {victim} failed" in output and "no heartbeat" in output, output[-4000:]
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}@{survivor}' is cached - skipping run" in output, output[-4000:]
    # Again, with a worker back: only the killed chain runs; the survivor is up to date.
    cluster.start_workers(project, pool, ["fault-3"])
    again = run([str(BIN / "mnist"), "flow", "--work-pool", pool], project.coordinator, cluster.env())
    assert f"1 of 2 chains to run on the pool: {victim}" in again, again[-4000:]
    assert f"Stage 'train@{victim}' is cached - skipping run" in again, again[-4000:]
    status = run(["dvc", "status", "--json"], project.coordinator, project_env(PYTHONPATH=str(project.coordinator)))
    assert status.strip().splitlines()[-1] == "{}", status[-3000:]


def test_a_chain_run_that_never_sent_a_heartbeat_is_marked_crashed(cluster: Loopback, tmp_path: Path) -> None:
    """A worker killed between starting its run and the run's first heartbeat: the server's own
    Running event starts the automation's clock. No worker here: the run is set Running by hand."""
    pool, after_s = "silent", 10
    origin = tmp_path / "origin.git"  # deploying loads the chain flow from the repo
    subprocess.run(["git", "clone", "-q", "--bare", str(Path(__file__).parents[1]), str(origin)], check=True)
    run(
        [str(BIN / "mnist"), "deploy", "--work-pool", pool, "--repo", str(origin), "--zombie-after", str(after_s)],
        tmp_path,
        cluster.env(),
    )
    api, headers = cluster.api, auth_header()
    deployment = httpx.get(f"{api}/deployments/name/model-chain/{pool}", headers=headers, timeout=30).json()
    parameters = {
        "model": "logreg",
        "repo": str(origin),
        "commit": "0" * 40,
        "remote": {"url": str(tmp_path)},
        "run_id": "silent",
    }
    created = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}, headers=headers, timeout=30
    )
    assert created.status_code == 201, created.text
    flow_run = created.json()
    for state in ("PENDING", "RUNNING"):
        reply = httpx.post(
            f"{api}/flow_runs/{flow_run['id']}/set_state",
            json={"state": {"type": state}, "force": True},
            headers=headers,
            timeout=30,
        )
        assert reply.json()["status"] == "ACCEPT", reply.text
    deadline = time.monotonic() + after_s + 120
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{flow_run['id']}", headers=headers, timeout=30).json()["state"]
        if state["type"] != "RUNNING":
            break
        time.sleep(1)
    assert state["type"] == "CRASHED" and "no heartbeat" in state["message"], state


def experiments_shown(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` in `project`: each experiment's name and data (params, metrics, outs with their md5)."""
    import json

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project, project_env(PYTHONPATH=str(project))))
    return {
        rev["name"]: rev["data"] for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"] if rev["name"]
    }


def test_a_sweep_over_two_workers_lands_as_dvc_experiments_equal_to_local_ones(cluster: Loopback, sweep: Sweep) -> None:
    """Two queued experiments, `mnist sweep` over two workers: each runs on its own worker, with fetch and
    preprocess restored from the coordinator's run-cache, and comes back as a DVC experiment whose params, metrics
    and output bytes are those of the same experiment run by DVC's local queue (the session's sweep)."""
    from dvc.api import DVCFileSystem

    from pipeline import compare

    project = cluster.project("sweep", logreg_at_a_constant_rate)
    coordinator, pool, workers = project.coordinator, "sweeps", ["sweeper-1", "sweeper-2"]
    run([str(BIN / "mnist"), "deploy", "--work-pool", pool], coordinator, cluster.env())
    cluster.start_workers(project, pool, workers)
    for name, rate in RATES.items():
        run(
            ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"models.logreg.learning_rate={rate}"],
            coordinator,
            cluster.env(coordinator),
        )
    before = {f["id"] for f in cluster.flow_runs()}
    start = time.perf_counter()
    output = run([str(BIN / "mnist"), "sweep", "--work-pool", pool], coordinator, cluster.env())
    print(f"\nsweep of {len(RATES)} experiments over {len(workers)} workers: {time.perf_counter() - start:.1f} s")

    flows = [f for f in cluster.flow_runs() if f["id"] not in before]
    runs = {f["name"].split("@")[0]: f for f in flows if f["deployment_id"]}
    assert sorted(runs) == sorted(RATES) and all(f["state_type"] == "COMPLETED" for f in runs.values()), output[-3000:]
    assert {f["name"].split("@")[1] for f in runs.values()} == set(workers), [f["name"] for f in runs.values()]
    stages = sorted(
        f["name"] for f in flows if not f["deployment_id"] and f["name"].split("-")[0] in ("fetch", "preprocess", "train")
    )
    assert stages == ["fetch", "preprocess", "train-logreg", "train-logreg"], stages  # fetch and preprocess: once, here
    queue = run(["dvc", "queue", "status"], coordinator, cluster.env(coordinator))
    assert not any(name in queue for name in RATES), queue

    got, want = experiments_shown(coordinator), experiments_shown(sweep.project)
    assert set(RATES) <= set(got), sorted(got)
    for name, rate in RATES.items():
        params = got[name]["params"]["params.yaml"]["data"]
        assert params["models"]["logreg"]["learning_rate"] == rate
        for metrics in ("data/evaluate/logreg/metrics.json", "data/live/logreg/metrics.json"):  # the test's, DVCLive's
            assert got[name]["metrics"][metrics]["data"] == want[name]["metrics"][metrics]["data"], (name, metrics)
        same = {path: out["hash"] for path, out in got[name]["outs"].items() if path.endswith(SAME_BYTES)}
        assert same and same == {path: want[name]["outs"][path]["hash"] for path in same}, name
        rev = got[name]["rev"]
        pulled = DVCFileSystem(str(coordinator), rev=rev).read_bytes("data/evaluate/logreg/predictions.csv")
        assert pulled == DVCFileSystem(str(sweep.project), rev=want[name]["rev"]).read_bytes(
            "data/evaluate/logreg/predictions.csv"
        )
    assert set(RATES) <= set(compare.experiments(coordinator, []))  # `mnist compare` finds them
    queued_by = run(["git", "config", "user.email"], coordinator, cluster.env(coordinator)).strip()
    assert run(["git", "log", "-1", "--format=%ae", got["lr-low"]["rev"]], coordinator, cluster.env()).strip() == queued_by
    run(["dvc", "exp", "apply", "lr-high"], coordinator, cluster.env(coordinator))
    model = "data/models/logreg/model.keras"
    assert md5(coordinator / model) == got["lr-high"]["outs"][model]["hash"]


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


# --- the coordinator's checks, without a cluster --------------------------------------------------


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pushed_clone(tmp_path: Path) -> Path:
    """A clone whose one commit (params.yaml, dvc.lock, data/.gitignore) is on its bare origin."""
    source = tmp_path / "source"
    (source / "data").mkdir(parents=True)
    for name in ("params.yaml", "dvc.lock", "data/.gitignore"):
        (source / name).write_text("x\n")
    git(tmp_path, "init", "-q", str(source))
    git(source, "add", "-A")
    git(source, "commit", "-qm", "one")
    git(tmp_path, "clone", "-q", "--bare", str(source), str(tmp_path / "origin.git"))
    return clone(tmp_path / "origin.git", tmp_path / "clone")


def test_the_coordinator_runs_a_pushed_commit(pushed_clone: Path) -> None:
    from pipeline import fanout

    (pushed_clone / "dvc.lock").write_text("written by dvc\n")  # what DVC writes is not a change of the commit
    (pushed_clone / "data" / ".gitignore").write_text("/raw\n")
    commit, origin = fanout.pushed_commit(pushed_clone)
    assert len(commit) == 40 and origin.endswith("origin.git")


def test_the_coordinator_refuses_uncommitted_changes(pushed_clone: Path) -> None:
    from pipeline import fanout
    from pipeline.errors import PipelineError

    (pushed_clone / "params.yaml").write_text("changed\n")
    with pytest.raises(PipelineError, match=r"Uncommitted changes in params.yaml.*Commit them and `git push`"):
        fanout.pushed_commit(pushed_clone)


def test_the_coordinator_refuses_an_unpushed_commit(pushed_clone: Path) -> None:
    from pipeline import fanout
    from pipeline.errors import PipelineError

    (pushed_clone / "params.yaml").write_text("changed\n")
    git(pushed_clone, "commit", "-qam", "not pushed")
    with pytest.raises(PipelineError, match=r"is not on origin .*`git push` it first"):
        fanout.pushed_commit(pushed_clone)


def test_ran_and_restored_stages_read_dvc_output() -> None:
    from pipeline import fanout

    output = (
        "Stage 'fetch' is cached - skipping run, checking out outputs\n"
        "Running stage 'train@mlp':\n> python stages/train.py mlp\n"
        "Stage 'evaluate@mlp' didn't change, skipping\n"
        "Running stage 'report':\n"
    )
    assert fanout.ran_stages(output) == ["train@mlp", "report"]
    assert fanout.restored_stages(output) == ["fetch"]


def test_a_chain_holds_the_only_slot_of_its_model_and_commit(prefect_api: str) -> None:
    from prefect.concurrency.sync import concurrency

    from pipeline import fanout

    name = fanout.chain_limit("mlp", uuid.uuid4().hex * 2)  # a commit of its own
    fanout.ensure_limit(name)
    fanout.ensure_limit(name)  # a second chain of the same commit finds the limit there
    with concurrency(name, occupy=1, strict=True):
        with pytest.raises(TimeoutError):
            with concurrency(name, occupy=1, strict=True, timeout_seconds=3):
                pass
    with concurrency(name, occupy=1, strict=True, timeout_seconds=30):
        pass  # released when the first chain ended


def test_a_pool_without_the_chain_deployment_is_named_with_the_fix(prefect_api: str) -> None:
    from pipeline import fanout
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"No deployment model-chain/no-such-pool .*mnist deploy --work-pool no-such-pool"):
        fanout.check_deployment("no-such-pool")


@pytest.fixture
def queue_clone(pushed_clone: Path) -> Path:
    """pushed_clone made a DVC project (one stage reading params.yaml, a local default remote) and pushed,
    with two experiments queued on its commit: a.lr=0.2 and a.lr=0.3."""
    (pushed_clone / "params.yaml").write_text("a:\n  lr: 0.1\n")
    (pushed_clone / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: cat params.yaml > out.txt\n    params: [a.lr]\n    outs: [out.txt]\n"
    )
    (pushed_clone / "notes.bin").write_bytes(b"\x00")
    git(pushed_clone, "rm", "-q", "dvc.lock")  # pushed_clone's is no DVC lock file
    dvc(pushed_clone, "init", "-q")
    dvc(pushed_clone, "remote", "add", "-d", "local", str(pushed_clone.parent / "remote"))
    git(pushed_clone, "add", "-A")
    git(pushed_clone, "commit", "-qm", "dvc")
    git(pushed_clone, "push", "-q", "origin", "HEAD")
    dvc(pushed_clone, "exp", "run", "--queue", "-S", "a.lr=0.2,0.3")
    return pushed_clone


def test_queued_experiments_travel_as_the_files_they_change(queue_clone: Path) -> None:
    from pipeline import sweep

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=queue_clone, capture_output=True, text=True).stdout.strip()
    entries = sweep.queued(queue_clone, commit)
    files = sorted(e.files["params.yaml"] or "" for e in entries)
    assert [e.files.keys() for e in entries] == [{"params.yaml"}] * 2 and files == ["a:\n  lr: 0.2\n", "a:\n  lr: 0.3\n"]
    assert len({e.name for e in entries}) == 2 and all(len(e.rev) == 40 for e in entries)


def test_a_queued_binary_change_and_an_empty_queue_are_named(queue_clone: Path) -> None:
    from pipeline import sweep
    from pipeline.errors import PipelineError

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=queue_clone, capture_output=True, text=True).stdout.strip()
    (queue_clone / "notes.bin").write_bytes(b"\xff\xfe\x00")
    dvc(queue_clone, "exp", "run", "--queue", "-n", "binary", "-S", "a.lr=0.4")
    with pytest.raises(PipelineError, match=r"Experiment binary changes notes.bin, which is not text"):
        sweep.queued(queue_clone, commit)
    dvc(queue_clone, "queue", "remove", "--queued")
    with pytest.raises(PipelineError, match=r"No experiment is queued on this commit: .*dvc exp run --queue"):
        sweep.queued(queue_clone, commit)


def test_an_experiment_is_committed_as_its_queuer_by_a_worker_without_a_git_identity(queue_clone: Path, tmp_path: Path) -> None:
    """The queuer's identity reaches DVC's commit through the environment; nothing is written to git's config."""
    from pipeline import sweep

    home = tmp_path / "home"  # no ~/.gitconfig: git, dulwich and libgit2 find no identity of their own
    home.mkdir()
    nobody = {"HOME": str(home), "XDG_CONFIG_HOME": str(home), "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    ada = sweep.identity({"name": "Ada Queuer", "email": "ada@example.org"})
    dvc(queue_clone, "exp", "run", "-n", "by-ada", "-S", "a.lr=0.7", env=project_env(**nobody, **ada))
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(authorname) %(authoremail) %(committername)", "refs/exps"],
        cwd=queue_clone,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ours = [line.split(" ", 1)[1] for line in refs if line.split(" ", 1)[0].endswith("/by-ada")]
    assert ours == ["Ada Queuer <ada@example.org> Ada Queuer"], refs
    config = subprocess.run(["git", "config", "--local", "--list"], cwd=queue_clone, capture_output=True, text=True)
    assert "user." not in config.stdout, config.stdout


def test_experiment_files_outside_the_project_are_refused_before_any_is_written(tmp_path: Path) -> None:
    from pipeline import sweep
    from pipeline.errors import PipelineError

    workspace = tmp_path / "workspace"
    (workspace / ".git").mkdir(parents=True)
    for bad in ("../escaped.txt", str(tmp_path / "absolute.txt"), ".git/config", "data/../../escaped.txt"):
        with pytest.raises(PipelineError, match=r"is not a path inside the project"):
            sweep.write_files(workspace, {"params.yaml": "a: 1\n", bad: "x\n"})
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".git", "workspace"]
    sweep.write_files(workspace, {"params.yaml": "a: 1\n", "conf/extra.yaml": "b: 2\n"})
    assert (workspace / "conf" / "extra.yaml").read_text() == "b: 2\n"


def test_mnist_sweep_queues_its_experiments_and_keeps_them_when_the_pool_has_no_deployment(
    queue_clone: Path, prefect_api: str
) -> None:
    dvc(queue_clone, "queue", "remove", "--queued")
    done = subprocess.run(
        [str(BIN / "mnist"), "sweep", "--work-pool", "no-such-pool", "-S", "a.lr=0.5,0.6"],
        cwd=queue_clone,
        env=project_env(PREFECT_API_URL=prefect_api),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "No deployment dvc-experiment/no-such-pool" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    queue = dvc(queue_clone, "queue", "status").stdout
    assert queue.count("Queued") == 2, queue


def test_the_stages_of_a_chain_do_not_inherit_its_flow_run_context(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stage is a flow run of its own; and the workspace's warm server, kept from an earlier chain, refuses a
    stage whose PREFECT_ variables differ from its own, as the chain's flow-run id does from chain to chain."""
    from pipeline import fanout

    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    env = fanout.dvc_env(tmp_path, "run-1")
    assert "PREFECT__FLOW_RUN_ID" not in env and env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert env["PYTHONPATH"] == str(tmp_path)
