"""Faults on a real local Ray cluster: a worker process killed by pid mid-stage (a calibration
shard's actor, a decomposition task) is replaced, and the job's artifacts are bit-identical to
those of an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from rankfold.jobs.spec import parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict

pytest.importorskip("ray")
T = TypeVar("T")


def _killer(marker: Path, stop: threading.Event, killed: list[int]) -> threading.Thread:
    """Kill (SIGKILL) the process whose pid appears in `marker`, once; record the pid."""
    def watch() -> None:
        while not stop.is_set():
            if marker.is_file() and marker.read_text().strip():
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _killing(run: Callable[[], T], *markers: Path) -> tuple[T, list[int], list[threading.Thread]]:
    """run() while one killer per marker kills, once, the process whose pid appears there; returns
    (run's result, the pids killed, the killers)."""
    stop, killed = threading.Event(), []
    killers = [_killer(marker, stop, killed) for marker in markers]
    try:
        return run(), killed, killers
    finally:
        stop.set()


def _artifacts(report: dict, out: Path) -> dict[str, str]:
    from rankfold.orchestrator.manifest import Manifest
    from rankfold.storage.store import LocalStore

    manifest = Manifest(LocalStore(out / "artifacts"), report["artifacts"]["manifest"].split("/")[1])
    return {key: sha for stage in ("calibrate", "decompose", "assemble")
            for key, sha in manifest.stages[stage].artifacts.items()}


def test_killed_workers_are_replaced_and_artifacts_bit_identical(tmp_path, tiny_model_dir, ray_executor, monkeypatch):
    import rankfold.execution.streaming as streaming
    import rankfold.orchestrator.stages.decompose as stages
    from rankfold.workers.shard import SequenceShard

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "clean", method="skipcat")
    data["evaluation"]["perplexity"] = []
    clean = run_job(parse_spec(data), executor=ray_executor)

    shard_marker, task_marker = tmp_path / "shard.pid", tmp_path / "task.pid"

    class ShardKilledOnce(SequenceShard):  # pickled by value: the workers see this subclass
        def advance(self, index, *args):
            if index == 1 and not shard_marker.exists():
                shard_marker.write_text(str(os.getpid()))
                time.sleep(60)  # killed here, in the middle of layer 1
            return super().advance(index, *args)

    decompose_item = stages.decompose_item

    def decompose_killed_once(item):
        if not task_marker.exists():
            task_marker.write_text(str(os.getpid()))
            time.sleep(60)
        return decompose_item(item)

    monkeypatch.setattr(streaming, "SequenceShard", ShardKilledOnce)
    monkeypatch.setattr(stages, "decompose_item", decompose_killed_once)
    data["output"]["dir"] = str(tmp_path / "killed")
    disturbed, killed, killers = _killing(lambda: run_job(parse_spec(data), executor=ray_executor),
                                          shard_marker, task_marker)
    assert len(killed) == 2 and all(not k.is_alive() for k in killers)  # both workers died mid-stage
    assert _artifacts(disturbed, tmp_path / "killed") == _artifacts(clean, tmp_path / "clean")


def test_shard_killed_in_the_fisher_backward_pass_is_replayed(tmp_path, tiny_model_dir, ray_executor, monkeypatch):
    """The rebuilt shard redoes the forward pass, the head and the backward layers above, then the
    layer it died in: the Fisher sums (hence the allocated ranks) are bit-identical."""
    import rankfold.execution.streaming as streaming
    from rankfold.orchestrator.manifest import Manifest
    from rankfold.storage.store import LocalStore
    from rankfold.workers.shard import SequenceShard

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "clean")
    data["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4}
    data["evaluation"]["perplexity"] = []
    clean = run_job(parse_spec(data), executor=ray_executor)
    marker = tmp_path / "fisher.pid"

    class ShardKilledInBackward(SequenceShard):
        def fisher_backward(self, index):
            if index == 0 and not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(60)  # killed here: layer 1 done, layer 0 in progress
            return super().fisher_backward(index)

    monkeypatch.setattr(streaming, "SequenceShard", ShardKilledInBackward)
    data["output"]["dir"] = str(tmp_path / "killed")
    disturbed, killed, [killer] = _killing(lambda: run_job(parse_spec(data), executor=ray_executor), marker)
    assert len(killed) == 1 and not killer.is_alive()

    def fisher_artifacts(report, out):
        manifest = Manifest(LocalStore(out / "artifacts"), report["artifacts"]["manifest"].split("/")[1])
        return manifest.stages["fisher"].artifacts

    assert fisher_artifacts(disturbed, tmp_path / "killed") == fisher_artifacts(clean, tmp_path / "clean")
    assert disturbed["ranks"] == clean["ranks"]


def test_evaluation_worker_killed_mid_task_is_replaced_with_the_same_rows(tmp_path, tiny_model_dir, shared_data,
                                                                         ray_executor, monkeypatch):
    """A zero-shot actor SIGKILLed in the middle of its slice: a new actor runs the slice again, and the
    rows equal an undisturbed run's (documents are independent; a worker holds only the model)."""
    import rankfold.evaluation.documents as documents
    from rankfold.evaluation.registry import EvaluationContext
    from rankfold.evaluation.zeroshot import ZeroShotOptions, evaluate_zeroshot
    from rankfold.execution.local import LocalExecutor
    from rankfold.models.sources import open_source
    from rankfold.workers.lm import ModelWorker

    source = open_source(tiny_model_dir)
    options = ZeroShotOptions(name="z", tasks={"arc_easy": {"path": str(shared_data / "arc" / "ARC-Easy-Test.jsonl"),
                                                            "limit": 6}}, batch_size=2)
    context = lambda executor: EvaluationContext(executor, str(tiny_model_dir), source.num_layers,  # noqa: E731
                                                 lambda i: None, source.tokenizer(), "float32", tmp_path, "zs")
    clean = evaluate_zeroshot(options, context(LocalExecutor(workers=2)))
    marker = tmp_path / "zeroshot.pid"

    class WorkerKilledOnce(ModelWorker):  # pickled by value: the actors run this subclass
        def zeroshot(self, indices, *args):
            if indices[0] > 0 and not marker.exists():  # the second slice's worker, once
                marker.write_text(str(os.getpid()))
                time.sleep(60)  # killed here
            return super().zeroshot(indices, *args)

    monkeypatch.setattr(documents, "ModelWorker", WorkerKilledOnce)
    disturbed, killed, [killer] = _killing(lambda: evaluate_zeroshot(options, context(ray_executor)), marker)
    assert len(killed) == 1 and not killer.is_alive()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(disturbed) == strip(clean)


def test_a_shard_killed_while_it_reduces_is_rebuilt_and_reduces_again(tmp_path, tiny_model_dir, ray_executor,
                                                                       monkeypatch):
    """The shard summing a layer's partials dies mid-reduce: it is rebuilt (replayed to that layer) and
    sums the same partials, which waited in the object store: the statistics are bit-identical."""
    import rankfold.execution.streaming as streaming
    from rankfold.workers.shard import SequenceShard

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "clean")
    data["evaluation"]["perplexity"] = []
    clean = run_job(parse_spec(data), executor=ray_executor)
    marker = tmp_path / "reduce.pid"

    class ShardKilledReducing(SequenceShard):
        def apply(self, fn, *args):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(60)  # killed here, holding none of the partials yet
            return super().apply(fn, *args)

    monkeypatch.setattr(streaming, "SequenceShard", ShardKilledReducing)
    data["output"]["dir"] = str(tmp_path / "killed")
    disturbed, killed, [killer] = _killing(lambda: run_job(parse_spec(data), executor=ray_executor), marker)
    assert len(killed) == 1 and not killer.is_alive()
    assert _artifacts(disturbed, tmp_path / "killed") == _artifacts(clean, tmp_path / "clean")
