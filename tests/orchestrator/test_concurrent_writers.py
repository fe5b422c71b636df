"""Files several rankfold processes update at once — the schedule registry, a job's manifest, the run
history, one artifact key — lose nothing when two real processes write them together: each change is
made under a lock (or, on S3, by a conditional PUT) to what is stored at that moment."""

from __future__ import annotations

import multiprocessing
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from rankfold.orchestrator.history import load_history, record_run
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.schedule import ScheduleRegistry, run_due
from rankfold.storage.store import LocalStore, S3Store
from tests.conftest import tiny_spec_dict

COUNT = 20  # changes per process


def _together(*calls, timeout_s: float = 120.0) -> None:
    """Run each (function, *args) in its own process, all released at once; each must exit cleanly.
    fork: the children start with this process's imports, in milliseconds."""
    context = multiprocessing.get_context("fork")
    go = context.Event()
    processes = [context.Process(target=_after, args=(go, call)) for call in calls]
    for process in processes:
        process.start()
    go.set()
    for process in processes:
        process.join(timeout_s)
    assert [process.exitcode for process in processes] == [0] * len(processes)


def _after(go, call) -> None:
    go.wait(60)
    call[0](*call[1:])


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "nightly.yaml"  # only parsed here: the model need not exist
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path / "model", tmp_path / "out")))
    return path


def _schedule(registry: str, spec: str, prefix: str) -> None:
    for index in range(COUNT):
        ScheduleRegistry(Path(registry)).add(spec, "0 2 * * *", None, name=f"{prefix}{index}",
                                             now=datetime(2026, 11, 24))


def test_two_processes_scheduling_at_once_keep_every_entry(tmp_path, spec_file):
    registry = tmp_path / "schedules.json"
    _together((_schedule, str(registry), str(spec_file), "a"), (_schedule, str(registry), str(spec_file), "b"))
    names = sorted(entry.name for entry in ScheduleRegistry(registry).entries())
    assert names == sorted(f"{p}{i}" for p in "ab" for i in range(COUNT))


def _scheduler_with_slow_submit(registry: str, inside: str, release: str) -> None:
    def slow_submit(spec, address):
        Path(inside).touch()
        deadline = time.monotonic() + 60
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "job-1"

    run_due(ScheduleRegistry(Path(registry)), datetime(2026, 11, 24, 2, 1), slow_submit, log=lambda _: None)


@pytest.mark.parametrize("meanwhile", ["schedule another", "remove the submitted one"])
def test_a_change_made_while_the_scheduler_submits_is_kept(tmp_path, spec_file, meanwhile):
    """The issue's case: `rankfold schedule other.yaml` confirms while the scheduler is in a slow
    submission; the scheduler's save must not drop the new entry (nor bring back a removed one)."""
    registry = ScheduleRegistry(tmp_path / "schedules.json")
    registry.add(spec_file, "0 2 * * *", None, name="nightly", now=datetime(2026, 11, 24, 1, 0))
    inside, release = tmp_path / "inside", tmp_path / "release"
    context = multiprocessing.get_context("fork")
    scheduler = context.Process(target=_scheduler_with_slow_submit,
                                args=(str(registry.path), str(inside), str(release)))
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while not inside.exists() and scheduler.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inside.exists(), "the scheduler never reached its submission"
        if meanwhile == "schedule another":
            registry.add(spec_file, "30 3 * * *", None, name="other", now=datetime(2026, 11, 24, 2, 0))
        else:
            assert registry.remove("nightly")
    finally:
        release.touch()
        scheduler.join(60)
    assert scheduler.exitcode == 0
    entries = {entry.name: entry for entry in registry.entries()}
    if meanwhile == "schedule another":
        assert set(entries) == {"nightly", "other"} and entries["other"].next_run == "2026-11-24T03:30:00"
        assert entries["nightly"].last_submission == "job-1" and entries["nightly"].next_run == "2026-11-25T02:00:00"
    else:
        assert entries == {}


def _record_stages(root: str, prefix: str) -> None:
    store = LocalStore(root)
    manifest = Manifest(store, "job")
    for index in range(COUNT):
        key = f"stats/{prefix}{index}.json"
        manifest.record(f"{prefix}{index}", f"digest-{prefix}{index}", {key: store.put_json(key, {"i": index})})


def test_two_processes_recording_stages_of_one_job_keep_every_record(tmp_path):
    _together((_record_stages, str(tmp_path / "store"), "a"), (_record_stages, str(tmp_path / "store"), "b"))
    store = LocalStore(tmp_path / "store")
    stages = Manifest(store, "job").stages
    assert sorted(stages) == sorted(f"{p}{i}" for p in "ab" for i in range(COUNT))
    assert all(store.exists(f"stages/digest-{name}.json") for name in stages)
    assert Manifest(store, "job").completed("a3", "digest-a3") is not None  # the artifacts verify


def test_a_manifest_read_before_another_process_wrote_keeps_that_write(tmp_path):
    store = LocalStore(tmp_path)
    early, late = Manifest(store, "job"), Manifest(store, "job")
    early.record("calibrate", "d1", {})
    late.record("decompose", "d2", {})  # `late` never saw calibrate's record
    assert sorted(Manifest(store, "job").stages) == ["calibrate", "decompose"]
    assert sorted(late.stages) == ["calibrate", "decompose"]  # and now holds it
    early.forget("calibrate")
    assert sorted(Manifest(store, "job").stages) == ["decompose"]


def test_forget_keeps_a_record_rewritten_since_it_was_read(tmp_path):
    store = LocalStore(tmp_path)
    stale, fresh = Manifest(store, "job"), Manifest(store, "job")
    stale.record("calibrate", "d1", {})
    fresh.record("calibrate", "d1", {}, {"recomputed": True})  # a newer record of the same stage
    assert stale.stages["calibrate"].result == {}  # `stale` judges the record it read
    stale.forget("calibrate")  # drops what it judged, not the newer record
    assert Manifest(store, "job").stages["calibrate"].result == {"recomputed": True}


def _s3_update(endpoint: str, bucket: str, name: str) -> None:
    store = S3Store(bucket, prefix="p", endpoint_url=endpoint)  # a client of this process's own
    for index in range(COUNT):
        store.update_json("jobs/job/manifest.json",
                          lambda value, index=index: {"by": (value or {"by": []})["by"] + [f"{name}{index}"]})


def test_two_processes_updating_one_s3_record_lose_nothing(s3_endpoint, s3_bucket):
    _together((_s3_update, s3_endpoint, s3_bucket, "a"), (_s3_update, s3_endpoint, s3_bucket, "b"))
    written = S3Store(s3_bucket, prefix="p", endpoint_url=s3_endpoint).get_json("jobs/job/manifest.json")["by"]
    assert sorted(written) == sorted(f"{p}{i}" for p in "ab" for i in range(COUNT))


FROZEN_NS = 1_795_000_000_123_456_789


def _record_runs(root: str) -> None:
    time.time_ns = lambda: FROZEN_NS  # this child's clock only: every record in the same microsecond
    for _ in range(COUNT):
        record_run(LocalStore(root), "job", {"total_wall_s": 1.0, "reused_stages": []})


def test_two_processes_recording_runs_in_one_microsecond_keep_every_record(tmp_path):
    _together((_record_runs, str(tmp_path)), (_record_runs, str(tmp_path)))
    records = load_history(LocalStore(tmp_path), "job")
    assert len(records) == 2 * COUNT and {r["finished_at"] for r in records} == {FROZEN_NS / 1e9}


def test_history_leaves_out_a_record_still_being_written(tmp_path):
    store = LocalStore(tmp_path)
    key = record_run(store, "job", {"total_wall_s": 1.0, "reused_stages": []})
    (tmp_path / "history" / "job" / "20990101T000000Z-000000-0000abcd.json").write_text("{")  # no checksum yet
    assert len(load_history(store, "job")) == 1
    store.path(key).write_text('{"finished_at": 1}')  # a finished record, damaged: an error, not a gap
    with pytest.raises(Exception, match="damaged"):
        load_history(store, "job")


def _write_pausing_before_the_checksum(root: str, flags: str) -> None:
    """Writer A: after its data is renamed into place, waits (up to 1 s) for writer B to finish a whole write."""
    store, original = LocalStore(root), LocalStore._atomic_write

    def pausing(self, target, write):
        original(self, target, write)
        if not target.name.endswith(".sha256"):
            (Path(flags) / "a-data").touch()
            deadline = time.monotonic() + 1.0
            while not (Path(flags) / "b-done").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    LocalStore._atomic_write = pausing  # this child's class only
    store.put_json("stages/shared.json", {"writer": "a"})


def _write_in_the_gap(root: str, flags: str) -> None:
    deadline = time.monotonic() + 30
    while not (Path(flags) / "a-data").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    LocalStore(root).put_json("stages/shared.json", {"writer": "b"})
    (Path(flags) / "b-done").touch()


def test_two_processes_writing_one_key_leave_a_checksum_that_matches(tmp_path):
    """Two runs of one job write the same content-addressed keys: data and checksum come from one
    writer, even when the second writer starts between the first's data and its checksum."""
    (tmp_path / "flags").mkdir()
    _together((_write_pausing_before_the_checksum, str(tmp_path / "store"), str(tmp_path / "flags")),
              (_write_in_the_gap, str(tmp_path / "store"), str(tmp_path / "flags")))
    store = LocalStore(tmp_path / "store")
    assert store.verify("stages/shared.json") and store.get_json("stages/shared.json") == {"writer": "b"}


def test_forget_drops_a_record_written_before_stage_inputs_were_recorded(tmp_path):
    """A record stored without the newer `inputs` field reads as the same record, so forget drops it."""
    store = LocalStore(tmp_path)
    Manifest(store, "job").record("assemble", "d1", {})
    stored = store.get_json("jobs/job/manifest.json")
    del stored["stages"]["assemble"]["inputs"]  # as an older rankfold wrote it
    store.put_json("jobs/job/manifest.json", stored)
    Manifest(store, "job").forget("assemble")
    assert Manifest(store, "job").stages == {}
