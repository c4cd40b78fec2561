"""Mixed precision: which Keras dtype policy a run uses, and a block that builds models under it.

``"auto"`` depends on the hardware (bf16 only pays where the CPU has bf16 matrix units), so the detection lives
here, next to the policy it chooses, rather than in any one method.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import keras
import tensorflow as tf

from keras_oneimage.errors import InputError

#: Keras dtype policies `fit` accepts for ``precision`` ("auto" resolves to one of the first two).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


#: /proc/cpuinfo flags of x86 bf16 matrix units that oneDNN uses: AMX tiles (Intel Sapphire Rapids and later) and
#: AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later). Either made RotNet's step 1.6-2.9x faster than
#: float32 (docs/performance.md).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """True on x86 CPUs whose bf16 matrix units oneDNN uses (:data:`BF16_CPU_FLAGS`)."""
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def resolve_precision(precision: str | None = "auto") -> str:
    """The Keras dtype policy name for ``precision``.

    ``"auto"`` (or None) picks ``"mixed_bfloat16"`` when training runs on a CPU with AMX-BF16 or AVX512-BF16 and
    TensorFlow's oneDNN kernels are on (faster RotNet steps with the same probe accuracy; docs/performance.md),
    else ``"float32"`` (GPUs, and CPUs without bf16 units, where bf16 is emulated and slower).
    """
    if precision is None or precision == "auto":
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")
        on_cpu = not tf.config.list_physical_devices("GPU")
        return "mixed_bfloat16" if on_cpu and onednn and cpu_has_bf16_units() else "float32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose 'auto' or one of: {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def precision_scope(precision: str | None = "auto") -> Iterator[str]:
    """Build models inside this block to give them the ``precision`` policy (resolved as `resolve_precision`);
    the global Keras policy is restored on exit. Yields the policy name.

    Weights stay float32 under the mixed policies; `AlexNet` and `RotNet` record the policy in their config, so a
    reloaded ``model.keras`` computes as it trained. ``AlexNet.features`` and every export return float32.
    """
    policy = resolve_precision(precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)
