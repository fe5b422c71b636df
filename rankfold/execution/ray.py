"""RayExecutor: the pipeline's stage work on Ray — embedded (`ray.init()`) or a cluster address.

- `map` items become tasks (one per matrix group / layer; on CUDA workers small ones batched), retried
  when their worker dies; they read inputs from, and write results to, the artifact store, so a retry
  redoes one task's items only.
- Shards become actors, one per worker, each holding its slice of the token sequences; the driver
  calls them layer by layer and reduces what they return in shard order.
Workers need rankfold importable: the same environment (local), or an image / runtime_env (cluster).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence, TypeVar

from rankfold.core.arrays import shareable
from rankfold.core.device import DeviceError
from rankfold.core.errors import BadInput, RankfoldError
from rankfold.execution.base import ShardLost
from rankfold.execution.batching import work_batches
from rankfold.execution.progress import progress

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)


def _measured(fn: Callable[[Item], Result], items: list[Item], device: str, threads: int) -> tuple[list[Result], float]:
    """fn over a batch of items in turn (run on `device`, core/device.py, with `threads` torch threads: the
    CPUs the task was given) and the worker's peak RSS (MiB): the driver's meter cannot see workers."""
    import torch

    from rankfold.core.device import use_device
    from rankfold.core.resources import process_peak_rss_mb, release_free_heap

    on_cuda = use_device(device).type == "cuda"
    torch.set_num_threads(threads)  # per task: a worker process serves tasks of different sizes
    results = []
    for item in items:
        results.append(fn(item))
        release_free_heap()  # the next item, or the next task, may be smaller: temporaries not held
        if on_cuda:  # a batch's next item, of another shape, within the GPU share its task reserved
            torch.cuda.empty_cache()
    return results, process_peak_rss_mb()


def _reduced(fn: Callable[..., Result], item: Item, refs: list) -> tuple[Result, float]:
    """A reduce's result and its worker's peak RSS (MiB). `refs` come nested in a list, so Ray does not
    fetch them all before the call starts: fn receives them one at a time."""
    import ray

    from rankfold.core.resources import process_peak_rss_mb, release_free_heap

    result = fn(item, (ray.get(ref) for ref in refs))
    release_free_heap()
    return result, process_peak_rss_mb()


def _combined(fn: Callable[..., Any], refs: list) -> tuple[int, Any]:
    """(0, fn of the partials fetched one at a time): a status for the driver, a partial for the next round."""
    import ray

    return 0, shareable(fn(ray.get(ref) for ref in refs))


def _device_memory(device: str) -> int:
    """Total memory (bytes) of the GPU `device` (execution.device) resolves to in this worker; 0 when it
    resolves to the CPU (core/device.py)."""
    import torch

    from rankfold.core.device import resolve_device

    where = resolve_device(device)
    return torch.cuda.get_device_properties(where).total_memory if where.type == "cuda" else 0


# How long a job waits for an (autoscaling) cluster to offer the CPUs its shards need.
RESOURCE_WAIT_S = float(os.environ.get("RANKFOLD_RAY_RESOURCE_WAIT_S", "300"))


class ClusterError(BadInput, RuntimeError):
    """The Ray cluster cannot be reached or used; the message names the address."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an absent head for minutes; a plain TCP connect answers in seconds."""
    import socket

    host_port = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray cluster address {address!r} is not HOST:PORT or SCHEME://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


class RayExecutor:
    def __init__(self, address: str | None = None, workers: int = 2, cpus_per_worker: int = 1, *,
                 gpus_per_worker: float = 0.0, device: str = "auto", device_activations_bytes: int | None = None,
                 max_retries: int = 3,
                 resource_wait_s: float = RESOURCE_WAIT_S):
        """ClusterError when the cluster cannot be reached or lacks the CPUs or GPUs the workers need.
        `device` (execution.device) is resolved by each worker; a worker that requests no GPU runs on
        the CPU (a GPU it was not given may be another worker's)."""
        import ray

        self.ray = ray
        self.workers, self.cpus_per_worker, self.max_retries = workers, cpus_per_worker, max_retries
        self.gpus_per_worker = gpus_per_worker
        self.device = device if gpus_per_worker else "cpu"
        self.device_activations_bytes = device_activations_bytes
        self.threads_per_worker = cpus_per_worker
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self._started_here = False
        self._worker_peak_mb: float | None = None
        if not ray.is_initialized():
            if self.address and self.address != "auto":
                check_reachable(self.address)
            try:
                # "local": a new embedded instance, never a `ray start` cluster that ray.init() would find
                ray.init(address=self.address or "local", include_dashboard=False, configure_logging=False,
                         log_to_driver=log.isEnabledFor(logging.INFO))  # workers' output only when we report
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = self.address or "a new local Ray instance"
                raise ClusterError(f"cannot reach the Ray cluster at {where}: {err}") from None
            self._started_here = True
        embedded = not self.address  # this machine's Ray: it cannot grow
        try:
            self._check_resources(0.0 if embedded else resource_wait_s)
            # the memory of the workers' GPU (bytes; 0 where they run on the CPU): GPU tasks' process and share
            self.device_memory = self._probe_device() if self.gpus_per_worker else 0
        except (ClusterError, DeviceError):
            self.close()  # an instance started here is not left behind
            raise

    def _resources(self, kind: str) -> tuple[float, float]:
        """(`kind` available now — other jobs may hold some —, `kind` of the largest alive node)."""
        return self.ray.available_resources().get(kind, 0.0), self._largest_node(kind)[0]

    def _shortage(self) -> str | None:
        """What the cluster lacks for the shards, which run at once (lockstep): workers × per-worker CPUs
        and GPUs in all, one worker's on one node; None when it has them. GPUs first: the scarcer, and a
        CPU a task just gave back may still show as held for a moment."""
        for kind, field, per_worker in (("GPU", "gpus_per_worker", self.gpus_per_worker),
                                        ("CPU", "cpus_per_worker", self.cpus_per_worker)):
            need, (total, largest) = self.workers * per_worker, self._resources(kind)
            if per_worker and (total < need or largest < per_worker):
                return (f"execution.workers = {self.workers} × execution.{field} = {per_worker:g} needs {need:g} "
                        f"{kind}s ({per_worker:g} on one node); the Ray cluster at "
                        f"{self.address or 'embedded (this machine)'} has {total:g} free (largest node {largest:g})")
        return None

    def _check_resources(self, wait_s: float) -> None:
        """Embedded Ray cannot grow: checked once. A cluster may be autoscaling: waited for up to `wait_s`,
        with progress, before the same error."""
        deadline = time.monotonic() + wait_s
        while (shortage := self._shortage()) is not None:
            if time.monotonic() >= deadline:
                raise ClusterError(shortage + (f", after waiting {wait_s:g} s" if wait_s else ""))
            log.info("waiting for Ray resources: %s (%.0f s left)", shortage, deadline - time.monotonic())
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))

    def _probe_device(self) -> int:
        """The memory (bytes) of the GPU `execution.device` resolves to on a worker given `gpus_per_worker`,
        0 when it resolves to the CPU, from one task. For device cuda where a worker sees none: a clear
        DeviceError now rather than shards that die in their constructor and are rebuilt in vain."""
        probe = self.ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_retries=0)
        try:
            return self.ray.get(probe(_device_memory).remote(self.device))
        except DeviceError as err:  # Ray's task error is also the task's own exception class
            cause = getattr(err, "cause", None) or err  # Ray's error wraps the worker's, traceback and all
            raise DeviceError(f"on a Ray worker with execution.gpus_per_worker = {self.gpus_per_worker:g}: "
                              f"{cause}") from None

    def describe(self) -> str:
        gpus = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return f"ray ({self.address or 'embedded'}, {self.workers} workers × {self.cpus_per_worker} CPU{gpus})"

    def map(self, fn: Callable[[Item], Result], items: Sequence[Item], stage: str,
            work: Sequence[float] | None = None, memory: Sequence[int] | None = None) -> list[Result]:
        """Tasks of cpus_per_worker CPUs each (their torch threads), the largest `work` first so none is
        left running alone at the end. With `memory`, each task reserves its bytes of Ray's `memory`
        resource (at most the largest node's), so two factorisations of a 70B model's down_proj (~20 GB
        each) never share a node that cannot hold both — they wait for each other instead, on more CPUs.
        On CUDA workers (a process per task) small items are batched into one task (execution/batching.py)."""
        # a function marked `host_only` (its work is on the host: no GPU held idle) runs on the CPU
        gpus = 0.0 if getattr(fn, "host_only", False) else self.gpus_per_worker
        max_calls = self.max_calls(gpus)
        remote = self.ray.remote(num_cpus=self.cpus_per_worker, num_gpus=gpus, max_retries=self.max_retries,
                                 max_calls=max_calls)(_measured)
        order = sorted(range(len(items)), key=lambda k: -work[k]) if work is not None else list(range(len(items)))
        # a process per task (CUDA workers): small items share one (execution/batching.py)
        batches = work_batches(order, work, self._slots(gpus)) if max_calls == 1 else [[k] for k in order]
        reserve = self._memory_requests(memory, stage, gpus)
        refs = []
        for batch in batches:  # a batch reserves what its largest item needs
            options = reserve(max(batch, key=lambda k: memory[k]) if memory is not None else batch[0])
            refs.append(remote.options(**options).remote(fn, [items[k] for k in batch], self.device if gpus else "cpu",
                                                         options.get("num_cpus", self.cpus_per_worker)))
        for _ in progress(self._as_completed(refs), stage, total=len(refs)):
            pass
        done = self.ray.get(refs)
        self._note_peak(*(peak for _, peak in done))
        results: dict[int, Result] = {}
        for batch, (batch_results, _) in zip(batches, done, strict=True):
            results.update(zip(batch, batch_results, strict=True))
        return [results[k] for k in range(len(items))]  # in item order, whatever order they finished in

    def _slots(self, gpus: float) -> int:
        """Tasks of `gpus` GPUs each that the cluster runs at once (its GPUs now; at least 1)."""
        return max(1, int(self.ray.cluster_resources().get("GPU", 0.0) / gpus + 1e-6)) if gpus else 1  # 1 / 0.1: 10

    @property
    def workers_on_cuda(self) -> bool:
        return self.device_memory > 0

    def max_calls(self, gpus: float) -> int:
        """Tasks a worker process serves before Ray replaces it. 0 (no limit: one import and opened model
        source for task after task) unless the task runs on CUDA; then 1, Ray's own default for GPU tasks:
        torch fixes a process's GPU at its first CUDA call, so a reused worker that Ray hands another GPU
        would compute on its first one (another task's), and its cached device memory would outlive the
        task. The price, a worker start, imports and a CUDA context per task (seconds), is paid per batch of
        small items (`map`, execution/batching.py): against minutes of factorising at 70B, one item a task."""
        return 1 if gpus and self.workers_on_cuda else 0

    def _memory_requests(self, memory: Sequence[int] | None, stage: str, gpus: float = 0.0) -> Callable[[int], dict]:
        """Each item's task options: {"memory": bytes} capped at the largest node's memory (a larger request
        would never be scheduled; logged), and {"num_cpus": n}: a task whose memory leaves room for fewer
        tasks than the node has CPUs takes the CPUs they would have used (a 70B down_proj that reserves a
        whole 2-CPU node factorises on both, not on one while the other idles). A GPU task (`gpus` > 0 on
        CUDA workers) whose memory exceeds its GPU share also asks for the share of the GPU it fills
        ({"num_gpus": ≤ 1}): factorisations that do not fit one GPU together do not meet on it. {} without
        `memory`."""
        if memory is None:
            return lambda k: {}
        largest, cpus = self._largest_node("memory")
        if largest and max(memory) > largest:
            log.warning("%s: a task's estimated %.1f GB exceeds the largest Ray node's memory (%.1f GB); it "
                        "reserves the whole node", stage, max(memory) / 1e9, largest / 1e9)

        def options(k: int) -> dict:
            out = self._gpu_share(memory[k], gpus)
            if not (largest and memory[k]):
                return out
            share = int(min(memory[k], largest))
            beside = max(1, int(largest // share))  # tasks of this size one node holds at once
            return out | {"memory": share, "num_cpus": max(self.cpus_per_worker, int(cpus // beside))}
        return options

    def _gpu_share(self, task_bytes: int, gpus: float) -> dict:
        """{"num_gpus": the fraction of one GPU (in hundredths, at most 1) that `task_bytes` fill} when that
        is more than `gpus`, the share every task asks for; {} otherwise, or off CUDA."""
        if not (gpus and self.workers_on_cuda and task_bytes):
            return {}
        need = min(1.0, math.ceil(100 * task_bytes / self.device_memory) / 100)
        return {"num_gpus": need} if need > gpus else {}

    def _largest_node(self, kind: str, other: str = "CPU") -> tuple[float, float]:
        """(`kind`, `other`) of the alive node with the most `kind`."""
        nodes = [(node["Resources"].get(kind, 0.0), node["Resources"].get(other, 0.0))
                 for node in self.ray.nodes() if node.get("Alive")]
        return max(nodes, default=(0.0, 0.0))

    def _note_peak(self, *peaks_mb: float) -> None:
        self._worker_peak_mb = max([self._worker_peak_mb or 0.0, *peaks_mb])

    def take_worker_peak_mb(self) -> float | None:
        """The largest peak RSS a worker reported since the last call (MiB), then reset."""
        peak, self._worker_peak_mb = self._worker_peak_mb, None
        return peak

    def _as_completed(self, refs: list) -> Any:
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            self.ray.get(done)  # raise a task's error now, with its traceback
            yield done[0]

    def steps(self, items: Sequence[Item], stage: str):
        return progress(items, stage)

    def actors(self, cls: type, init_args: Sequence[tuple]) -> list[Any]:
        actor = self.ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)(cls)
        return [actor.remote(*args) for args in init_args]

    def call_all(self, handles: Sequence[Any], method: str, *args) -> list[Any]:
        return self.ray.get([getattr(handle, method).remote(*args) for handle in handles])

    def call_all_settled(self, handles: Sequence[Any], method: str, *args) -> list[Any]:
        """Like call_all, but a shard whose worker died yields a ShardLost instead of raising."""
        return self._settled([getattr(handle, method).remote(*args) for handle in handles])

    def call_each_settled(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]:
        """Like call_each, but a worker that died yields a ShardLost instead of raising."""
        return self._settled([getattr(handle, method).remote(*args)
                              for handle, args in zip(handles, args_per_handle, strict=True)])

    def call_all_split(self, handles: Sequence[Any], method: str, *args) -> list[tuple[Any, Any]]:
        """The statuses fetched (ShardLost in place of the pair for a dead worker), the partials left in the
        object store."""
        pairs = [getattr(handle, method).options(num_returns=2).remote(*args) for handle in handles]
        statuses = self._settled([status for status, _ in pairs])
        return [status if isinstance(status, ShardLost) else (status, partial)
                for status, (_, partial) in zip(statuses, pairs, strict=True)]

    def combine(self, fn: Callable[..., Any], groups: Sequence[Sequence[Any]], handles: Sequence[Any]) -> list[Any]:
        """Each group's combined partial left in the object store (the driver fetches a status only)."""
        pairs = [handle.apply.options(num_returns=2).remote(_combined, fn, list(group))
                 for group, handle in zip(groups, handles, strict=True)]
        statuses = self._settled([status for status, _ in pairs])
        return [status if isinstance(status, ShardLost) else partial
                for status, (_, partial) in zip(statuses, pairs, strict=True)]

    def reduce(self, fn: Callable[..., Result], item: Any, partials: Sequence[Any], handle: Any) -> Result:
        """Run in the shard actor `handle` (no extra process; the shards hold the workers' CPUs), which
        fetches the partials from the object store one at a time — the driver never does. ShardLost when
        that actor died (the partials stay in the object store: a rebuilt one can reduce them)."""
        [outcome] = self._settled([handle.apply.remote(_reduced, fn, item, list(partials))])
        if isinstance(outcome, ShardLost):
            return outcome
        result, peak = outcome
        self._note_peak(peak)
        return result

    def _settled(self, refs: list) -> list[Any]:
        results = []
        for ref in refs:
            try:
                results.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError as err:
                results.append(ShardLost(str(err).splitlines()[0]))
            except self.ray.exceptions.RayTaskError as err:  # a check failed (NumericalError): the error itself
                if isinstance(err.cause, RankfoldError):
                    raise err.cause from None
                raise
        return results

    def call_each(self, handles: Sequence[Any], method: str, args_per_handle: Sequence[tuple]) -> list[Any]:
        return self.ray.get([getattr(handle, method).remote(*args)
                             for handle, args in zip(handles, args_per_handle, strict=True)])

    def release(self, handles: Sequence[Any]) -> None:
        """Let each shard delete its spilled activations, then end the actors."""
        for handle in handles:
            try:
                self._note_peak(self.ray.get(handle.release.remote()))
            except self.ray.exceptions.RayError:  # a dead actor has nothing left to release
                pass
            self.ray.kill(handle)

    def model_location(self, local: str, stored: str) -> str:
        return stored  # output.dir is on the driver's machine only; every node can read the store

    def close(self) -> None:
        if self._started_here:
            self.ray.shutdown()
