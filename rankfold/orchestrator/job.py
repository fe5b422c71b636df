"""`run_job(spec)`: the whole compression job — the plan's stages run under the manifest (a stage
whose recorded digest matches and whose artifacts verify is reused, the rest run), then the report."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from rankfold.evaluation.report import RATIO_DEFINITION, format_report, model_parameter_total, parameter_counts
from rankfold.execution.base import Executor
from rankfold.execution.local import LocalExecutor
from rankfold.jobs.spec import JobSpec
from rankfold.orchestrator.graph import Plan
from rankfold.orchestrator.history import record_run
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.model_layout import plan_layout
from rankfold.orchestrator.plan import make_plan
from rankfold.orchestrator.preflight import CHECKPOINT_FOLDER, job_id, preflight, prepare_output
from rankfold.orchestrator.runner import evaluation_rows, run_plan
from rankfold.orchestrator.stages import Env
from rankfold.orchestrator.stages.assemble import compressed_layout
from rankfold.storage.store import ArtifactStore, LocalStore, S3Store

log = logging.getLogger(__name__)


def open_store(spec: JobSpec) -> ArtifactStore:
    """The spec's artifact store: S3 when `output.s3` is set (checked now: bucket, credentials,
    endpoint), else `output.dir/artifacts`."""
    if spec.output.s3 is None:
        return LocalStore(Path(spec.output.dir) / "artifacts")
    s3 = spec.output.s3
    return S3Store(s3.bucket, prefix=s3.prefix, endpoint_url=s3.endpoint_url, region=s3.region)


def make_executor(spec: JobSpec) -> Executor:
    execution = spec.execution
    if execution.executor == "local":
        return LocalExecutor(device=execution.device, device_activations_bytes=execution.device_activations_bytes)
    from rankfold.execution.ray import RayExecutor

    return RayExecutor(execution.address, execution.workers, execution.cpus_per_worker,
                       gpus_per_worker=execution.gpus_per_worker, device=execution.device,
                       device_activations_bytes=execution.device_activations_bytes)


def run_job(spec: JobSpec, *, executor: Executor | None = None, store: ArtifactStore | None = None) -> dict:
    """Compress, evaluate and report. Inputs (store and cluster too) are checked before anything is
    written. `store` overrides the spec's artifact store (benchmarks share one across jobs, so one
    calibration serves every variant)."""
    owns_executor = executor is None
    executor = executor or make_executor(spec)
    try:
        return _run_job(spec, executor, store)
    finally:
        if owns_executor:
            executor.close()


def job_plan(spec: JobSpec, source, shapes) -> Plan:
    uniform = plan_layout(spec.method, spec.target.ratio, source.architecture, shapes,  # uniform ranks
                          experts=spec.target.experts)
    return make_plan(spec, source.fingerprint(), uniform)


def _run_job(spec: JobSpec, executor: Executor, store: ArtifactStore | None) -> dict:
    started = time.perf_counter()
    source, shapes = preflight(spec)
    store = store or open_store(spec)
    out = prepare_output(spec, store)
    plan = job_plan(spec, source, shapes)
    env = Env(source, shapes, store, executor, out / "scratch", out / CHECKPOINT_FOLDER,
              spec.calibration.max_resident_mb)
    manifest, meter = Manifest(store, job_id(spec)), StageMeter()
    outputs, reused = run_plan(plan, env, manifest, meter)
    shutil.rmtree(env.scratch, ignore_errors=True)
    report = make_report(spec, env, plan, outputs, manifest, meter, reused, time.perf_counter() - started)
    LocalStore(out).put_json("report.json", report)
    record_run(store, manifest.job_id, report)  # the trend `rankfold history` shows
    log.info(format_report(report))
    return report


def make_report(spec: JobSpec, env: Env, plan: Plan, outputs: dict, manifest: Manifest, meter: StageMeter,
                reused: list[str], wall_s: float) -> dict:
    source, arch = env.source, env.source.architecture
    layout = compressed_layout(env, plan["assemble"].params, outputs["allocate"], outputs.get("kv_allocate"))
    result = lambda name: outputs[name].result if name in outputs else {}  # noqa: E731
    fitted = result(plan["assemble"].inputs["factors"])  # decompose, or the anchored walk
    return {
        "spec": spec.model_dump(mode="json"),
        "method": spec.method.model_dump(mode="json"),
        "target": spec.target.model_dump(mode="json"),
        "ratio_definition": RATIO_DEFINITION,
        "parameters": parameter_counts(env.shapes, layout.by_layer,
                                       model_parameter_total([source.shape(k) for k in source.keys()])),
        "ranks": layout.ranks(arch),
        "layout": layout.flat(arch),
        "diagnostics": _summarise(fitted.get("diagnostics", {})),
        "calibration_tokens": result("calibrate").get("tokens", fitted.get("tokens", 0)),
        # input groups (layer.group) that saw fewer calibration tokens than their width: whitened with a ridge
        "few_calibration_tokens": result("calibrate").get("few_tokens", {}),
        "allocation": {"kind": spec.target.allocation.kind, **result("fisher")},
        "kv_cache": None if spec.kv_cache is None else {**spec.kv_cache.model_dump(mode="json"),
                                                        **outputs["kv_allocate"].summary},
        "checkpoint": str(env.checkpoint),
        "artifacts": {"store": env.store.describe(), "manifest": manifest.key, "digests": plan.digests()},
        "executor": env.executor.describe(),
        "reused_stages": reused,
        "rows": evaluation_rows(plan, outputs),
        "stages": meter.as_rows(),
        "total_wall_s": round(wall_s, 2),
    }


def _summarise(diagnostics: dict[str, dict[str, float]]) -> dict:
    """Worst skip-block condition number (cond(A₁)) and where it is, if the method skips; with anchored
    fitting, how often each plain-term weight was kept and the mean held-out error ratio to plain, each
    layer's and module's held-out errors per weight, how many groups had a weight refused, and the
    output correction's kept blends; the groups fitted to the layer output (fitting.output_mix) apart."""
    summary = {}
    conditions = diagnostics.get("skip_condition", {})
    if conditions:
        worst = max(conditions, key=conditions.get)
        summary.update(max_skip_condition=conditions[worst], max_skip_condition_at=worst,
                       skip_blocks=len(conditions))
    output = set(diagnostics.get("output_anchored", {}))  # fitted to the layer output: their own summary
    for name, chosen in (("anchored", lambda path: path not in output), ("output_anchored", output.__contains__)):
        weights = [w for path, w in diagnostics.get("anchored_weight", {}).items() if chosen(path)]
        if weights:
            summary[f"{name}_weights_kept"] = {str(w): weights.count(w) for w in sorted(set(weights))}
        ratios = [r for path, r in diagnostics.get("heldout_error_ratio", {}).items() if chosen(path)]
        if ratios:
            summary[f"mean_{name.replace('anchored', 'heldout')}_error_ratio"] = sum(ratios) / len(ratios)
    corrected = list(diagnostics.get("output_correction_weight", {}).values())
    if corrected:
        summary["output_correction_weights_kept"] = {str(w): corrected.count(w) for w in sorted(set(corrected))}
        block_ratios = list(diagnostics["output_correction_ratio"].values())
        summary["mean_output_correction_ratio"] = sum(block_ratios) / len(block_ratios)
    errors = {quantity.split("@", 1)[1]: {path: v for path, v in values.items() if path not in output}
              for quantity, values in diagnostics.items() if quantity.startswith("heldout_error@")}
    errors = {w: values for w, values in errors.items() if values}
    refused = diagnostics.get("anchored_refused", {})
    if refused:
        summary["anchored_modules_with_refused_weights"] = len(refused)  # a shared group is one module
    if errors:  # {weight: {layer: Σ held-out error}}, {weight: {module in the layer: Σ over layers}}, over
        # the modules fitted at every weight (a refused candidate leaves its module out of every sum)
        common = set.intersection(*(set(values) for values in errors.values()))
        errors = {w: {path: v for path, v in values.items() if path in common} for w, values in errors.items()}
        summary["heldout_error_by_layer"] = {w: _sums(values, _layer_of) for w, values in errors.items()}
        summary["heldout_error_by_module"] = {w: _sums(values, _module_of) for w, values in errors.items()}
    return {**summary, **_refine_summary(diagnostics)}


def _refine_summary(diagnostics: dict[str, dict[str, float]]) -> dict:
    """fitting.refine: layers refined, how often each step was kept (0: the start), and the mean held-out
    layer-output error of the kept factors over the start's."""
    steps, ratios = diagnostics.get("refine_step", {}), diagnostics.get("refine_heldout_ratio", {})
    if not steps:
        return {}
    kept = [int(step) for step in steps.values()]
    return {"refined_layers": len(steps), "refine_steps_kept": {str(s): kept.count(s) for s in sorted(set(kept))},
            "mean_refine_heldout_ratio": sum(ratios.values()) / len(ratios)}


def _layer_of(path: str) -> str:
    found = re.search(r"\.(\d+)\.", path)
    return found.group(1) if found else path


def _module_of(path: str) -> str:
    found = re.search(r"\.\d+\.(.+)$", path)
    return found.group(1) if found else path


def _sums(values: dict[str, float], key) -> dict[str, float]:
    sums: dict[str, float] = {}
    for path, value in values.items():
        sums[key(path)] = sums.get(key(path), 0.0) + value
    return sums
