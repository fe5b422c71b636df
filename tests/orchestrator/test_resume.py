"""Resume that scales: whether a stage is done is decided from the manifest's recorded checksums and
version tokens, without reading an artifact; only what looks changed is hashed; `rankfold verify`
hashes everything on demand."""

from __future__ import annotations

import os

import pytest

import rankfold.core.hashing as hashing
from rankfold.jobs.spec import parse_spec
from rankfold.orchestrator.job import run_job
from rankfold.storage.store import LocalStore
from tests.conftest import tiny_spec_dict


@pytest.fixture
def finished(tmp_path, tiny_model_dir):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["evaluation"]["perplexity"] = []
    spec = parse_spec(data)
    return spec, run_job(spec), tmp_path / "out"


def _count_hashing(monkeypatch) -> list[str]:
    """Every sha256 of a tensor file, wherever it is taken (stores, checkpoints) — not of the small JSON
    records (manifest, history) a run reads and writes."""
    hashed, real = [], hashing.sha256_file

    def counted(path):
        if str(path).endswith(".safetensors"):
            hashed.append(str(path))
        return real(path)

    for module in ("rankfold.storage.store", "rankfold.checkpoint", "rankfold.core.hashing"):
        monkeypatch.setattr(f"{module}.sha256_file", counted)
    return hashed


def test_a_finished_job_reruns_without_reading_any_artifact(finished, monkeypatch):
    spec, first, _ = finished
    hashed = _count_hashing(monkeypatch)
    again = run_job(spec)
    assert set(again["reused_stages"]) == set(first["artifacts"]["digests"])
    assert hashed == []


def test_an_artifact_touched_but_unchanged_is_hashed_once_then_trusted(finished, monkeypatch):
    spec, first, out = finished
    store = LocalStore(out / "artifacts")
    key = store.list_keys(f"factors/{first['artifacts']['digests']['decompose']}/")[0]
    os.utime(store.path(key), ns=(1, 1))  # a copied store: same bytes, new mtimes
    hashed = _count_hashing(monkeypatch)
    assert "decompose" in run_job(spec)["reused_stages"]
    assert [path for path in hashed if path.endswith(key.rsplit("/", 1)[-1])] == [str(store.path(key))]
    hashed.clear()
    run_job(spec)
    assert hashed == []  # the new token was recorded


def test_an_artifact_changed_in_place_with_the_same_size_is_recomputed(finished):
    spec, first, out = finished
    store = LocalStore(out / "artifacts")
    key = [key for key in store.list_keys(f"stats/{first['artifacts']['digests']['calibrate']}/")
           if key.endswith(".safetensors")][0]
    data = store.path(key).read_bytes()
    store.path(key).write_bytes(data[:-8] + b"garbage!")
    again = run_job(spec)
    assert "calibrate" not in again["reused_stages"] and store.verify(key)


def test_verify_hashes_every_artifact_and_names_a_damaged_one(finished, tmp_path, capsys):
    import yaml

    from rankfold.cli import EXIT_FAILED, main

    spec, first, out = finished
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["verify", str(tmp_path / "spec.yaml")]) == 0
    assert main(["verify", str(out / "model")]) == 0
    store = LocalStore(out / "artifacts")
    key = store.list_keys(f"factors/{first['artifacts']['digests']['decompose']}/")[0]
    store.path(key).write_bytes(store.path(key).read_bytes()[:-8] + b"garbage!")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "spec.yaml")]) == EXIT_FAILED
    printed = capsys.readouterr().out
    assert f"decompose: {store.describe(key)} is missing or damaged" in printed


def test_damage_that_keeps_size_and_mtime_fails_where_read_and_verify_repair_recomputes(finished, tmp_path, capsys,
                                                                                        monkeypatch):
    import dataclasses

    import yaml

    from rankfold.cli import main
    from rankfold.orchestrator.stages import STAGE_KINDS
    from rankfold.storage.store import StoreError

    spec, first, out = finished
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    store = LocalStore(out / "artifacts")
    key = store.list_keys(f"factors/{first['artifacts']['digests']['decompose']}/")[0]
    stat = store.path(key).stat()
    data = bytearray(store.path(key).read_bytes())
    data[-1] ^= 0xFF  # bit rot: same size, and the mtime put back
    store.path(key).write_bytes(bytes(data))
    os.utime(store.path(key), ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assemble = dataclasses.replace(STAGE_KINDS.get("assemble"), version="changed")  # so it reads the factors again
    monkeypatch.setitem(STAGE_KINDS._entries, "assemble", assemble)
    with pytest.raises(StoreError, match="verify SPEC --repair"):
        run_job(spec)
    assert main(["verify", str(tmp_path / "spec.yaml"), "--repair"]) == 1
    assert "decompose: record dropped" in capsys.readouterr().out
    again = run_job(spec)
    assert "decompose" not in again["reused_stages"] and store.verify(key)


def _stats(out) -> dict[str, str]:
    store = LocalStore(out / "artifacts")
    return {key.split("/")[-1]: store.checksum(key) for key in store.list_keys("stats/") if key.endswith(".safetensors")}


def test_calibration_stopped_mid_walk_resumes_at_the_first_layer_not_stored(tmp_path, tiny_model_dir, monkeypatch):
    """A calibration stopped after layer 0's statistics were stored reduces only layer 1 when run again
    (layer 0 passed through, a forward), and stores the statistics of the run never stopped."""
    import rankfold.execution.streaming as streaming

    def spec(folder):
        data = tiny_spec_dict(tiny_model_dir, tmp_path / folder)
        data["evaluation"]["perplexity"] = []
        return parse_spec(data)

    run_job(spec("whole"))
    real, reduced, stop_at = streaming.reduce_statistics, [], [1]

    def counted(item, partials):
        if item.layer in stop_at:
            raise KeyboardInterrupt(f"stopped in layer {item.layer}")
        reduced.append(item.layer)
        return real(item, partials)

    monkeypatch.setattr(streaming, "reduce_statistics", counted)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec("stopped"))
    assert reduced == [0]
    reduced.clear(), stop_at.clear()
    run_job(spec("stopped"))
    assert reduced == [1]  # layer 0 read back, not recomputed
    assert _stats(tmp_path / "stopped") == _stats(tmp_path / "whole") and len(_stats(tmp_path / "whole")) == 2


def test_a_layer_summary_counts_only_while_it_names_the_stored_statistics(tmp_path):
    import torch

    from rankfold.methods.statistics import InputStats
    from rankfold.workers.reduce import ReduceItem, reduce_statistics, stored_result

    store = LocalStore(tmp_path)
    stats = InputStats.zeros(3)
    stats.add_(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    item = ReduceItem(store.ref(), "stats/d/layer-00000.safetensors", 0, "float32", "stats/d/layer-00000.json")
    assert stored_result(store, item) is None
    result = reduce_statistics(item, [stats.to_tensors("mlp_in")])
    assert stored_result(store, item) == result and result[1] == {"0.mlp_in": 2}  # 2 tokens, width 3
    store.put_tensors(item.key, stats.to_tensors("other"))  # statistics rewritten since: not the summary's
    assert stored_result(store, item) is None
    reduce_statistics(item, [stats.to_tensors("mlp_in")])
    data = store.path(item.key).read_bytes()
    store.path(item.key).write_bytes(data[:-8] + b"garbage!")  # damaged in place, same size
    assert stored_result(store, item) is None
    reduce_statistics(item, [stats.to_tensors("mlp_in")])
    store.path(item.summary_key).write_text("{not json")
    assert stored_result(store, item) is None
