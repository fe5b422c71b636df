"""The lock beside a file: one holder at a time across processes, released when its holder exits."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from rankfold.core.files import LockTimeout, lock_path, locked


def _hold(target: str, held, release) -> None:
    with locked(target):
        held.set()
        release.wait(30)


def test_a_second_process_waits_and_times_out_naming_the_lock(tmp_path):
    target = tmp_path / "registry.json"
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(target), held, release))
    holder.start()
    try:
        assert held.wait(30)
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"\.registry\.json\.lock.*registry\.json was not changed"):
            with locked(target, timeout_s=0.3):
                pass
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
        holder.join(30)
    with locked(target, timeout_s=5):  # released by its holder's exit
        assert lock_path(target).name == ".registry.json.lock"


def test_a_holder_that_dies_releases_the_lock(tmp_path):
    target = tmp_path / "manifest.json"
    context = multiprocessing.get_context("fork")
    held, never = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(target), held, never))
    holder.start()
    assert held.wait(30)
    holder.kill()
    holder.join(30)
    with locked(target, timeout_s=5):
        pass
