"""Mixed precision for training (`models.<model>.precision` in params.yaml): the Keras dtype policy of a train stage.

`float32`, `bf16` (mixed_bfloat16) or `fp16` (mixed_float16): float32 weights, with bf16 or fp16
arithmetic in the mixed policies. `auto` is bf16 only on a CPU with bf16 instructions (AVX512-BF16
or AMX in /proc/cpuinfo) when TensorFlow sees no GPU, and float32 everywhere else. Only training
uses the policy: train_model returns the trained weights in a float32 model, which is what
evaluate and export load, whatever the precision. The measurements behind each model's setting
are in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
