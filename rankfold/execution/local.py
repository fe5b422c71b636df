"""LocalExecutor: stage work in this process, in order, with progress. The Ray executor (ray.py)
runs the very same functions and classes on a cluster; both follow the protocol in base.py."""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from rankfold.execution.progress import progress

Item = TypeVar("Item")
Result = TypeVar("Result")


class LocalExecutor:
    threads_per_worker: int | None = None  # keep this process's torch threads

    def __init__(self, *, workers: int = 1):
        self.workers = workers  # shards, run one after another; 1 = the plain sequential computation

    def describe(self) -> str:
        return "local (in-process)"

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item], stage: str) -> list[Result]:
        return [fn(item) for item in progress(items, stage)]

    def steps(self, items: Sequence[Item], stage: str):
        """Sequential steps that depend on each other (layer i feeds layer i+1), with progress."""
        return progress(items, stage)

    def actors(self, cls: type, init_args: Sequence[tuple]) -> list[Any]:
        return [cls(*args) for args in init_args]

    def call_all(self, handles: Sequence[Any], method: str, *args) -> list[Any]:
        return [getattr(handle, method)(*args) for handle in handles]

    def call_all_settled(self, handles: Sequence[Any], method: str, *args) -> list[Any]:
        return self.call_all(handles, method, *args)  # in-process, a failure is the job's failure

    def call_each(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]:
        return [getattr(handle, method)(*args) for handle, args in zip(handles, args_per_handle, strict=True)]

    def call_each_settled(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]:
        return self.call_each(handles, method, args_per_handle)  # in-process, a failure is the job's failure

    def release(self, handles: Sequence[Any]) -> None:
        for handle in handles:
            handle.release()

    def take_worker_peak_mb(self) -> float | None:
        return None  # the workers are this process: the stage meter already sees them

    def model_location(self, local: str, stored: str) -> str:
        return local  # the artifact as written in output.dir

    def close(self) -> None:
        pass
