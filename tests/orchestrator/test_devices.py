"""execution.device and execution.gpus_per_worker: the spec's rules, a clear error for a GPU that is
not there (before anything is written), and Ray's scheduling of GPU workers on the test cluster, which
declares 2 GPUs on a machine without any (`ray start --num-gpus 2`): the shards and tasks request and
receive them, resolve `auto` to the CPU they actually have, and the job equals the in-process one."""

from __future__ import annotations

import pytest
import torch

from rankfold.core.device import DeviceError, resolve_device
from rankfold.execution.local import LocalExecutor
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")


@pytest.mark.parametrize("execution, message", [
    ({"device": "cpu", "gpus_per_worker": 1}, "GPUs would be held and unused"),
    ({"executor": "ray", "device": "cuda"}, "needs execution.gpus_per_worker > 0"),
    ({"device": "tpu"}, "execution.device"),
    ({"gpus_per_worker": -1}, "execution.gpus_per_worker"),
    ({"gpus_per_worker": 2}, "execution.gpus_per_worker"),
    ({"device": "cpu", "device_activations_mb": 512}, "no GPU to keep activations on"),
    ({"device_activations_mb": -1}, "execution.device_activations_mb"),
])
def test_bad_device_settings_name_the_field(tmp_path, tiny_model_dir, execution, message):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["execution"] = execution
    with pytest.raises(SpecError, match=message):
        parse_spec(data)


@no_cuda
def test_cuda_where_there_is_none_is_an_error_before_anything_is_written(tmp_path, tiny_model_dir):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["execution"] = {"device": "cuda"}
    with pytest.raises(DeviceError, match=r"execution.device is 'cuda' but this process sees no CUDA device"):
        run_job(parse_spec(data))
    assert not (tmp_path / "out").exists()
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
def test_ray_workers_request_gpus_and_the_job_equals_in_process(tmp_path, tiny_model_dir, ray_cluster):
    from rankfold.execution.ray import RayExecutor

    def gpu_ids(_item=None) -> list[int]:  # defined here: Ray ships it by value (tests/ is not on workers' path)
        import ray

        return [int(g) for g in ray.get_gpu_ids()]

    class Probe:
        def gpus(self) -> list[int]:
            return gpu_ids()

    executor = RayExecutor(address=ray_cluster["address"], workers=2, cpus_per_worker=1, gpus_per_worker=1)
    try:
        assert executor.device == "auto" and "1 GPU" in executor.describe()
        probes = executor.actors(Probe, [(), ()])
        assert sorted(g for ids in executor.call_all(probes, "gpus") for g in ids) == [0, 1]  # one GPU each
        for probe in probes:
            executor.ray.kill(probe)
        assert [len(ids) for ids in executor.map(gpu_ids, [0, 1], "probe")] == [1, 1]

        def host_ids(item=None) -> list[int]:
            return gpu_ids(item)

        host_ids.host_only = True  # as assemble_item: its task holds no GPU
        assert executor.map(host_ids, [0, 1], "probe") == [[], []]

        def pid(_item=None) -> int:
            import os

            return os.getpid()

        assert not executor.workers_on_cuda and executor.max_calls(1) == 0  # `auto` resolved to the CPU there
        executor.device_memory = 80 << 30  # as on a node of 80 GiB GPUs: each GPU task in a process of its own,
        # small items batched into one task: 12 units of work over 2 GPU slots -> batches of >= 1.5 units
        pids = executor.map(pid, range(6), "probe", work=[6, 1, 1, 1, 1, 2])
        assert executor.max_calls(0) == 0 and pids[1] == pids[2] and pids[3] == pids[4]
        assert len({pids[0], pids[5], pids[1], pids[3]}) == 4  # the batches [0], [5], [1, 2], [3, 4]
        options = executor._memory_requests([50 << 30, 1 << 30], "probe", 0.25)  # 50 GiB: 0.63 of a GPU
        assert options(0)["num_gpus"] == 0.63 and "num_gpus" not in options(1)
        assert "num_gpus" not in executor._memory_requests([50 << 30], "probe", 0.0)(0)  # a host-only task
        executor.device_memory = 0
        assert "num_gpus" not in executor._memory_requests([50 << 30], "probe", 0.25)(0)
        data = tiny_spec_dict(tiny_model_dir, tmp_path / "ray")
        on_ray = run_job(parse_spec(data), executor=executor)
    finally:
        executor.close()
    data["output"]["dir"] = str(tmp_path / "local")
    local = run_job(parse_spec(data), executor=LocalExecutor(workers=2))
    assert on_ray["artifacts"]["digests"] == local["artifacts"]["digests"]


@no_cuda
def test_cuda_on_ray_workers_that_have_none_is_an_error_before_any_shard_starts(ray_cluster):
    """The test cluster's GPUs are declared, not real: a worker given one still sees no CUDA."""
    from rankfold.execution.ray import RayExecutor

    with pytest.raises(DeviceError, match=r"gpus_per_worker = 1: execution.device is 'cuda' but this process sees no"):
        RayExecutor(address=ray_cluster["address"], workers=2, cpus_per_worker=1, gpus_per_worker=1, device="cuda")


def test_gpus_the_cluster_lacks_are_an_error(ray_cluster):
    from rankfold.execution.ray import ClusterError, RayExecutor

    with pytest.raises(ClusterError, match=r"execution.gpus_per_worker = 2 needs 4 GPUs"):
        RayExecutor(address=ray_cluster["address"], workers=2, cpus_per_worker=1, gpus_per_worker=2,
                    resource_wait_s=0.0)


@pytest.mark.parametrize("work, slots, batches", [
    ([8, 4, 2, 1, 1, 1, 1], 1, [[0], [1, 2], [3, 4, 5, 6]]),    # 18 / 4 = 4.5 a batch: 8 alone, the last short
    (None, 2, [[0], [1], [2], [3], [4]]),                        # 5 / 8 < 1: every item alone
    (None, 1, [[0, 1], [2, 3], [4]]),                            # 5 / 4 = 1.25: pairs, the last one short
    ([0.0, 0.0], 3, [[0], [1]]),                                 # no work known: never an empty batch
    ([2.6e13] * 2 + [1.1e12] * 2 + [5e11] * 3, 8, [[0], [1], [2], [3], [4, 5], [6]]),  # 70B's groups alone, capped
])
def test_gpu_tasks_batch_small_items_largest_first(work, slots, batches):
    from rankfold.execution.batching import work_batches

    order = sorted(range(len(work)), key=lambda k: -work[k]) if work else list(range(5))
    got = work_batches(order, work, slots)
    assert got == batches and sorted(k for batch in got for k in batch) == sorted(order)
