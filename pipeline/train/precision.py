"""Mixed precision for training (`models.<model>.precision` in params.yaml): the Keras dtype policy of a train stage.

Measured on 2 cores of an AMD EPYC (family 26) with AVX-512 and AVX512-BF16 (Keras 3.15, TensorFlow
2.21). Seconds per epoch of 12,800 images after a warm-up, float32 then mixed_bfloat16, one model
after the other: cnn 3.90 -> 2.49, pattern_deep 4.28 -> 2.04, deep_mlp 0.58 -> 0.46, lenet 0.62 ->
0.54, mlp 0.27 -> 0.24, pattern_small 1.10 -> 1.07, logreg 0.05 -> 0.03, linear 0.03 -> 0.03. In
whole train stages (a full run in bf16, then the same in float32 as a queued experiment) bf16
paid for cnn, pattern_small, pattern_deep and deep_mlp (0.69 to 0.90 of the float32 training
time, test accuracy within 0.03 points, pattern_deep 0.18 points better) and not for linear,
logreg, mlp and lenet (1.03 to 1.32): params.yaml sets `auto` for the former, `float32` for the
latter. `auto` trains in bf16 only on a CPU with bf16 instructions and no visible GPU; a CPU
without them (not measured here) and GPUs (none was available) stay at float32. Only training
uses the policy: train_model returns the trained weights in a float32 model, which is what
evaluate and export load.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import keras
import tensorflow as tf

POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}  # precision: Keras's policy
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bf16 arithmetic


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def training_policy(setting: str) -> str:
    """The Keras dtype policy for a model's precision `setting`; `auto` is bf16 on a CPU with bf16 instructions
    (AVX512-BF16 or AMX) when TensorFlow sees no GPU, else float32."""
    if setting == "auto":
        native_bf16 = bool(cpu_flags() & BF16_CPU_FLAGS) and not tf.config.list_physical_devices("GPU")
        setting = "bf16" if native_bf16 else "float32"
    return POLICIES[setting]


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Inside: layers built take Keras dtype policy `name`; the previous global policy afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
