"""The `Executor` protocol: what the stages ask of an executor, whichever runs them.

Two kinds of work:
- `map(fn, items, stage)`: independent items (one per matrix group or layer) of a top-level function;
- shards (`actors` + `call_all_settled` / `call_each`): stateful workers that each hold a slice of
  the token sequences and walk the layers in lockstep (calibration, Fisher, evaluation).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ShardLost:
    """A shard's worker died (its process was killed, or its node lost); the driver rebuilds it."""

    def __init__(self, reason: str):
        self.reason = reason


class Executor(Protocol):
    workers: int                    # data-parallel shards
    threads_per_worker: int | None  # torch threads in each shard (None: keep the process's)
    device: str                     # execution.device as each worker resolves it (core/device.py)
    device_activations_bytes: int | None  # activations a worker keeps on its GPU (None: a quarter of it free)

    def describe(self) -> str: ...

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item], stage: str,
            work: Sequence[float] | None = None, memory: Sequence[int] | None = None) -> list[Result]:
        """fn over items, results in item order; `work`: each item's estimated floating-point operations;
        `memory`: each item's estimated peak host bytes (on Ray: tasks that together exceed a node's memory
        do not run there at once)."""

    def steps(self, items: Sequence[Item], stage: str) -> Iterable[Item]:
        """Sequential steps that depend on each other (layer i feeds layer i+1), with progress."""

    def actors(self, cls: type, init_args: Sequence[tuple]) -> list[Any]: ...

    def call_all(self, handles: Sequence[Any], method: str, *args) -> list[Any]: ...

    def call_all_settled(self, handles: Sequence[Any], method: str, *args) -> list[Any]:
        """Like call_all, but a shard whose worker died yields a ShardLost instead of raising."""

    def call_each(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]: ...

    def call_each_settled(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]:
        """Like call_each, but a worker that died yields a ShardLost instead of raising."""

    def call_all_split(self, handles: Sequence[Any], method: str, *args) -> list[tuple[Any, Any]]:
        """`method` (returning (status, partial)) on every shard: each shard's (status, partial), the partial
        where it was made — Ray: an object reference the driver never fetches; in-process: the value —, or
        ShardLost for a worker that died. The partials go to `reduce`."""

    def combine(self, fn: Callable[..., Any], groups: Sequence[Sequence[Any]], handles: Sequence[Any]) -> list[Any]:
        """fn(iterable of group g's partials) run by shard `handles[g]`, every group at once (a round of a
        reduction tree): each result left where it was made, like a partial of `call_all_split`, or ShardLost
        for a worker that died (the group's partials stay available: a rebuilt shard can combine them)."""

    def reduce(self, fn: Callable[..., Result], item: Any, partials: Sequence[Any], handle: Any) -> Result:
        """fn(item, partials) run by the shard `handle` — `partials` an iterable handing them over one at a
        time, in order (Ray: fetched by that actor from the object store); the driver receives only the
        (small) result, or ShardLost when that shard's worker died."""

    def release(self, handles: Sequence[Any]) -> None: ...

    def take_worker_peak_mb(self) -> float | None:
        """Largest peak RSS (MiB) a worker process reported since the last call; None in-process."""

    def model_location(self, local: str, stored: str) -> str:
        """Where workers read a checkpoint: the local folder in-process, the store on a cluster."""

    def close(self) -> None: ...
