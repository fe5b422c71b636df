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
    key = store.list_keys(f"stats/{first['artifacts']['digests']['calibrate']}/")[0]
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
