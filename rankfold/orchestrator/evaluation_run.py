"""`rankfold eval SPEC`: the spec's evaluators on an existing model, without compressing anything —
a rankfold checkpoint (a folder, or `store:checkpoints/<digest>` in the spec's artifact store), a Hugging Face folder, a GGUF or a
built-in name's dense model.

A plan of evaluate stages (plan.eval_plan), named and run as a compression job's evaluations are
(runner.py): each digest hashes the model's content fingerprint and dtype, the evaluator's VERSION,
its settings and its data files' content, so re-running reuses every finished result, and a source's
dense evaluations share their results with those of compression jobs on the same store. Every run's
rows go to the history (`rankfold history SPEC`).
"""

from __future__ import annotations

import logging
import shutil
import time

from rankfold.checkpoint import layer_layouts
from rankfold.evaluation.report import evaluation_table, generated_samples
from rankfold.execution.base import Executor
from rankfold.jobs.spec import EvalSpec, SpecError
from rankfold.models.sources import ModelSource, open_supported
from rankfold.orchestrator.history import record_run
from rankfold.orchestrator.job import make_executor, open_store
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.plan import eval_plan
from rankfold.orchestrator.preflight import check_evaluations, job_id, prepare_output
from rankfold.orchestrator.runner import evaluation_rows, run_plan
from rankfold.orchestrator.stages import Env
from rankfold.storage.store import ArtifactStore, LocalStore
from rankfold.storage.stored_model import SCHEME, stored_location

log = logging.getLogger(__name__)


def run_evaluation(spec: EvalSpec, *, executor: Executor | None = None, store: ArtifactStore | None = None) -> dict:
    """Evaluate `spec.model.source` with every entry of `spec.evaluation`; returns the report (also
    written to output.dir/report.json). Inputs are checked before any model is loaded."""
    started = time.perf_counter()
    store = store or open_store(spec)
    source = open_evaluated(spec, store)
    check_evaluations(spec, source)
    out = prepare_output(spec, store)
    plan = eval_plan(spec, source.fingerprint(), _variant(source))
    owns_executor = executor is None
    executor = executor or make_executor(spec)
    try:
        manifest, meter = Manifest(store, job_id(spec)), StageMeter()
        outputs, reused = run_plan(plan, Env(source, {}, store, executor, out / "scratch"), manifest, meter)
    finally:
        if owns_executor:
            executor.close()
    shutil.rmtree(out / "scratch", ignore_errors=True)
    report = {"spec": spec.model_dump(mode="json"), "model": str(spec.model.source), "fingerprint": source.fingerprint(),
              "variant": _variant(source), "executor": executor.describe(), "rows": evaluation_rows(plan, outputs),
              "reused_stages": reused, "artifacts": {"store": store.describe(), "manifest": manifest.key,
                                                     "digests": plan.digests()},
              "stages": meter.as_rows(), "total_wall_s": round(time.perf_counter() - started, 2)}
    LocalStore(out).put_json("report.json", report)
    record_run(store, manifest.job_id, report)
    log.info(format_evaluation(report))
    return report


def open_evaluated(spec: EvalSpec, store: ArtifactStore | None = None) -> ModelSource:
    """The model to evaluate; SpecError naming model.source when it cannot be opened.
    `store:checkpoints/<digest>` names a checkpoint in the spec's artifact store (a job's report lists
    the digest under artifacts.digests.assemble); any node of a cluster can read it."""
    location = str(spec.model.source)
    if location.startswith(SCHEME) and not location[len(SCHEME):].lstrip().startswith("{"):
        location = stored_location((store or open_store(spec)).ref(), location[len(SCHEME):])
    try:
        return open_supported(location)
    except ValueError as err:
        raise SpecError(f"model.source = {spec.model.source!r}: {err}") from None


def _variant(source: ModelSource) -> str:
    return "compressed" if layer_layouts(source.config) else "dense"


def format_evaluation(report: dict) -> str:
    lines = [f"rankfold eval · {report['model']} ({report['variant']}, fingerprint {report['fingerprint'][:12]})", ""]
    lines += evaluation_table(report["rows"]) + generated_samples(report["rows"]) + [""]
    lines += [f"  {row['stage']:<40}{row['wall_s']:>9.1f} s" for row in report["stages"]]
    lines.append(f"  {'total':<40}{report['total_wall_s']:>9.1f} s")
    return "\n".join(lines)


def require_eval_spec(spec: object, origin: str) -> EvalSpec:
    if not isinstance(spec, EvalSpec):
        raise SpecError(f"{origin}: a compression job (it has `method`): run it with `rankfold run`")
    return spec
