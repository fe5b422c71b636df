"""Documents split over whole-model workers: each worker (a Ray actor, or this process) opens the
model at the evaluation's location and serves one contiguous slice; results come back in document
order, so in-process and Ray runs see the same documents in the same order."""

from __future__ import annotations

from typing import Any, Sequence

from rankfold.evaluation.registry import EvaluationContext
from rankfold.workers.lm import ModelWorker


def slices(count: int, parts: int) -> list[range]:
    """`count` documents in `parts` contiguous, near-equal slices (none empty)."""
    parts = max(1, min(parts, count))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


class ModelWorkers:
    """`min(executor.workers, documents)` workers holding the model (in `dtype`, default the job's
    model.dtype); `map` runs one method over a document list split among them and concatenates the
    results in order."""

    def __init__(self, context: EvaluationContext, documents: int, dtype: str | None = None):
        self.executor = context.executor
        parts = max(1, min(self.executor.workers, documents))
        self.handles = self.executor.actors(ModelWorker, [(context.location, dtype or context.dtype,
                                                           self.executor.threads_per_worker)] * parts)

    def map(self, method: str, items: Sequence[Any], *args) -> list[Any]:
        parts = slices(len(items), len(self.handles))
        results = self.executor.call_each(self.handles[:len(parts)], method,
                                          [(list(items[p.start:p.stop]), *args) for p in parts])
        return [x for part in results for x in part]

    def call_first(self, method: str, *args) -> Any:
        """`method(*args)` on the first worker (what every worker would answer alike)."""
        return self.executor.call_each(self.handles[:1], method, [args])[0]

    def __enter__(self) -> "ModelWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.executor.release(self.handles)
