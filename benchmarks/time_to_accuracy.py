"""Benchmark 2: wall time until each model's validation accuracy first reaches its gate.

Read from the pipeline's own record, never trained here: DVCLive's per-epoch metrics in
data/live/<model>/ (read with pipeline.artifacts.read_history) and the epoch seconds in
data/models/<model>/timings.json, summed up to the first epoch whose val_accuracy >=
gates.<model>. An epoch's seconds are what pipeline.train.callbacks.EpochLog measured: its
training and validation, not the process start, data loading or saving. The gate is on test accuracy; validation accuracy
stands in for it epoch by epoch.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.common import REPO, Context, Row


def read_history(live: Path, folder: Path) -> list[dict[str, float]]:
    """A model's per-epoch metrics (DVCLive's folder `live`), one dict of floats per epoch, with its
    `seconds` from the timings.json of its model folder."""
    from pipeline.artifacts import read_history as history_array, read_timings

    history = history_array(live)
    seconds = read_timings(folder, "train")["epoch_seconds"]
    return [{**{k: float(row[k]) for k in history.dtype.names}, "seconds": s} for row, s in zip(history, seconds)]


def time_to_gate(history: list[dict[str, float]], gate: float) -> tuple[float | None, int | None]:
    """(cumulative seconds, epoch) at the first epoch with val_accuracy >= gate; (None, None) if never."""
    total = 0.0
    for row in history:
        total += row["seconds"]
        if row["val_accuracy"] >= gate:
            return total, int(row["epoch"])
    return None, None


def provenance(name: str, params) -> list[str]:
    """Why a history might not be a full run with today's params: data.limit, changed params."""
    from pipeline.artifacts import META_FILE, read_meta
    from pipeline.config import params_hash

    notes = []
    lock = REPO / "dvc.lock"
    if lock.exists():
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
        data = stages.get("preprocess", {}).get("params", {}).get("params.yaml", {}).get("data", {})
        if data.get("limit"):
            notes.append(f"made with data.limit={data['limit']}")
    folder = REPO / "data" / "models" / name
    if (folder / META_FILE).exists():
        meta = read_meta(folder)
        if meta.get("params_hash") != params_hash(params.model(name)):
            notes.append("models params changed since")
    return notes


def run(ctx: Context) -> list[Row]:
    from pipeline.artifacts import LIVE_METRICS
    from pipeline.config import load_params
    from pipeline.models.registry import PARAM_TYPES

    params = load_params(REPO / "params.yaml", model_types=PARAM_TYPES)
    rows, details = [], {}
    for name in params.models:
        gate = params.gates[name]
        folder, live = REPO / "data" / "models" / name, REPO / "data" / "live" / name
        subject = f"{name} to val_accuracy {gate}"
        if not (live / LIVE_METRICS).is_dir():
            rows.append(Row("time_to_accuracy", subject, None, "s", f"no full run (no data/live/{name}/{LIVE_METRICS})"))
            continue
        history = read_history(live, folder)
        seconds, epoch = time_to_gate(history, gate)
        total = sum(r["seconds"] for r in history)
        best = max(history, key=lambda r: r["val_accuracy"])
        extra = provenance(name, params)
        if seconds is None:
            note = f"not reached in {len(history)} epochs ({total:.0f} s); best {best['val_accuracy']:.4f} at epoch {int(best['epoch'])}"
        else:
            note = f"epoch {epoch} of {len(history)}; all epochs {total:.0f} s"
        rows.append(Row("time_to_accuracy", subject, seconds, "s", "; ".join([note, *extra])))
        details[name] = {
            "gate": gate,
            "seconds": seconds,
            "epoch": epoch,
            "epochs": len(history),
            "total_seconds": total,
            "best_val_accuracy": best["val_accuracy"],
            "notes": extra,
        }
    ctx.details["time_to_accuracy"] = details
    return rows
