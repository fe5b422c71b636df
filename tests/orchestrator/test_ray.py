"""The job through Ray, on a real local cluster (`ray start --head`, 2 CPUs on 127.0.0.1): the same
compressed weights as in-process, artifacts in S3, and a clear error for an unreachable cluster."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from safetensors.torch import load_file

from rankfold.cli import EXIT_BAD_INPUT
from rankfold.evaluation.report import metric_table
from rankfold.execution.local import LocalExecutor
from rankfold.jobs.spec import parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict

ray = pytest.importorskip("ray")


def _weights(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_ray_job_with_s3_matches_in_process(tmp_path, tiny_model_dir, ray_executor, s3_endpoint, s3_bucket):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "ray", method="skipcat")
    data["output"]["s3"] = {"bucket": s3_bucket, "endpoint_url": s3_endpoint}
    ray_report = run_job(parse_spec(data), executor=ray_executor)
    assert ray_report["executor"].startswith("ray (127.0.0.1:")
    stages = {row["stage"]: row for row in ray_report["stages"]}
    for stage in ("calibrate", "decompose", "assemble", "evaluate perplexity compressed wikitext2"):  # workers' own peaks
        assert 100 < stages[stage]["worker_peak_rss_mb"] < 4096, stages[stage]

    data["output"] = {"dir": str(tmp_path / "local")}
    local_report = run_job(parse_spec(data), executor=LocalExecutor(workers=2))
    assert ray_report["artifacts"]["digests"] == local_report["artifacts"]["digests"]
    ray_weights, local_weights = _weights(tmp_path / "ray" / "model"), _weights(tmp_path / "local" / "model")
    assert ray_weights.keys() == local_weights.keys()
    for name in local_weights:  # same shards, same reduction order; only GEMM threading may differ
        torch.testing.assert_close(ray_weights[name], local_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    for ray_row, local_row in zip(metric_table(ray_report["rows"]), metric_table(local_report["rows"])):
        assert ray_row["compressed"] == pytest.approx(local_row["compressed"], rel=1e-6)
        assert ray_row["dense"] == pytest.approx(local_row["dense"], rel=1e-6)


def test_sharded_statistics_equal_sequential_ones(tmp_path, tiny_model_dir):
    """Three shards reduced by addition give the one-pass statistics. Shards regroup the samples into
    different batches, so float32 chunk products round differently: equal to ~1e-7, counts exactly."""
    from rankfold.storage.store import LocalStore

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "one")
    data["evaluation"]["perplexity"] = []
    one = run_job(parse_spec(data), executor=LocalExecutor(workers=1))
    data["output"]["dir"] = str(tmp_path / "three")
    three = run_job(parse_spec(data), executor=LocalExecutor(workers=3))
    digest = one["artifacts"]["digests"]["calibrate"]
    for layer in (0, 1):
        key = f"stats/{digest}/layer-{layer:05d}.safetensors"
        a, b = LocalStore(tmp_path / "one" / "artifacts").get_tensors(key), LocalStore(tmp_path / "three" / "artifacts").get_tensors(key)
        for name in a:
            if name.endswith(".count"):
                assert torch.equal(a[name], b[name])
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6 * float(a[name].abs().max()), msg=name)
    assert three["calibration_tokens"] == one["calibration_tokens"]


def test_unreachable_cluster_is_named(tmp_path, tiny_model_dir):
    """Through the real CLI in a fresh process (this one may already be connected to Ray)."""
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec_dict(tiny_model_dir, tmp_path / "out")))
    result = subprocess.run([sys.executable, "-m", "rankfold.cli", "run", str(tmp_path / "spec.yaml"),
                             "--address", address], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT
    assert f"cannot reach the Ray cluster at {address}" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_through_ray_gives_the_in_process_weights(tmp_path, ray_executor, shared_data):
    """The real model: Ray (2 actors of 1 CPU, tasks on the cluster) vs in-process with the same 2
    shards and 1 thread, so that even GEMM blocking matches: bit-identical weights."""
    data = {
        "model": {"source": "smollm2-135m"},
        "method": {"name": "svd_llm"},
        "target": {"ratio": 0.2},
        "calibration": {"data": {"path": str(shared_data / "calibration" / "enwiki_excerpt.txt")},
                        "num_samples": 16, "seq_len": 128, "batch_size": 4},
        "evaluation": {"perplexity": [], "dense": False},
        "output": {"dir": str(tmp_path / "ray")},
    }
    ray_report = run_job(parse_spec(data), executor=ray_executor)
    data["output"]["dir"] = str(tmp_path / "local")
    threads = torch.get_num_threads()
    local = LocalExecutor(workers=2)
    local.threads_per_worker = 1
    try:
        local_report = run_job(parse_spec(data), executor=local)
    finally:
        torch.set_num_threads(threads)
    assert ray_report["ranks"] == local_report["ranks"]
    ray_weights, local_weights = _weights(tmp_path / "ray" / "model"), _weights(tmp_path / "local" / "model")
    assert ray_weights.keys() == local_weights.keys() and len(ray_weights) > 200
    different = [k for k in local_weights if not torch.equal(ray_weights[k], local_weights[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_shards_the_cluster_cannot_hold_are_an_error_after_a_bounded_wait(ray_executor, caplog):
    """The test cluster has 2 CPUs: 3 shards × 1 CPU would wait forever for the third actor."""
    from rankfold.execution.ray import ClusterError, RayExecutor

    caplog.set_level(logging.INFO, logger="rankfold")
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"execution.workers = 3 × execution.cpus_per_worker = 1 needs 3 CPUs"):
        RayExecutor(address=ray_executor.address, workers=3, cpus_per_worker=1, resource_wait_s=1.0)
    assert time.monotonic() - started < 30
    assert "waiting for Ray resources: " in caplog.text and "needs 3 CPUs" in caplog.text  # the wait is logged
    with pytest.raises(ClusterError, match="4 on one node"):
        RayExecutor(address=ray_executor.address, workers=1, cpus_per_worker=4, resource_wait_s=0.0)


def test_the_test_cluster_listens_on_loopback_only(ray_cluster, s3_endpoint):
    """Every listening socket of this test network (the Ray cluster's GCS, raylet, client server,
    dashboard and agents; the S3 server) is on 127.0.0.1, and the only interface is loopback."""
    import socket

    import psutil

    from tests.conftest import LOOPBACK_ONLY

    if not LOOPBACK_ONLY:
        pytest.skip("needs root on Linux to give the tests a loopback-only network namespace")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    listening = [c.laddr for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4  # GCS, raylet, client server, S3 at least
    assert {address.ip for address in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def _holds_statistics(value) -> bool:
    if isinstance(value, dict):
        return any(str(key).endswith((".gram", ".gram_upper")) for key in value) or any(map(_holds_statistics, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_holds_statistics, value))
    return False


def test_the_driver_never_receives_a_layers_statistics(tmp_path, tiny_model_dir, ray_executor, monkeypatch):
    """Calibration's Grams are summed by a reduce task where the shards' partials are (workers/reduce.py):
    nothing the driver fetches from Ray holds one, and the job equals the in-process one."""
    fetched, get = [], ray.get

    def spying_get(refs, *args, **kwargs):
        values = get(refs, *args, **kwargs)
        fetched.append(values)
        return values

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "ray")
    data["evaluation"]["perplexity"] = []
    monkeypatch.setattr(ray, "get", spying_get)
    on_ray = run_job(parse_spec(data), executor=ray_executor)
    monkeypatch.setattr(ray, "get", get)
    assert fetched and not any(_holds_statistics(values) for values in fetched)
    data["output"]["dir"] = str(tmp_path / "local")
    local = run_job(parse_spec(data), executor=LocalExecutor(workers=2))
    assert on_ray["artifacts"]["digests"] == local["artifacts"]["digests"]


def test_tasks_reserving_most_of_a_nodes_memory_do_not_run_at_once(ray_executor, caplog):
    """Two CPUs, two tasks: side by side without `memory`; one after the other when each reserves 60 % of
    the node's memory. A request above the node is capped (logged), not left unschedulable."""
    def _timed_sleep(seconds: float) -> tuple[float, float]:  # nested: Ray ships it by value
        started = time.time()
        time.sleep(seconds)
        return started, time.time()

    node = max(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive"))
    free = ray_executor.map(_timed_sleep, [1.5, 1.5], "sleep")
    assert free[1][0] < free[0][1] and free[0][0] < free[1][1]  # overlapping
    held = ray_executor.map(_timed_sleep, [1.5, 1.5], "sleep", memory=[int(0.6 * node)] * 2)
    (a0, a1), (b0, b1) = sorted(held)
    assert a1 <= b0 + 0.05  # one after the other
    with caplog.at_level(logging.WARNING, logger="rankfold.execution.ray"):
        assert len(ray_executor.map(_timed_sleep, [0.1], "sleep", memory=[int(10 * node)])) == 1
    assert "exceeds the largest Ray node's memory" in caplog.text


def test_a_task_that_holds_a_nodes_memory_alone_gets_its_cpus(ray_executor):
    """The 2-CPU node: a task reserving 60 % of its memory runs alone, so on both CPUs' threads; tasks that
    fit two at a time, or reserve nothing, on cpus_per_worker (1) each."""
    def _threads(_: int) -> int:  # nested: Ray ships it by value
        import torch

        return torch.get_num_threads()

    node = max(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive"))
    assert ray_executor.map(_threads, [0, 1], "threads") == [1, 1]
    assert ray_executor.map(_threads, [0, 1], "threads", memory=[int(0.6 * node)] * 2) == [2, 2]
    assert ray_executor.map(_threads, [0, 1], "threads", memory=[int(0.4 * node)] * 2) == [1, 1]
