"""This process's resource use, for stage reports, and handing its free heap back to the OS."""

from __future__ import annotations

import ctypes
import functools
import resource


def process_peak_rss_mb() -> float:
    """This process's peak resident memory over its lifetime (Linux reports KiB). A shard actor
    lives for one stage, so for it this is the stage's peak; a task worker may serve several."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not musl, not macOS)
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim(0)`). Freed blocks below glibc's
    mmap threshold (which grows to 32 MiB as large blocks are freed) stay in the process's RSS until
    then: a tokenizer's pass over a 3 MB calibration text left the driver 330 MB larger for the whole
    job, a layer's forward temporaries ~100 MB in each shard. Cheap (milliseconds): called after such
    steps. Returns False where the C library has no malloc_trim (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
