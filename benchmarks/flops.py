"""Benchmark 6: how far the CNN's training is from the CPU's peak.

FLOPs come from the layer table (pipeline.models.arithmetic.layer_table on the built model):

    conv   forward FLOPs per image = 2 * F * F * D1 * K * H2 * W2   (a multiply and an add per weight use)
    dense  forward FLOPs per image = 2 * N1 * N2
    one training step ~ 3 x forward (forward, gradient w.r.t. inputs, gradient w.r.t. weights)

Pooling, ReLU, dropout, biases, the loss and the optimizer update are left out (a few % at most).
Achieved FLOP/s = training FLOPs per image x the throughput benchmark's best project samples/s.
The peak is derived from /proc/cpuinfo and printed with its assumptions.
"""

from __future__ import annotations

import os

from benchmarks.common import REPO, Context, Row, cpuinfo

MODEL = "cnn"


def forward_flops(model) -> tuple[int, list[tuple[str, int]]]:
    """Forward FLOPs per image of a Sequential model's Conv2D and Dense layers, from its layer table."""
    import keras

    from pipeline.models.arithmetic import layer_table

    rows = layer_table(model)
    per_layer = []
    for layer, before, row in zip(model.layers, rows[:-1], rows[1:]):  # rows[0] is the input
        if type(layer) is keras.layers.Conv2D:
            f1, f2 = layer.kernel_size
            d1 = before.shape[-1]
            h2, w2, k = row.shape
            per_layer.append((layer.name, 2 * f1 * f2 * d1 * k * h2 * w2))
        elif isinstance(layer, keras.layers.Dense):
            per_layer.append((layer.name, 2 * before.shape[-1] * row.shape[-1]))
    return sum(f for _, f in per_layer), per_layer


def cpu_peak() -> tuple[float | None, str, float | None]:
    """(peak fp32 FLOP/s, how it was derived, the figure under the other plausible FMA-unit count)."""
    cpu = cpuinfo()
    flags = set(cpu.get("flags", "").split())
    if "cpu MHz" not in cpu or "fma" not in flags:
        return None, "no 'cpu MHz' or no FMA in /proc/cpuinfo", None
    ghz = float(cpu["cpu MHz"]) / 1000
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    isa = {16: "avx512f", 8: "avx2", 4: "sse"}[lanes]
    units = 2  # assumed: 2 FMA units per core (Intel server cores with AVX-512, AMD Zen 4 / Zen 5)
    cores = os.cpu_count() or 1
    peak = cores * ghz * 1e9 * lanes * 2 * units
    vendor = cpu.get("vendor_id", "")
    family = cpu.get("cpu family", "?")
    how = (
        f"{cores} cores (os.cpu_count) x {ghz:.2f} GHz ('cpu MHz') x {lanes} fp32 lanes ({isa}) x 2 (FMA) "
        f"x {units} FMA units/core (assumed) = {peak / 1e9:,.0f} GFLOP/s"
    )
    # Zen 4 (AMD family 25 with AVX-512) runs a 512-bit FMA as two halves on its two 256-bit
    # FMA pipes: per core that is one 512-bit FMA per cycle, half the figure above.
    alternative = peak / 2 if (vendor == "AuthenticAMD" and family == "25" and lanes == 16) else None
    return peak, how, alternative


def cnn_throughput(ctx: Context, params) -> tuple[float, str]:
    """The CNN's best measured project samples/s: from the throughput benchmark, or measured now (project loop only)."""
    results = ctx.shared.get("throughput", {})
    if MODEL in results:
        best = results[MODEL]["best_project_variant"]
        return results[MODEL]["best"][best].steady, f"throughput benchmark, {best}, steady rate"
    from benchmarks import throughput

    data = throughput.load_data(ctx)
    result = throughput.measure(MODEL, params, data, [throughput.Variant("project", "project")], ctx)
    return result["best"]["project"].steady, "measured here, project loop as params.yaml says, steady rate"


def run(ctx: Context) -> list[Row]:
    from pipeline.config import load_params
    from pipeline.models import registry

    params = load_params(REPO / "params.yaml", model_types=registry.PARAM_TYPES)
    if MODEL not in params.models:
        return [Row("flops", MODEL, None, "", "no cnn in params.yaml's models")]
    model = registry.build(MODEL, params.model(MODEL))
    forward, per_layer = forward_flops(model)
    step = 3 * forward
    rate, source = cnn_throughput(ctx, params)
    achieved = step * rate
    peak, how, alternative = cpu_peak()
    rows = [
        Row(
            "flops",
            f"{MODEL}: forward FLOPs per image",
            forward / 1e6,
            "MFLOP",
            ", ".join(f"{n} {f / 1e6:.2f}" for n, f in per_layer),
        ),
        Row("flops", f"{MODEL}: training FLOPs per image", step / 1e6, "MFLOP", "3 x forward"),
        Row("flops", f"{MODEL}: achieved", achieved / 1e9, "GFLOP/s", f"{rate:,.0f} images/s ({source})"),
        Row("flops", "CPU peak fp32", None if peak is None else peak / 1e9, "GFLOP/s", how),
    ]
    if peak:
        note = (
            f"of the peak above; {achieved / alternative:.1%} of {alternative / 1e9:,.0f} GFLOP/s if the 512-bit FMAs are split over 256-bit pipes (Zen 4)"
            if alternative
            else "of the peak above"
        )
        rows.append(Row("flops", f"{MODEL}: fraction of peak", 100 * achieved / peak, "%", note))
    ctx.details["flops"] = {
        "forward_flops_per_image": forward,
        "train_flops_per_image": step,
        "per_layer": dict(per_layer),
        "images_per_s": rate,
        "throughput_source": source,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "peak_derivation": how,
        "peak_flops_if_zen4_half_rate": alternative,
    }
    return rows
