"""lm-evaluation-harness tasks over local files: lm-eval's own task config (prompts, preprocessing,
metrics: read from the installed lm-eval) with the overlay shipped in `task_configs/<task>.yaml`,
which changes only where the documents come from (and switches off the training / few-shot splits,
which would otherwise be fetched from a hub).

    task = zeroshot_task("piqa", "../shared/data/piqa/valid.jsonl", limit=200)
    lm_eval.simple_evaluate(model=lm, tasks=[task], samples={"piqa": [0, 1, 2]})
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from rankfold.data.benchmarks import read_documents

CONFIGS = Path(__file__).with_name("task_configs")
ZEROSHOT_TASKS = tuple(sorted(p.stem for p in CONFIGS.glob("*.yaml")))


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def overlay(task: str) -> dict:
    """The shipped overlay of `task` (KeyError naming the known tasks for an unknown one)."""
    if task not in ZEROSHOT_TASKS:
        raise KeyError(f"unknown zero-shot task {task!r} (known: {', '.join(ZEROSHOT_TASKS)})")
    return yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())


def lm_eval_config(task: str) -> dict:
    """lm-eval's own config of `task` as its loader reads it (includes and !function resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_lm_eval_tasks_dir() / overlay(task)["lm_eval_task"])


def _local_dataset(task: str, path: str, limit: int | None, split: str, **_lm_eval_metadata):
    """lm-eval's `custom_dataset` hook: the local documents as the one split the task evaluates."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_documents(task, path, limit))})


def zeroshot_config(task: str, path: str | Path, limit: int | None = None) -> dict:
    """lm-eval's config of `task` with the overlay applied; documents: the first `limit` of `path`."""
    config, changes = lm_eval_config(task), overlay(task)
    changes.pop("lm_eval_task")
    config.update(changes)
    config.pop("dataset_kwargs", None)  # hub download options
    split = config["test_split"] or config["validation_split"]
    config["custom_dataset"] = functools.partial(_local_dataset, task, str(path), limit, split)
    return config


def zeroshot_task(task: str, path: str | Path, limit: int | None = None):
    """An lm-eval ConfigurableTask over the first `limit` documents of the local file `path`."""
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=zeroshot_config(task, path, limit))
