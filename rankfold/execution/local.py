"""LocalExecutor: stage work in this process, with progress. The Ray executor (ray.py) runs the very
same functions and classes on a cluster; both follow the protocol in base.py.

Threads by the work's size (`map`'s `work`): a small task (a factorisation of a few hundred to a few
thousand columns) runs on one thread, several such tasks at once; a large one runs alone on every
thread. Many small multi-threaded LAPACK calls spend their time at barriers, and on a shared machine
each barrier waits for a thread a neighbour has descheduled (measured: a decompose stage 4–37× slower
under load; benchmarks/shared_box.py). The choice depends on the size only, never on timing, so the
numbers are reproducible — and a small task's equal those of a 1-CPU Ray task.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from rankfold.core.device import use_device
from rankfold.core.resources import release_free_heap
from rankfold.execution.progress import progress

Item = TypeVar("Item")
Result = TypeVar("Result")
# Estimated floating-point operations up to which a task runs single-threaded beside others: a group of
# input width n ≲ 3000 (SmolLM2's, Qwen2.5-0.5B's); Llama-3-8B's (n = 4096, 14336) use every thread.
SMALL_TASK_FLOPS = 3e10


class LocalExecutor:
    threads_per_worker: int | None = None  # keep this process's torch threads

    def __init__(self, *, workers: int = 1, device: str = "auto", device_activations_bytes: int | None = None):
        """DeviceError (naming execution.device) when `device` is cuda and this process sees no GPU."""
        self.workers = workers  # shards, run one after another; 1 = the plain sequential computation
        self.device = use_device(device).type  # this process is every worker: resolved once, here
        self.device_activations_bytes = device_activations_bytes

    def describe(self) -> str:
        return f"local (in-process, {self.device})"

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item], stage: str,
            work: Sequence[float] | None = None, memory: Sequence[int] | None = None) -> list[Result]:
        """fn over items, results in item order. `work`: each item's floating-point operations (estimated);
        items at most SMALL_TASK_FLOPS run one thread each, as many at once as this process has threads,
        the rest one after another on every thread. Without `work`: one after another. `memory` is not
        needed: the large items already run one at a time."""
        fn = _releasing(fn)
        threads = torch.get_num_threads()
        small = [k for k in range(len(items)) if work is not None and work[k] <= SMALL_TASK_FLOPS]
        if not small:
            return [fn(item) for item in progress(items, stage)]
        results: dict[int, Result] = {}
        for _ in progress(_by_size(fn, items, small, threads, results), stage, total=len(items)):
            pass
        return [results[k] for k in range(len(items))]

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

    def call_all_split(self, handles: Sequence[Any], method: str, *args) -> list[tuple[Any, Any]]:
        return [tuple(getattr(handle, method)(*args)) for handle in handles]

    def combine(self, fn: Callable[..., Any], groups: Sequence[Sequence[Any]], handles: Sequence[Any]) -> list[Any]:
        return [fn(iter(group)) for group in groups]

    def reduce(self, fn: Callable[..., Result], item: Any, partials: Sequence[Any], handle: Any) -> Result:
        return fn(item, iter(partials))  # the shards are this process

    def release(self, handles: Sequence[Any]) -> None:
        for handle in handles:
            handle.release()

    def take_worker_peak_mb(self) -> float | None:
        return None  # the workers are this process: the stage meter already sees them

    def model_location(self, local: str, stored: str) -> str:
        return local  # the artifact as written in output.dir

    def close(self) -> None:
        pass


def _releasing(fn: Callable[[Item], Result]) -> Callable[[Item], Result]:
    """fn, then the C heap it freed handed back to the OS (core/resources.py): each pool thread's malloc arena
    keeps what its factorisations freed, so RSS would climb task after task (as Ray's tasks do, `_measured`)."""
    def run(item: Item) -> Result:
        result = fn(item)
        release_free_heap()
        return result
    return run


def _by_size(fn: Callable[[Item], Result], items: Sequence[Item], small: list[int], threads: int,
             results: dict[int, Result]) -> Iterator[None]:
    """Fill `results`: the `small` items on a pool of `threads` one-thread workers, then the rest on every
    thread; yields once per finished item (progress). The process's thread count is restored after."""
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        futures = {pool.submit(fn, items[k]): k for k in small}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            yield
        pool.shutdown()
        torch.set_num_threads(threads)  # the pool's threads set MKL's process-wide count to 1
        for k in sorted(set(range(len(items))) - set(small)):
            results[k] = fn(items[k])
            yield
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)
