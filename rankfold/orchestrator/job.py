"""`run_job(spec)`: the whole compression job, resumable, ending in a report.json.

Stages: calibrate -> [fisher -> spectra -> allocate] -> decompose -> assemble -> evaluate (the
bracketed ones for `target.allocation.kind: fisher`; otherwise ranks are uniform). Each stage's inputs are hashed
into its digest (see manifest.py); a re-run of the same spec skips every stage whose recorded
digest matches and whose artifacts verify, so an interrupted job resumes at its first unfinished stage.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from rankfold.checkpoint import CheckpointError, verify_checkpoint
from rankfold.data.text import load_text, text_fingerprint, tokenize
from rankfold.evaluation.report import format_report, model_parameter_total, parameter_counts
from rankfold.jobs.spec import JobSpec, PerplexitySpec
from rankfold.models.architecture import Architecture
from rankfold.models.sources import ModelSource, ModelSourceError, SafetensorsSource
from rankfold.orchestrator.executor import LocalExecutor
from rankfold.orchestrator.history import record_run
from rankfold.orchestrator.manifest import Manifest, digest_of
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.pipeline import (RATIO_DEFINITION, ModelLayout, assemble, calibrate, decompose, fisher,
                                            fisher_ranks, matrix_shapes, perplexity, place_checkpoint, plan_layout,
                                            prepare_output, preflight, spectra)
from rankfold.orchestrator.store import ArtifactStore, LocalStore, S3Store
from rankfold.orchestrator.stored_model import StoredCheckpointSource
from rankfold.workers.evaluate import make_windows

CHECKPOINT_FILES = "checkpoints"


def open_store(spec: JobSpec) -> ArtifactStore:
    """The spec's artifact store: S3 when `output.s3` is set (checked now: bucket, credentials,
    endpoint), else `output.dir/artifacts`."""
    if spec.output.s3 is None:
        return LocalStore(Path(spec.output.dir) / "artifacts")
    s3 = spec.output.s3
    return S3Store(s3.bucket, prefix=s3.prefix, endpoint_url=s3.endpoint_url, region=s3.region)


def stage_digests(spec: JobSpec, arch: Architecture, uniform: ModelLayout, model_id: str) -> dict[str, str]:
    """What the stages before the layout is fixed depend on, hashed (`model_id`: the source's
    fingerprint). A change anywhere upstream changes every digest below."""
    model = (model_id, spec.model.dtype)
    # max_resident_mb only decides what spills to disk, never a number: not part of the identity.
    calibration = spec.calibration.model_dump(mode="json", exclude={"max_resident_mb"})
    text = text_fingerprint(spec.calibration.data)
    digests = {"calibrate": digest_of("stats-v1", model, calibration, text)}
    allocation = spec.target.allocation
    if allocation.kind == "fisher":
        digests["fisher"] = digest_of("fisher-v1", model, calibration, text, allocation.fisher_samples,
                                      allocation.fisher_batch_size)
        digests["spectra"] = digest_of("spectra-v1", digests["calibrate"], uniform.flat(arch))
        digests["allocate"] = digest_of("allocate-v1", digests["fisher"], digests["spectra"], spec.target.ratio,
                                        allocation.min_rank_fraction)
    return digests


def layout_digests(spec: JobSpec, arch: Architecture, layout: ModelLayout, calibrate_digest: str) -> dict[str, str]:
    """Digests of the stages that follow the (uniform or allocated) layout."""
    decompose_digest = digest_of("factors-v1", calibrate_digest, spec.method.model_dump(mode="json"),
                                 layout.flat(arch))
    return {"decompose": decompose_digest, "assemble": digest_of("checkpoint-v1", decompose_digest)}


def _perplexity_digest(base: str, ppl: PerplexitySpec) -> str:
    return digest_of("ppl-v1", base, ppl.model_dump(mode="json", exclude={"name"}), text_fingerprint(ppl.data))


def make_executor(spec: JobSpec, stream: TextIO | None):
    execution = spec.execution
    if execution.executor == "local":
        return LocalExecutor(stream)
    from rankfold.orchestrator.ray_executor import RayExecutor

    return RayExecutor(execution.address, execution.workers, execution.cpus_per_worker, stream)


def run_job(spec: JobSpec, stream: TextIO | None = sys.stderr, executor=None) -> dict:
    """Compress, evaluate and report. Inputs (store and cluster too) are checked before anything is written."""
    owns_executor = executor is None
    executor = executor or make_executor(spec, stream)
    try:
        return _run_job(spec, stream, executor)
    finally:
        if owns_executor:
            executor.close()


def _run_job(spec: JobSpec, stream: TextIO | None, executor) -> dict:
    started = time.perf_counter()
    source = preflight(spec)
    store = open_store(spec)
    out = prepare_output(spec)
    scratch, checkpoint = out / "scratch", out / "model"
    meter = StageMeter()
    manifest = Manifest(store, digest_of(spec.canonical_json()))
    arch = source.architecture
    shapes = matrix_shapes(source, spec)
    layout = plan_layout(spec, arch, shapes)  # uniform ranks; the module structure in every case
    model_id = source.fingerprint()  # reads the weights' leading bytes: once per job
    digests = stage_digests(spec, arch, layout, model_id)
    reused: list[str] = []

    def run_stage(name: str, work, extra_check=lambda record: True) -> dict:
        """Run `work() -> (result, artifacts)` unless the manifest holds a verified result."""
        record = manifest.completed(name, digests[name])
        if record is not None and extra_check(record):
            reused.append(name)
            _say(stream, f"{name}: reusing verified artifacts ({digests[name]})")
            return record.result
        with meter.stage(name, executor.take_worker_peak_mb):
            result, artifacts = work()
        return manifest.record(name, digests[name], artifacts, result).result

    calibration = run_stage("calibrate", lambda: _calibrate(spec, source, store, executor, scratch, digests))
    allocation = {"kind": spec.target.allocation.kind}
    if spec.target.allocation.kind == "fisher":
        allocation.update(run_stage("fisher", lambda: fisher(spec, source, store, executor, scratch,
                                                             prefix=f"fisher/{digests['fisher']}")))
        stats_prefix, spectra_prefix = f"stats/{digests['calibrate']}", f"spectra/{digests['spectra']}"
        run_stage("spectra", lambda: ({}, spectra(source, layout, store, executor, stats_prefix, spectra_prefix)))
        ranks = run_stage("allocate", lambda: ({"ranks": {str(i): r for i, r in fisher_ranks(
            spec, source, layout, shapes, store, f"fisher/{digests['fisher']}", spectra_prefix).items()}}, {}))["ranks"]
        layout = plan_layout(spec, arch, shapes, ranks={int(i): r for i, r in ranks.items()})
    digests.update(layout_digests(spec, arch, layout, digests["calibrate"]))
    decomposition = run_stage("decompose", lambda: _decompose(spec, source, layout, store, executor, digests))
    run_stage("assemble", lambda: _assemble(spec, source, layout, store, executor, checkpoint, digests),
              extra_check=lambda record: _restore_checkpoint(store, record, checkpoint, digests["assemble"]))

    # Evaluate the artifact as written, not an in-memory copy: in-process from output.dir; on Ray
    # from the store, which every node can read (output.dir is on the driver's machine only).
    compressed = (SafetensorsSource(checkpoint) if isinstance(executor, LocalExecutor)
                  else StoredCheckpointSource(store.ref(), f"{CHECKPOINT_FILES}/{digests['assemble']}"))
    rows = []
    for k, ppl in enumerate(spec.evaluation.perplexity):
        windows = make_windows(tokenize(load_text(ppl.data), source.tokenizer()), ppl.window, ppl.max_tokens)
        row = {"name": ppl.name, "window": ppl.window, "tokens": windows.numel(), "windows": windows.shape[0]}
        variants = [("compressed", compressed, layout, digests["assemble"])]
        if spec.evaluation.dense:
            variants.insert(0, ("dense", source, None, digest_of(model_id, spec.model.dtype)))
        for label, model, model_layout, base in variants:
            stage = f"evaluate {label} {ppl.name}" + (f" #{k}" if k else "")
            digests[stage] = _perplexity_digest(base, ppl)
            row[label] = run_stage(stage, lambda: ({"perplexity": perplexity(
                model, windows, spec.model.dtype, ppl.batch_size, executor, f"perplexity {ppl.name} {label}", model_layout,
                scratch)}, {}))["perplexity"]
        rows.append(row)
    shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "spec": spec.model_dump(mode="json"),
        "method": spec.method.model_dump(mode="json"),
        "target": spec.target.model_dump(mode="json"),
        "ratio_definition": RATIO_DEFINITION,
        "parameters": parameter_counts(shapes, layout.by_layer,
                                       model_parameter_total([source.shape(k) for k in source.keys()])),
        "ranks": layout.ranks(source.architecture),
        "layout": layout.flat(source.architecture),
        "diagnostics": _summarise(decomposition["diagnostics"]),
        "calibration_tokens": calibration["tokens"],
        "allocation": allocation,
        "checkpoint": str(checkpoint),
        "artifacts": {"store": store.describe(), "manifest": manifest.key, "digests": digests},
        "executor": executor.describe(),
        "reused_stages": reused,
        "perplexity": rows,
        "stages": meter.as_rows(),
        "total_wall_s": round(time.perf_counter() - started, 2),
    }
    LocalStore(out).put_json("report.json", report)
    record_run(store, manifest.job_id, report)  # the trend `rankfold history` shows
    if stream is not None:
        print(format_report(report), file=stream)
    return report


def _calibrate(spec, source, store, executor, scratch, digests) -> tuple[dict, dict[str, str]]:
    tokens, artifacts = calibrate(spec, source, store, executor, scratch, prefix=f"stats/{digests['calibrate']}")
    return {"tokens": tokens}, artifacts


def _decompose(spec, source, layout, store, executor, digests) -> tuple[dict, dict[str, str]]:
    diagnostics, artifacts = decompose(spec, source, layout, store, executor,
                                       stats_prefix=f"stats/{digests['calibrate']}",
                                       factors_prefix=f"factors/{digests['decompose']}")
    return {"diagnostics": diagnostics}, artifacts


def _assemble(spec, source, layout, store, executor, checkpoint: Path, digests) -> tuple[dict, dict[str, str]]:
    """The checkpoint in the store (workers write its shards) and placed in output.dir/model."""
    artifacts = assemble(spec, source, layout, store, executor, checkpoint,
                         factors_prefix=f"factors/{digests['decompose']}", digest=digests["assemble"],
                         checkpoint_prefix=f"{CHECKPOINT_FILES}/{digests['assemble']}")
    return {"folder": str(checkpoint)}, artifacts


def _restore_checkpoint(store: ArtifactStore, record, checkpoint: Path, digest: str) -> bool:
    """A finished assembly counts only if output.dir holds its verified checkpoint — placed again
    from the store when the folder is gone or damaged."""
    if _checkpoint_is(checkpoint, digest):
        return True
    shutil.rmtree(checkpoint, ignore_errors=True)
    place_checkpoint(store, record.artifacts, checkpoint)
    return _checkpoint_is(checkpoint, digest)


def _checkpoint_is(folder: Path, digest: str) -> bool:
    try:
        verify_checkpoint(folder)
        config = SafetensorsSource(folder).config
    except (CheckpointError, ModelSourceError, OSError, ValueError):
        return False
    return getattr(config, "rankfold", {}).get("digest") == digest


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream)


def _summarise(diagnostics: dict[str, float]) -> dict:
    """Worst skip-block condition number (cond(A₁)) and where it is, if the method skips."""
    conditions = {k.rsplit(".", 1)[0]: v for k, v in diagnostics.items() if k.endswith(".condition")}
    if not conditions:
        return {}
    worst = max(conditions, key=conditions.get)
    return {"max_skip_condition": conditions[worst], "max_skip_condition_at": worst, "skip_blocks": len(conditions)}
