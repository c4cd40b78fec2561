"""Keep the server's large buffers in the heap instead of fresh ``mmap`` pages for every request.

A conv1-conv2 answer for one 32 px image is 655 KB; a batch of them is megabytes. glibc serves allocations above its
mmap threshold (128 KB, adjusted upwards as it goes) with a fresh ``mmap`` and returns them with ``munmap``, so
every request's tensors and reply buffers fault in new zeroed pages: the kernel's page-fault and page-clearing time
was about a quarter of the gRPC server's CPU in a profile (docs/serving.md). Raising the mmap threshold to glibc's
maximum (32 MiB) and the trim threshold keeps freed blocks for reuse, at the price of holding up to the trim
threshold of freed memory. ``tensorflow_model_server`` links its own allocator for the same reason.

Only :func:`keras_oneimage.serve.server.serve` calls this: it owns its process. ``make_app`` and
``start_in_thread`` run inside someone else's process and leave its allocator alone. The glibc environment
variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) still win when set: they are read at process
start, and this leaves them in place.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a batch of 32 answers of 655 KB fits.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed memory kept at the top of the heap before it is given back to the system.
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; True if applied (False: not glibc, or env set)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and macOS have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    )
