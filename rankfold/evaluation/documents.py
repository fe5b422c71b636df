"""Documents split over whole-model workers: each worker (a Ray actor, or this process) opens the
model at the evaluation's location and serves one contiguous slice; results come back in document
order, so in-process and Ray runs see the same documents in the same order."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from rankfold.evaluation.registry import EvaluationContext
from rankfold.execution.base import ShardLost
from rankfold.execution.streaming import MAX_SHARD_REBUILDS
from rankfold.workers.lm import ModelWorker

log = logging.getLogger(__name__)


def slices(count: int, parts: int) -> list[range]:
    """`count` documents in `parts` contiguous, near-equal slices (none empty)."""
    parts = max(1, min(parts, count))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


class ModelWorkers:
    """`min(executor.workers, documents)` workers holding the model (in `dtype`, default the job's
    model.dtype); `map` runs one method over a document list split among them and concatenates the
    results in order. A worker that dies (its process killed, its node lost) is replaced and its slice
    run again: documents are independent and a worker holds nothing but the model, so the rows equal
    an undisturbed run's."""

    def __init__(self, context: EvaluationContext, documents: int, dtype: str | None = None):
        self.executor, self.label = context.executor, context.label
        parts = max(1, min(self.executor.workers, documents))
        self.init_args = (context.location, dtype or context.dtype, self.executor.threads_per_worker,
                          self.executor.device)
        self.handles = self.executor.actors(ModelWorker, [self.init_args] * parts)
        self.replaced = [0] * parts

    def map(self, method: str, items: Sequence[Any], *args) -> list[Any]:
        parts = slices(len(items), len(self.handles))
        results = self._call(method, [(list(items[p.start:p.stop]), *args) for p in parts])
        return [x for part in results for x in part]

    def call_first(self, method: str, *args) -> Any:
        """`method(*args)` on the first worker (what every worker would answer alike)."""
        return self._call(method, [args])[0]

    def _call(self, method: str, args_per_worker: list[tuple]) -> list[Any]:
        handles = self.handles[:len(args_per_worker)]
        results = self.executor.call_each_settled(handles, method, args_per_worker)
        for k, result in enumerate(results):
            while isinstance(result, ShardLost):
                self._replace(k, result)
                result = self.executor.call_each_settled([self.handles[k]], method, [args_per_worker[k]])[0]
            results[k] = result
        return results

    def _replace(self, k: int, lost: ShardLost) -> None:
        self.replaced[k] += 1
        if self.replaced[k] > MAX_SHARD_REBUILDS:
            raise RuntimeError(f"{self.label}: worker {k} lost {self.replaced[k]} times (last: {lost.reason}); "
                               "giving up")
        log.warning("%s: worker %d lost (%s); replacing it and running its documents again", self.label, k,
                    lost.reason)
        self.handles[k] = self.executor.actors(ModelWorker, [self.init_args])[0]

    def __enter__(self) -> "ModelWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.executor.release(self.handles)
