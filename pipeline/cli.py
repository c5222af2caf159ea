"""The `mnist` command: run the pipeline, open the dashboards, classify images, describe models."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit
from uuid import UUID

from prefect import State, flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import temporary_settings
from prefect.states import Completed, Crashed, Failed, Running

from pipeline import integrity, localserver, progress as progress_lines, servers, warm
from pipeline.config import load_params
from pipeline.data import parse_idx
from pipeline.errors import DataError, ExportError, PipelineError
from pipeline.localserver import SERVER_AUTH_ENV as AUTH_ENV
from pipeline.mnist import IMAGE_SHAPE
from pipeline.orphans import mark_orphans
from pipeline.stage import (
    PARENT_ENV,
    RUN_ID_ENV,
    check_prefect_api,
    client_settings,
    dashboards_api,
    run_tag,
    stage_slot,
)

if TYPE_CHECKING:
    import numpy as np

EXPORT_ROOT = Path("data/export")
TENSORBOARD_LOGDIR = Path("data/tensorboard")
TRAINING_NOW = Path("data/resume")  # the TensorBoard events of training runs in progress (artifacts.live_tensorboard)


@contextmanager
def prefect_api(signals: servers.Signals | None = None) -> Iterator[str]:
    """The Prefect API for one pipeline run: $PREFECT_API_URL if set (it must answer), else a local
    server on 127.0.0.1:4200 ($MNIST_PREFECT_PORT) — the one already running, or one started now and stopped afterwards.
    One server for the whole run: no stage pays Prefect's temporary-server start (~8 s)."""
    url = check_prefect_api()
    if url:
        yield url
        return
    port = localserver.port()
    print(f"Prefect: using or starting a server on 127.0.0.1:{port} ...", flush=True)
    with servers.prefect_server(port=port, signals=signals, restart=True) as api:  # started again if it dies mid-run
        yield api


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a child ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _follow(child: subprocess.Popen[str], progress: progress_lines.Progress) -> None:
    """Pass the child's stdout and stderr through `progress` (which prints a line per ended stage) to ours."""
    lock = threading.Lock()

    def pump(source: IO[str], sink: TextIO) -> None:
        for line in source:
            with lock:
                if progress.feed(line):
                    sink.write(line)
                    sink.flush()

    other = threading.Thread(target=pump, args=(child.stderr, sys.stderr), daemon=True)
    other.start()
    pump(child.stdout, sys.stdout)  # type: ignore[arg-type]  # stdout=PIPE: not None
    other.join()
    progress.close()


def _run_with_prefect(cmd: list[str], warm_starts: bool = False, progress: progress_lines.Progress | None = None) -> int:
    """Run `cmd` (dvc repro, a flow) with every stage reporting to one Prefect server.

    With `warm_starts`, the stages start as forks of one process that has imported them
    (pipeline/warm.py) instead of importing TensorFlow and Prefect each time. With `progress`,
    `cmd`'s output passes through it (a line per stage as it ends).
    SIGINT and SIGTERM, sent to this command alone or to its process group, reach `cmd` and its
    stages; this command then marks the stages that could not report as crashed, stops the servers
    it started, and exits with `cmd`'s status (130 or 143 for a child ended by SIGINT or SIGTERM).
    """
    run_id = time.strftime("run-%Y%m%d-%H%M%S")
    with servers.Signals() as signals:
        try:
            with prefect_api(signals) as api, ExitStack() as stack:
                signals.check()
                print(f"Prefect dashboard: {api.removesuffix('/api')}  (runs tagged {run_tag(run_id)})", flush=True)
                mark_orphans(api)  # left Running by an earlier run killed outright
                broken = integrity.set_aside_unreadable_lock(Path.cwd())  # left by an earlier run killed outright
                if broken:
                    print(broken, file=sys.stderr, flush=True)
                # this environment's bin first: `dvc`, and the `python` of dvc.yaml's commands, are its own
                # even when the venv is not activated (.venv/bin/mnist run)
                path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
                env = {**os.environ, "PATH": path, "PREFECT_API_URL": api, RUN_ID_ENV: run_id}
                if warm_starts:
                    env.update(stack.enter_context(warm.server(Path.cwd().resolve(), env)))
                parent = _open_parent_run(api, run_id) if progress else None
                if parent:
                    env[PARENT_ENV] = str(parent)
                    progress.on_end = lambda stage, what, seconds: _note_stage(api, parent, stage, what)  # type: ignore[union-attr]  # a parent run is opened only with progress
                piped: dict[str, Any] = (
                    {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "bufsize": 1} if progress else {}
                )
                child = subprocess.Popen(
                    cmd, env=env, preexec_fn=warm.DIE_WITH_PARENT, **piped
                )  # dvc goes if this command is killed
                signals.adopt(child)
                if progress:
                    _follow(child, progress)
                code = exit_status(child.wait())
                _mark_killed_runs(api, run_id)
                if parent:
                    _close_parent_run(api, parent, code, progress)  # type: ignore[arg-type]  # a parent run is opened only with progress
        except servers.Stopped as stop:
            print(f"stopped by {stop} before the run started; nothing ran.", file=sys.stderr)
            return 128 + int(signals.received or 0)
    if signals.received is not None:
        print(
            f"stopped by {signal.Signals(signals.received).name}: run the same command again to go on "
            "(DVC restores or re-runs what did not finish).",
            file=sys.stderr,
        )
    return code


def mark_killed_runs(run_id: str) -> list[str]:
    """Mark the flow runs of pipeline run `run_id` that never reported an end as Crashed; return their names.

    A stage process killed outright (SIGKILL, out of memory) cannot report, and its flow run
    would show as running forever. The run command calls this once `dvc repro` is over.
    """
    unfinished = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[run_tag(run_id)]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])),
    )
    message = "the stage process ended without reporting (killed?); see the output of dvc repro"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=unfinished)
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [run.name for run in runs]


def _mark_killed_runs(api: str, run_id: str) -> None:
    """Show stage processes that were killed before they could report as crashed on the dashboard."""
    try:
        with temporary_settings(updates=client_settings(api)):
            crashed = mark_killed_runs(run_id)
    except Exception as exc:  # noqa: BLE001 - a dashboard detail must not hide dvc's own exit status
        print(f"Prefect: could not check for killed stages ({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    if crashed:
        print(f"Prefect: marked {', '.join(crashed)} as crashed: the stage process ended without reporting.", file=sys.stderr)


@flow(name="pipeline-run")
def pipeline_run() -> None:
    """One `mnist run`: each stage's flow run is nested under its flow run (pipeline/stage.py run_in_parent)."""


def _open_parent_run(api: str, run_id: str) -> UUID | None:
    """The flow run of the whole pipeline run, named `run_id`, Running; None (said) if the server refuses it."""
    try:
        with temporary_settings(updates=client_settings(api)), get_client(sync_client=True) as client:
            return client.create_flow_run(pipeline_run, name=run_id, state=Running()).id  # untagged: the tag lists stages
    except Exception as exc:  # noqa: BLE001 - the stages then report as separate runs; the pipeline still runs
        print(f"Prefect: could not create the run's parent flow run ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _note_stage(api: str, parent: UUID, stage: str, what: str) -> None:
    """A stage DVC restored or found up to date gets its task run in the parent too (one that ran has its own)."""
    if what not in (progress_lines.RESTORED, progress_lines.UP_TO_DATE):
        return
    name = "Restored" if what == progress_lines.RESTORED else "Up to date"
    try:
        with temporary_settings(updates=client_settings(api)), get_client(sync_client=True) as client:
            client.create_task_run(
                stage_slot.with_options(name=stage),
                flow_run_id=parent,
                dynamic_key=stage,
                name=stage,
                state=Completed(message=what, name=name),
            )
    except Exception as exc:  # noqa: BLE001 - a dashboard detail must not stop the run
        print(f"Prefect: could not record {stage} ({type(exc).__name__}: {exc})", file=sys.stderr)


def _close_parent_run(api: str, parent: UUID, code: int, progress: progress_lines.Progress) -> None:
    """End the parent flow run as the run ended; a stage task run left unfinished (its process killed) is Crashed."""
    failed = [f"{stage}: {message}" for stage, message in progress.errors.items()]
    end: State = Completed() if code == 0 else Failed(message="; ".join(failed) or f"dvc repro exited with {code}")
    try:
        with temporary_settings(updates=client_settings(api)), get_client(sync_client=True) as client:
            for slot in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent]))):
                if slot.state is None or not slot.state.is_final():
                    client.set_task_run_state(slot.id, Crashed(message="its stage process ended without reporting"), force=True)
            client.set_flow_run_state(parent, end, force=True)
    except Exception as exc:  # noqa: BLE001 - a dashboard detail must not hide dvc's own exit status
        print(f"Prefect: could not end the run's parent flow run ({type(exc).__name__}: {exc})", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """`dvc repro`, every stage reporting to one Prefect server, with a line per stage as it ends and a table at the end."""
    root = Path.cwd()
    load_params()  # first: a bad params.yaml (a model name DVC would put into a shell command) stops here, not in DVC
    targets = [a for a in args.dvc_args if not a.startswith("-")]
    single = any(a in ("-s", "--single-item") for a in args.dvc_args)
    from pipeline.dag import planned_stages

    try:
        planned = planned_stages(root, targets, single)
    except Exception:  # noqa: BLE001 - DVC says what is wrong with dvc.yaml itself, once it runs
        planned = []
    progress = progress_lines.Progress(planned, progress_lines.load_times())
    code = _run_with_prefect(["dvc", "repro", *args.dvc_args], warm_starts=not args.cold, progress=progress)
    progress_lines.save_times(progress.times())
    for stage, message in progress.errors.items():
        print(f"\nfailed: {stage}: {message}", file=sys.stderr)
    if code == 0:
        try:
            params = load_params()
            print("\n" + progress_lines.models_table(root, root / params.serving.base, list(params.gates)))  # a gate per model
        except Exception as exc:  # noqa: BLE001 - the run is done; a table it cannot make is only said
            print(f"\n(no table of the models: {exc})")
        print(
            "\nReport: data/report.md (and `dvc metrics show`). Prefect and TensorBoard: `make dashboards` "
            f"(Prefect on http://127.0.0.1:{localserver.port()}, TensorBoard on http://127.0.0.1:{servers.TENSORBOARD_PORT})."
        )
    return code


def cmd_flow(args: argparse.Namespace) -> int:
    """The end-to-end Prefect flow: every DVC stage as a task, run through DVC; with a work pool,
    each stale model chain runs on the pool's workers (pipeline/fanout.py)."""
    if args.work_pool:
        if not check_prefect_api():
            raise PipelineError(
                "The chains run on workers that report to one Prefect server: set PREFECT_API_URL to it "
                "(and PREFECT_API_AUTH_STRING if it asks for one). See the README, 'Beyond one machine'."
            )
        return _run_with_prefect([sys.executable, "-m", "pipeline.fanout", args.work_pool])
    return _run_with_prefect([sys.executable, "-m", "pipeline.dag"], warm_starts=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Queue the experiments that `-S` describes (as `dvc exp run --queue -S` does), then run every experiment
    queued on this commit on the pool's workers and pull each back (pipeline/sweep.py)."""
    if not check_prefect_api():
        raise PipelineError(
            "The experiments run on workers that report to one Prefect server: set PREFECT_API_URL to it "
            "(and PREFECT_API_AUTH_STRING if it asks for one). See docs/fanout.md, 'Sweeps'."
        )
    if args.set_param:
        queue = [
            str(Path(sys.executable).parent / "dvc"),
            "exp",
            "run",
            "--queue",
            *(f"--set-param={value}" for value in args.set_param),
        ]
        if subprocess.run(queue, check=False).returncode != 0:
            raise PipelineError(f"`{' '.join(queue)}` failed (above): nothing was sent to the pool.")
    return _run_with_prefect([sys.executable, "-m", "pipeline.sweep", args.work_pool])


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register the model-chain deployment on a work pool, its code cloned from the project's git origin."""
    from pipeline import fanout

    if not check_prefect_api():
        raise PipelineError("Set PREFECT_API_URL to the Prefect server the workers poll (see the README, 'Beyond one machine').")
    repo = args.repo or fanout.command(["git", "remote", "get-url", "origin"], Path.cwd()).strip()
    names = fanout.deploy(args.work_pool, repo, args.zombie_after)
    print(
        f"Registered {' and '.join(names)} (code from {repo}). "
        f"Start workers with: prefect worker start --pool {args.work_pool} --limit 1"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the end-to-end flow as a Prefect deployment with a schedule, until Ctrl-C."""
    return _run_with_prefect([sys.executable, "-m", "pipeline.dag", "--serve", "--name", args.name, "--cron", args.cron])


def cmd_alerts(args: argparse.Namespace) -> int:
    """Alerts through the Prefect server the stages report to: a failed pipeline run and a model under its
    gate notify a webhook (pipeline/alerts.py); --off removes them."""
    from pipeline import alerts

    if not args.off and urlsplit(args.webhook or "").scheme not in ("http", "https"):
        raise PipelineError(f"--webhook {args.webhook!r} is not an http(s) URL: give the address the alerts are posted to.")
    api = check_prefect_api() or dashboards_api()
    if api is None:
        raise PipelineError(
            "No Prefect server to hold the alerts: start the project's (`make dashboards`) or set PREFECT_API_URL "
            "to the one the stages report to, then run this again."
        )
    with temporary_settings(updates=client_settings(api)):
        if args.off:
            removed = alerts.remove_automations()
            print(f"Removed {', '.join(removed)} from {api}." if removed else f"No alerts were set on {api}.")
            return 0
        alerts.configure(args.webhook)
    print(
        f"Alerts go to {args.webhook}: a pipeline run that fails and a model under its gate, sent by the Prefect "
        f"server at {api} (automations {alerts.RUN_FAILED} and {alerts.GATE_MISSED}). `mnist alerts --off` removes them."
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Make a model's version the one in a registry stage (or move the stage back a version); the serving
    stage's version is published (pipeline/promote.py)."""
    from pipeline import promote

    root = Path.cwd()
    if args.rollback:
        if args.from_experiment:
            raise PipelineError("--rollback moves the stage back to an earlier version: it takes no --from")
        done = promote.rollback(root, args.model, args.stage)
        print(f"{done.model}: {done.stage} is {done.version} again (commit {done.rev[:7]})")
    else:
        done = promote.promote(root, args.model, args.stage, args.from_experiment)
        print(f"{done.model}: {done.version} (commit {done.rev[:7]}) is in {done.stage}")
    if done.serving is not None:
        print(f"serving: {load_params(root / 'params.yaml').serving.base}/{done.model}/{done.serving}")
    print("pushed: " + (", ".join(done.pushed) if done.pushed else "nothing (no git origin, no DVC remote)"))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The registry's versions of each model: stages, test accuracy, commit, and the one that serves."""
    from pipeline import promote

    rows = promote.table(Path.cwd())
    if not rows:
        print("no model is registered yet: `mnist promote MODEL --stage prod` registers one")
        return 0
    print(f"{'model':<14}{'version':<10}{'stages':<14}{'accuracy':>9}  {'commit':<8}serving")
    for row in rows:
        accuracy = f"{row.accuracy:.4f}" if row.accuracy is not None else "-"
        serving_now = f"yes (version {row.serving})" if row.serving is not None else ""
        print(
            f"{row.model:<14}{row.version:<10}{','.join(row.stages) or '-':<14}{accuracy:>9}  {row.commit:<8}{serving_now}".rstrip()
        )
    return 0


def until_stopped(signals: servers.Signals) -> None:
    """Serve until SIGINT or SIGTERM arrives (the servers' context managers then stop them)."""
    while signals.received is None:
        time.sleep(0.5)


def cmd_dashboards(args: argparse.Namespace) -> int:
    """The Prefect UI and TensorBoard together, until Ctrl-C or SIGTERM; with --stop, stop the servers that
    bare `dvc repro` runs started in the background instead."""
    if args.stop:
        lines = servers.stop_background()
        print("\n".join(lines) if lines else "nothing to stop: no server runs in the background (started by a bare `dvc repro`)")
        return 0
    if not servers.is_loopback(args.host) and not os.environ.get(AUTH_ENV):
        raise PipelineError(
            f"--host {args.host} lets other machines reach the Prefect server: set {AUTH_ENV}=user:password "
            f"first (and PREFECT_API_AUTH_STRING to the same on every client and worker), or bind 127.0.0.1."
        )
    if args.database_url and urlsplit(args.database_url).password:
        raise PipelineError(
            "--database-url carries a password, and a command line is visible to every account on this machine "
            f"(ps). Put the URL in the environment instead: export {servers.DATABASE_ENV}='postgresql+asyncpg://...' "
            "and leave out --database-url."
        )
    # From the first moment to the last, SIGINT and SIGTERM only ask for a stop: a signal during
    # start-up or shut-down cuts nothing halfway, and every server started is stopped.
    with servers.Signals() as signals:
        try:
            with (
                servers.prefect_server(
                    args.host,
                    args.prefect_port,
                    database_url=args.database_url,
                    signals=signals,
                    restart=True,
                    on_restart=mark_orphans,
                ) as api,
                servers.tensorboard_server(  # TensorBoard has no authentication: loopback only, whatever --host says
                    TENSORBOARD_LOGDIR, "127.0.0.1", args.tensorboard_port, live=TRAINING_NOW, signals=signals
                ) as tb,
            ):
                mark_orphans(api)
                if args.prefect_port == localserver.port():  # the stages look for the project's server there
                    clients = "A bare `dvc repro`, `dvc exp run` or queued experiment reports here with no setting."
                else:
                    clients = (
                        f"For a bare `dvc repro` to report here: export PREFECT_API_URL={api}"
                        " PREFECT_API_AUTH_STRING=<the auth string above>"
                    )
                print(f"Prefect:     {api.removesuffix('/api')}\nTensorBoard: {tb}\n{clients}\nCtrl-C stops both.", flush=True)
                until_stopped(signals)
        except servers.Stopped:
            pass
    print("stopped.", flush=True)
    return 0


def newest_saved_model(model: str, serving_base: Path, exports: Path = EXPORT_ROOT) -> Path:
    """The newest version of `model` in the serving folder; else the export stage's SavedModel
    (a workspace filled by `dvc pull` has that one before the publish stage ever ran in it)."""
    from pipeline import artifacts, serving

    published = serving.newest(serving_base / model)
    if published is not None:
        return published
    exported = exports / model / artifacts.SAVED_MODEL
    if exported.is_dir():
        return exported
    raise PipelineError(
        f"No SavedModel of {model} in {serving_base / model}/ or {exported}/: run the pipeline first (make run) "
        f"or fetch its outputs from a DVC remote (dvc pull), and check in {exports / model}/export.json whether "
        f"{model} passed its quality gate."
    )


# What `mnist predict` decodes of a PNG, checked before decoding (TensorFlow alone would take up to 2^29
# pixels, and resizes in float: 4 bytes a pixel). A digit photographed at 8192x4096 still fits.
MAX_PNG_BYTES = 32 << 20  # the PNG file's size
MAX_PNG_PIXELS = 1 << 25  # its width x height, as its IHDR header gives them


def check_png_size(path: Path, header: bytes) -> None:
    """Raise PipelineError if the PNG at `path` (its first 24 bytes: `header`) is over MAX_PNG_BYTES or MAX_PNG_PIXELS."""
    size = path.stat().st_size
    if size > MAX_PNG_BYTES:
        raise PipelineError(
            f"{path} is a PNG of {size:,} bytes; `mnist predict` reads PNGs of up to {MAX_PNG_BYTES:,} bytes "
            f"({MAX_PNG_BYTES >> 20} MiB): scale the image down (the model sees 28x28 pixels)."
        )
    if len(header) < 24 or header[12:16] != b"IHDR":
        raise PipelineError(f"{path} is not a readable PNG (no IHDR header where the PNG format puts it).")
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    if width * height > MAX_PNG_PIXELS:
        raise PipelineError(
            f"{path} is a PNG of {width}x{height} pixels; `mnist predict` decodes up to {MAX_PNG_PIXELS:,} "
            "pixels: scale the image down (the model sees 28x28 pixels)."
        )


def read_images(path: Path, invert: bool) -> np.ndarray:
    """A PNG (up to MAX_PNG_BYTES and MAX_PNG_PIXELS, resized to MNIST's 28x28) or an IDX image file, as uint8 [n, height, width]."""
    # TensorFlow and the models load only for the commands that use them (predict, describe):
    # `mnist run` and `mnist dashboards` start without paying for them.
    import numpy as np
    import tensorflow as tf

    if not path.is_file():
        raise PipelineError(f"{path} does not exist.")
    with open(path, "rb") as f:
        header = f.read(24)
    if header[:8] == b"\x89PNG\r\n\x1a\n":
        check_png_size(path, header)
        data = path.read_bytes()
        try:
            image = tf.io.decode_png(data, channels=1)
        except tf.errors.InvalidArgumentError as exc:
            raise PipelineError(f"{path} is not a readable PNG ({exc.message.strip()}).") from None
        if tuple(image.shape[:2]) != IMAGE_SHAPE:
            image = tf.cast(tf.image.resize(image, IMAGE_SHAPE, antialias=True), tf.uint8)
        images: np.ndarray = image.numpy()[None, :, :, 0]
    elif header[:3] == b"\x00\x00\x08":
        try:
            images = parse_idx(path.read_bytes(), path.name, ndim=3)
        except DataError as exc:
            raise PipelineError(f"{path} is not an IDX file of images: {str(exc).split('. ')[0]}.") from None
    else:
        raise PipelineError(f"{path} is neither a PNG nor an IDX image file.")
    return (255 - images).astype(np.uint8) if invert else images


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify PNG or IDX images with an exported SavedModel alone (no Keras model, no params)."""
    import tensorflow as tf

    from pipeline.export import predict

    if args.saved_model:
        version = Path(args.saved_model)
    else:
        version = newest_saved_model(args.model, Path(load_params(args.params).serving.base))
    loaded = tf.saved_model.load(str(version))
    for path in args.images:
        images = read_images(Path(path), args.invert)
        try:
            out = predict(loaded, images)
        except ExportError as exc:
            raise PipelineError(f"{path}: {exc}") from None
        for i, (cls, probs) in enumerate(zip(out["class"], out["probabilities"])):
            label = path if len(images) == 1 else f"{path}[{i}]"
            print(f"{label}: {int(cls)} (probability {float(probs[cls]):.4f})")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """The layer table of registry models, computed from the course notes' conv-net formulas."""
    from pipeline.models.arithmetic import format_table, layer_table
    from pipeline.models.registry import PARAM_TYPES, REGISTRY, build

    params = load_params(args.params, PARAM_TYPES)
    for name in args.models or list(params.models):
        model = build(name, params.model(name))
        print(f"{name}: {REGISTRY[name].description}\n{format_table(layer_table(model))}\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The TensorBoard runs of DVC experiments side by side in one logdir; then TensorBoard on it until Ctrl-C."""
    from pipeline.compare import gather

    if not args.no_serve and not servers.is_loopback(args.host):
        raise PipelineError(
            f"--host {args.host} would let other machines reach TensorBoard, which has no authentication: bind a "
            f"loopback address (the default 127.0.0.1), and from another machine tunnel to it: "
            f"ssh -L {args.port}:127.0.0.1:{args.port} <this machine>."
        )
    laid_out = gather(Path("."), args.experiments, args.logdir)
    for name, stages in laid_out.items():
        print(f"{args.logdir}/{name}/: {', '.join(stages)}, report (HParams trials)")
    if args.no_serve:
        return 0
    with servers.Signals() as signals:
        try:
            with servers.tensorboard_server(args.logdir, args.host, args.port, signals=signals) as tb:
                print(f"TensorBoard: {tb}\nCtrl-C stops it.", flush=True)
                until_stopped(signals)
        except servers.Stopped:
            pass
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Read every output that dvc.lock names, and its cache object; repair what is damaged, moving the damaged
    copies aside; report a modified output and leave it alone. Exit 1 if anything was damaged."""
    if not Path("dvc.lock").exists():
        print("no dvc.lock here: nothing is recorded to verify (run the pipeline first, from the project root)")
        return 0
    report = integrity.verify(Path("."))
    here = Path.cwd().resolve()

    def shown(path: Path) -> Path:
        return path.relative_to(here) if path.is_absolute() and path.is_relative_to(here) else path

    for f in report.findings:
        print(f"{shown(f.path)}: {f.what}: {f.action}" + (f" (the damaged copy: {shown(f.aside)})" if f.aside else ""))
    if any(not f.damage for f in report.findings):
        print(
            "a modified output is left as it is: `dvc commit` records it, `dvc checkout <path>` puts back what dvc.lock records"
        )
    if report.aside:
        print(
            f"nothing was deleted: each damaged copy is in {shown(report.aside)}/, under its own path; "
            f"to put one back: mv {shown(report.aside)}/<path> <path>"
        )
    if not report.damaged:
        print(
            "no damage: every output in dvc.lock and its cache object hold the bytes dvc.lock records"
            + (", or are newer outputs" if report.findings else "")
        )
        return 0
    if any(f.action == "moved aside" for f in report.damaged):
        print("run `dvc repro` to make the outputs moved aside again (or `dvc pull` to fetch them from the remote)")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="dvc repro, with every stage on a Prefect server")
    run.add_argument(
        "--cold",
        action="store_true",
        help="start every stage as a new process (by default each is forked from one that has imported them: pipeline/warm.py)",
    )
    run.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro (e.g. train@cnn, --force)")
    run.set_defaults(fn=cmd_run)

    fl = sub.add_parser("flow", help="the end-to-end Prefect flow (each DVC stage a task)")
    fl.add_argument("--work-pool", help="run each stale model chain on this Prefect work pool (see `mnist deploy`)")
    fl.set_defaults(fn=cmd_flow)

    sw = sub.add_parser("sweep", help="run the queued DVC experiments on a Prefect work pool's workers")
    sw.add_argument("--work-pool", required=True, help="the pool whose workers run them (see `mnist deploy`)")
    sw.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="PARAM=VALUES",
        help="queue experiments first, as `dvc exp run --queue -S` does (comma-separated values make a grid)",
    )
    sw.set_defaults(fn=cmd_sweep)

    dep = sub.add_parser("deploy", help="register the model-chain and experiment deployments on a Prefect work pool")
    dep.add_argument("--work-pool", required=True, help="the pool (created as a process pool if missing)")
    dep.add_argument("--repo", help="git URL the workers clone (default: this clone's origin)")
    dep.add_argument(
        "--zombie-after",
        type=int,
        default=120,
        metavar="S",
        help="mark a chain run Crashed after S seconds without a heartbeat from its worker (default 120)",
    )
    dep.set_defaults(fn=cmd_deploy)

    serve = sub.add_parser("serve", help="serve the end-to-end flow as a scheduled Prefect deployment")
    serve.add_argument("--name", default="scheduled", help="deployment name")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default 03:00 daily); '' for none")
    serve.set_defaults(fn=cmd_serve)

    dash = sub.add_parser("dashboards", help="Prefect UI on :4200 and TensorBoard on :6006, until Ctrl-C")
    dash.add_argument(
        "--host",
        default="127.0.0.1",
        help="the Prefect server's bind address (default loopback only; beyond it, "
        "PREFECT_SERVER_API_AUTH_STRING is required); TensorBoard, which has no authentication, stays on 127.0.0.1",
    )
    dash.add_argument("--prefect-port", type=int, default=localserver.port(), help="default 4200, or $MNIST_PREFECT_PORT")
    dash.add_argument("--tensorboard-port", type=int, default=6006)
    dash.add_argument(
        "--database-url",
        help="Prefect's database without a password, e.g. postgresql+asyncpg://prefect@host:5432/prefect; "
        f"with one, set {servers.DATABASE_ENV} instead (default: SQLite under PREFECT_HOME)",
    )
    dash.add_argument(
        "--stop",
        action="store_true",
        help="stop the Prefect and warm stage servers that bare `dvc repro` runs started in the background, and exit",
    )
    dash.set_defaults(fn=cmd_dashboards)

    pred = sub.add_parser("predict", help="classify PNG or IDX images with an exported SavedModel")
    pred.add_argument("images", nargs="+", help="PNG files (white digit on black, any size) or IDX image files")
    pred.add_argument("--model", default="cnn", help="model whose newest published version to use (default cnn)")
    pred.add_argument("--saved-model", help="a SavedModel folder to use instead of the newest published version")
    pred.add_argument("--params", default="params.yaml", help="its serving.base is where the versions are")
    pred.add_argument("--invert", action="store_true", help="for dark digits on a light background")
    pred.set_defaults(fn=cmd_predict)

    desc = sub.add_parser("describe", help="layer table (output volumes, parameters) of registry models")
    desc.add_argument("models", nargs="*", help="model names (default: every model in params.yaml)")
    desc.add_argument("--params", default="params.yaml")
    desc.set_defaults(fn=cmd_describe)

    comp = sub.add_parser("compare", help="TensorBoard on the runs of several DVC experiments, side by side")
    comp.add_argument("experiments", nargs="*", help="experiment names or git revisions (default: every experiment of HEAD)")
    comp.add_argument("--logdir", type=Path, default=Path("data/compare"), help="where to lay them out (default data/compare)")
    comp.add_argument("--host", default="127.0.0.1", help="TensorBoard's bind address (default loopback only)")
    comp.add_argument("--port", type=int, default=6007, help="TensorBoard's port (default 6007, beside the dashboards' 6006)")
    comp.add_argument("--no-serve", action="store_true", help="lay the runs out and stop")
    comp.set_defaults(fn=cmd_compare)

    al = sub.add_parser("alerts", help="notify a webhook when a pipeline run fails or a model misses its gate")
    how = al.add_mutually_exclusive_group(required=True)
    how.add_argument("--webhook", help="the URL the alerts are posted to, as JSON {subject, body}")
    how.add_argument("--off", action="store_true", help="remove the alerts")
    al.set_defaults(fn=cmd_alerts)

    pro = sub.add_parser("promote", help="put a model's version in a registry stage (DVC's registry, GTO tags); prod serves")
    pro.add_argument("model", help="a model of params.yaml")
    pro.add_argument("--stage", required=True, help="the registry stage, e.g. prod (params.yaml's serving.stage serves)")
    pro.add_argument("--from", dest="from_experiment", metavar="EXP", help="a DVC experiment's model instead of the workspace's")
    pro.add_argument("--rollback", action="store_true", help="move the stage back to the version it held before")
    pro.set_defaults(fn=cmd_promote)

    mod = sub.add_parser("models", help="the registry's versions of each model, their stages and which one serves")
    mod.set_defaults(fn=cmd_models)

    ver = sub.add_parser("verify", help="check every DVC output and cache object byte by byte; repair what is damaged")
    ver.set_defaults(fn=cmd_verify)

    args, unknown = parser.parse_known_args(argv)
    if unknown and args.fn is cmd_run:  # argparse's REMAINDER misses a leading option: `mnist run --force`
        args.dvc_args = unknown + args.dvc_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
