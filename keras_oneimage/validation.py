"""One home for the checks of user-supplied values shared by several commands (fit, probe, finetune, tune, export).

Every check raises :class:`~keras_oneimage.errors.InputError` with a one-line message naming the value, so the CLI
prints one line and exits with status 2. They run before anything is written to disk: a refused command leaves
the file system as it found it (docs/robustness.md).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from keras_oneimage.errors import InputError

#: ``keras.utils.set_random_seed`` seeds NumPy's legacy generator, which takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (a bool, a float or a string is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    value = int(value)
    if value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value}")
    return value


def int_at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (a bool, a float or a string is refused, not truncated).

    For bounds other than 1 (a shard index or a start step may be 0, a patch side must be at least 4), where
    "positive" would misstate the bound.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def seed(value: Any, name: str = "seed") -> int:
    """A random seed: an integer in [0, 2**32 - 1] (what NumPy, TensorFlow and Keras all accept)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InputError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
    value = int(value)
    if not 0 <= value <= MAX_SEED:
        raise InputError(f"{name} must be an integer in [0, 2**32 - 1], got {value}")
    return value


def positive_finite(name: str, value: Any) -> float:
    """A number > 0 that is neither NaN nor infinite (a learning rate: inf trains to NaN and reports chance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise InputError(f"{name} must be a positive finite number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {number!r}")
    if number <= 0:
        raise InputError(f"{name} must be a positive number, got {value!r}")
    return number


def utf8_path(name: str, value: Any) -> str:
    """A path argument as ``str``; refused if it is not a path or not valid UTF-8.

    Source images are read as bytes, so any name works there; but every path that TensorFlow writes to
    (TensorBoard logs, SavedModel exports) crosses TensorFlow's string type, which must be UTF-8: such a path
    failed half-way, after the directory had been created.
    """
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} {value!r}")
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise InputError(f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise InputError(f"{name} '{shown}' is not valid UTF-8, which TensorFlow cannot write to; "
                         "choose a UTF-8 name") from None
    return text


# ------------------------------------------------------------------------------------------------------ memory
def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say (the memory check is then skipped)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_step_memory(batch_size: int, bytes_per_example: int, what: str) -> int:
    """Refuse a batch whose training step cannot fit in the machine's memory; return the estimate in bytes.

    ``bytes_per_example`` is a lower bound of what one example of the batch keeps alive during a step (its input
    and the activations the backward pass needs). A batch needing more than the whole physical memory would fail
    only after minutes (ResourceExhaustedError) or overflow TensorFlow's 32-bit sizes (an internal error), so it
    is refused at once, with the estimate. Batches that merely come close are left to run.
    """
    if batch_size > 2**31 - 1:  # TensorFlow's kernels index a batch with 32-bit integers
        raise InputError(f"batch_size={batch_size:,} is above 2**31 - 1 = 2,147,483,647, the largest batch "
                         "TensorFlow can index")
    estimate = int(batch_size) * int(bytes_per_example)
    available = physical_memory_bytes()
    if available is not None and estimate > available:
        raise InputError(
            f"batch_size={batch_size:,} needs at least {_gib(estimate)} of memory per training step ({what}, "
            f"about {bytes_per_example:,} bytes per example), more than this machine's {_gib(available)}; "
            f"use a batch_size of at most {max(1, available // max(1, bytes_per_example)):,}"
        )
    return estimate


def layer_names(value: Any, known: Sequence[str], label: str = "layers", *, allow_empty: bool = False
                ) -> tuple[str, ...]:
    """``value`` (a tap name or a sequence of them) as a tuple of distinct names in ``known``, in the given order.

    ``known`` is read from the trunk (its ``TAPS``), never copied, so every trunk checks the names it has.
    ``allow_empty`` accepts no names at all (fine-tuning with nothing frozen).
    """
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise InputError(f"{label} must be a layer name or a sequence of them, got {value!r}") from None
    known = tuple(known)
    if not names and not allow_empty:
        raise InputError(f"{label} must name at least one layer; choose from {', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        raise InputError(f"unknown layer(s) {bad} in {label}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise InputError(f"{label} has duplicates: {list(names)}")
    return names
