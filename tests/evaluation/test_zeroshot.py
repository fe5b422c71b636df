"""The zero-shot evaluator: lm-eval's own numbers, whichever way the documents are split (in-process
slices, Ray actors), and bad input refused before any model is loaded."""

from __future__ import annotations

import pytest

from rankfold.evaluation.registry import EvaluationContext
from rankfold.evaluation.zeroshot import ZeroShotOptions, evaluate_zeroshot
from rankfold.execution.local import LocalExecutor

TASKS = {"piqa": ("piqa/valid.jsonl", 6), "arc_easy": ("arc/ARC-Easy-Test.jsonl", 5),
         "winogrande": ("winogrande/dev.jsonl", 5), "boolq": ("boolq/val.jsonl", 4)}


def _options(shared_data, **extra) -> ZeroShotOptions:
    return ZeroShotOptions(name="suite", tasks={t: {"path": str(shared_data / p), "limit": n}
                                                for t, (p, n) in TASKS.items()}, batch_size=4, **extra)


def _context(executor, model_dir, tmp_path) -> EvaluationContext:
    from rankfold.models.sources import open_source

    source = open_source(model_dir)
    return EvaluationContext(executor, str(model_dir), source.num_layers, lambda i: None, source.tokenizer(),
                             "float32", tmp_path, "zeroshot test")


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, shared_data, tmp_path_factory):
    """Rows of the evaluator with the documents in two in-process slices."""
    return evaluate_zeroshot(_options(shared_data), _context(LocalExecutor(workers=2), tiny_model_dir,
                                                             tmp_path_factory.mktemp("zs")))


def test_values_are_lm_evals_own(in_process, tiny_model_dir, shared_data):
    """One simple_evaluate over all documents (lm-eval's own aggregation and stderr) gives the same values."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from rankfold.checkpoint import model_from_source
    from rankfold.data.zeroshot_tasks import zeroshot_task
    from rankfold.models.sources import open_source

    source = open_source(tiny_model_dir)
    lm = HFLM(pretrained=model_from_source(source), tokenizer=source.tokenizer(), batch_size=4, device="cpu")
    tasks = [zeroshot_task(t, shared_data / p, n) for t, (p, n) in TASKS.items()]
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False))["results"]
    rows = {row["metric"]: row for row in in_process}
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in results[task]:
                row = rows[f"{task} {metric}"]
                assert row["value"] == pytest.approx(results[task][f"{metric},none"], abs=1e-12)
                assert row["stderr"] == pytest.approx(results[task][f"{metric}_stderr,none"], abs=1e-12)
    chosen = [rows["piqa acc_norm"], rows["arc_easy acc_norm"], rows["winogrande acc"], rows["boolq acc"]]
    assert rows["average"]["value"] == pytest.approx(sum(r["value"] for r in chosen) / 4)
    assert rows["average"]["of"] == "piqa acc_norm, arc_easy acc_norm, winogrande acc, boolq acc"


def test_ray_actors_give_the_same_rows(in_process, ray_executor, tiny_model_dir, shared_data, tmp_path):
    on_ray = evaluate_zeroshot(_options(shared_data), _context(ray_executor, tiny_model_dir, tmp_path))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(on_ray) == strip(in_process)


@pytest.mark.parametrize("tasks, message", [
    ({"mmlu": {"path": "x.jsonl"}}, "unknown zero-shot task(s) 'mmlu'"),
    ({"piqa": {"path": "x.jsonl", "limit": 0}}, "tasks.piqa.limit"),
    ({}, "tasks"),
])
def test_bad_options_are_named(tasks, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ZeroShotOptions(name="suite", tasks=tasks)


def test_bad_metric_choice_is_named(shared_data):
    from rankfold.evaluation.zeroshot import check_tasks

    options = ZeroShotOptions(name="s", tasks={"boolq": {"path": str(shared_data / "boolq/val.jsonl"),
                                                         "metric": "acc_norm"}})
    with pytest.raises(ValueError, match="tasks.boolq.metric = 'acc_norm': the task reports acc"):
        check_tasks(options)
