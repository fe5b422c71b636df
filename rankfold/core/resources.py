"""This process's resource use, for stage reports."""

from __future__ import annotations

import resource


def process_peak_rss_mb() -> float:
    """This process's peak resident memory over its lifetime (Linux reports KiB). A shard actor
    lives for one stage, so for it this is the stage's peak; a task worker may serve several."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
