"""rankfold's task configs give lm-eval the same requests as lm-eval's own task code: for a handful of
documents of every task, lm-eval's registered task (built by its own TaskManager from its own YAML,
its dataset download answered with the same documents) and rankfold's build equal (context,
continuation) pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankfold.data.benchmarks import read_documents
from rankfold.data.zeroshot_tasks import ZEROSHOT_TASKS, _lm_eval_tasks_dir, overlay, zeroshot_task

FILES = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl",
         "arc_challenge": "arc/ARC-Challenge-Test.jsonl", "hellaswag": "hellaswag/hellaswag_val.llamacpp.jsonl",
         "winogrande": "winogrande/dev.jsonl", "boolq": "boolq/val.jsonl", "openbookqa": "openbookqa/test.jsonl"}
COUNT = 4


def _requests(task) -> list[tuple]:
    task.build_all_requests(limit=COUNT)
    return sorted((inst.doc_id, inst.idx, inst.arguments) for inst in task.instances)


def _lm_evals_own(name: str, docs: list[dict], monkeypatch):
    """lm-eval's registered task, its hub download answered with `docs` in every split."""
    import datasets
    from lm_eval.tasks import TaskManager

    table = datasets.Dataset.from_list(docs)
    fake = lambda *args, **kwargs: datasets.DatasetDict(  # noqa: E731
        {split: table for split in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    folder = (_lm_eval_tasks_dir() / overlay(name)["lm_eval_task"]).parent
    return TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]


def test_every_shipped_task_is_tested():
    assert set(ZEROSHOT_TASKS) == set(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_requests_equal_lm_evals_own(name, shared_data, monkeypatch):
    path = shared_data / FILES[name]
    ours = _requests(zeroshot_task(name, path, limit=COUNT))
    theirs = _requests(_lm_evals_own(name, read_documents(name, path, COUNT), monkeypatch))
    assert len(ours) >= 2 * COUNT and ours == theirs


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="unknown zero-shot task 'mmlu'.*known: arc_challenge"):
        zeroshot_task("mmlu", Path("x.jsonl"))
