"""The in-process executor picks threads by a task's size: small tasks one thread each, several at once;
large ones alone on every thread; results in item order, the process's threads restored — also after
an error. The choice is the size's alone, so a small task's numbers do not depend on the machine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rankfold.execution.local import SMALL_TASK_FLOPS, LocalExecutor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _observe(item):
    time.sleep(0.05)  # long enough for the pool to overlap small tasks
    return item, torch.get_num_threads(), threading.get_ident()


def test_small_tasks_run_single_threaded_side_by_side_and_large_ones_alone(two_threads):
    work = [1.0, SMALL_TASK_FLOPS * 10, 2.0, 3.0, SMALL_TASK_FLOPS * 2]
    results = LocalExecutor().map(_observe, list(range(5)), "test", work)
    assert [item for item, _, _ in results] == list(range(5))
    threads = {item: count for item, count, _ in results}
    assert [threads[k] for k in (0, 2, 3)] == [1, 1, 1] and threads[1] == threads[4] == 2
    assert len({ident for _, _, ident in (results[k] for k in (0, 2, 3))} - {threading.get_ident()}) >= 1
    assert torch.get_num_threads() == 2


def test_without_work_every_task_runs_here_on_every_thread(two_threads):
    results = LocalExecutor().map(_observe, [0, 1], "test")
    assert [(count, ident) for _, count, ident in results] == [(2, threading.get_ident())] * 2


def test_an_error_in_a_small_task_propagates_and_threads_are_restored(two_threads):
    def fail_on_two(item):
        if item == 2:
            raise ValueError("task 2 failed")
        return item

    with pytest.raises(ValueError, match="task 2 failed"):
        LocalExecutor().map(fail_on_two, [0, 1, 2, 3], "test", [1.0] * 4)
    assert torch.get_num_threads() == 2


def test_a_small_factorisation_equals_its_single_threaded_self(two_threads):
    """What makes the choice reproducible: a pooled task computes exactly what one thread computes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 900, generator=gen, dtype=torch.float64)

    def factorise(_item):
        return torch.linalg.svd(torch.linalg.cholesky(x @ x.T), full_matrices=False)[1]

    pooled = LocalExecutor().map(factorise, [0, 1, 2], "test", [1.0] * 3)
    torch.set_num_threads(1)
    alone = factorise(None)
    assert all(torch.equal(s, alone) for s in pooled)
