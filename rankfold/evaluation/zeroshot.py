"""Zero-shot accuracy through lm-evaluation-harness itself: the model (dense or compressed, loaded
whole from its location) wrapped by lm-eval's HFLM and run by `simple_evaluate` on lm-eval's own
task configs over local files (rankfold/data/zeroshot_tasks.py). Documents are split over the
executor's workers; per-document metrics come back and are aggregated here with lm-eval's own
aggregation and standard-error functions, so one worker and many give the same numbers.

    evaluation:
      zeroshot:
        - name: suite
          tasks:
            piqa: {path: ../shared/data/piqa/valid.jsonl, limit: 200}
            hellaswag: {path: ../shared/data/hellaswag/hellaswag_val.llamacpp.jsonl, limit: 200}
          batch_size: 32

Rows: one per task and metric (acc, acc_norm where lm-eval has it; `stderr` beside the value) and
`average`: the mean over tasks of one metric each — acc_norm where the task has it, acc otherwise
(the convention of LLM-Pruner / SliceGPT / SVD-LLM tables; `metric:` per task overrides it), the
metric taken from each task named in the row.

Inputs longer than the model's context: lm-eval cuts a request's context from the left, as is usual
for these benchmarks (a BoolQ passage on a short-context model); each row records how many documents
were cut (`truncated`) and a warning says so — never a silent truncation. Non-finite logits (a float16
overflow) are an error naming the layer and dtype (workers/finite.py), never an accuracy.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from rankfold.core.options import Strict
from rankfold.data.benchmarks import data_files, read_documents
from rankfold.data.source import TextSource
from rankfold.data.zeroshot_tasks import ZEROSHOT_TASKS, lm_eval_config, zeroshot_task
from rankfold.evaluation.documents import ModelWorkers
from rankfold.evaluation.registry import EvaluationContext, Evaluator, EvaluatorOptions, Row, register_evaluator

# lm-eval's prompts and metrics are part of every result's identity.
log = logging.getLogger(__name__)
VERSION = f"1+lm_eval-{importlib.metadata.version('lm_eval')}"


class ZeroShotTask(Strict):
    path: Path                               # a local file in the benchmark's published layout
    limit: int | None = Field(None, ge=1)    # the first `limit` documents; None: all
    metric: str | None = None                # the metric entering the average (default: acc_norm, else acc)


class ZeroShotOptions(EvaluatorOptions):
    tasks: dict[str, ZeroShotTask] = Field(min_length=1)
    batch_size: int = Field(16, ge=1)        # log-likelihood requests per forward (lm-eval sorts by length)
    # Forward dtype of this evaluation (None: the job's model.dtype). bfloat16 is ~2-3× faster on CPU;
    # README gives its measured difference from float32.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, ZeroShotTask]) -> dict[str, ZeroShotTask]:
        unknown = sorted(set(tasks) - set(ZEROSHOT_TASKS))
        if unknown:
            raise ValueError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(ZEROSHOT_TASKS)})")
        return tasks


def task_metrics(task: str) -> list[str]:
    """The metrics lm-eval's config of `task` reports, in its order (e.g. ['acc', 'acc_norm'])."""
    return [entry["metric"] for entry in lm_eval_config(task)["metric_list"]]


def average_metric(task: str, chosen: str | None) -> str:
    metrics = task_metrics(task)
    if chosen is not None and chosen not in metrics:
        raise ValueError(f"tasks.{task}.metric = {chosen!r}: the task reports {', '.join(metrics)}")
    return chosen or ("acc_norm" if "acc_norm" in metrics else "acc")


def check_tasks(options: ZeroShotOptions, facts=None) -> None:
    """Every file readable and well formed, every chosen metric reported — before any model loads."""
    for task, entry in options.tasks.items():
        read_documents(task, entry.path, entry.limit)
        average_metric(task, entry.metric)


def aggregate(task: str, path: Path, limit: int | None, records: list[dict]) -> dict[str, tuple[float, float]]:
    """lm-eval's aggregation of per-document metrics: {metric: (value, stderr)}."""
    from lm_eval.api.metrics import stderr_for_metric

    functions = zeroshot_task(task, path, limit).aggregation()
    out = {}
    for metric in records[0]["metrics"]:
        values = [r["metrics"][metric] for r in records]
        stderr = stderr_for_metric(metric=functions[metric], bootstrap_iters=100000)
        out[metric] = (float(functions[metric](values)), float(stderr(values)) if stderr else float("nan"))
    return out


def _count_truncated(task: str, records: list[dict]) -> int:
    """Documents whose context lm-eval cut from the left to fit the model's context (kept in the row:
    their scores are of a shortened passage), with a warning."""
    count = sum(bool(r.get("truncated")) for r in records)
    if count:
        log.warning("zero-shot %s: %d of %d documents exceed the model's context; lm-eval cut their context "
                    "from the left (recorded as `truncated` in the rows)", task, count, len(records))
    return count


def evaluate_zeroshot(options: ZeroShotOptions, context: EvaluationContext) -> list[Row]:
    documents = {task: len(read_documents(task, e.path, e.limit)) for task, e in options.tasks.items()}
    rows, chosen = [], {}
    with ModelWorkers(context, max(documents.values()), options.dtype) as workers:
        for task, entry in context.executor.steps(list(options.tasks.items()), context.label):  # progress per task
            started = time.perf_counter()
            records = workers.map("zeroshot", range(documents[task]), task, str(entry.path), entry.limit,
                                  options.batch_size)
            wall = round(time.perf_counter() - started, 1)
            values = aggregate(task, entry.path, entry.limit, records)
            truncated = _count_truncated(task, records)
            rows += [{"metric": f"{task} {metric}", "value": value, "stderr": stderr, "documents": documents[task],
                      "truncated": truncated, "wall_s": wall} for metric, (value, stderr) in values.items()]
            metric = average_metric(task, entry.metric)
            chosen[task] = (metric, values[metric][0])
    rows.append({"metric": "average", "value": sum(v for _, v in chosen.values()) / len(chosen),
                 "of": ", ".join(f"{task} {metric}" for task, (metric, _) in chosen.items())})
    return rows


register_evaluator(Evaluator(
    "zeroshot", ZeroShotOptions, evaluate_zeroshot, VERSION,
    inputs=lambda options: [TextSource(path=p) for task, e in options.tasks.items()
                            for p in data_files(task, e.path, e.limit)],  # what its reader opens
    check=check_tasks))
