"""Executors run stage calls. LocalExecutor: in this process, in order, with progress lines.

The pipeline hands an executor independent calls (one per layer or matrix group); a distributed
executor maps the very same stage functions onto workers.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence, TextIO, TypeVar

from rankfold.orchestrator.progress import progress

Item = TypeVar("Item")
Result = TypeVar("Result")


class LocalExecutor:
    def __init__(self, stream: TextIO | None = sys.stderr):
        self.stream = stream

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item], stage: str) -> list[Result]:
        return [fn(item) for item in progress(items, stage, stream=self.stream)]

    def steps(self, items: Sequence[Item], stage: str):
        """Sequential steps that depend on each other (layer i feeds layer i+1), with progress."""
        return progress(items, stage, stream=self.stream)
