"""Preflight: everything decidable from the spec, the files' headers and the shapes is checked before
anything is written or computed; then the output folder is claimed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from rankfold.allocators.registry import ALLOCATORS, AllocationProblem
from rankfold.checkpoint import RANK_GAINS, compressed_layout, is_compressed, meta_model
from rankfold.core.hashing import digest_of
from rankfold.data.text import DataError
from rankfold.evaluation.registry import EVALUATORS, DecodeFacts, ModelFacts
from rankfold.jobs.spec import EvalSpec, JobSpec, SpecError
from rankfold.methods.kv_registry import KV_METHODS
from rankfold.methods.plrd import decode_units
from rankfold.methods.registry import method_of
from rankfold.models.sources import ModelSource, open_supported
from rankfold.modules.layout import CompressedModule
from rankfold.modules.shared import SKIP_TRUNCATION
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.model_layout import Shapes, matrix_shapes, plan_layout
from rankfold.orchestrator.plan import needs_calibration
from rankfold.storage.store import ArtifactStore

JOB_FILE = "job.json"
CHECKPOINT_FOLDER = "model"  # output.dir/model: where a job places its compressed checkpoint


def preflight(spec: JobSpec) -> tuple[ModelSource, Shapes]:
    """Open the model, check every input file, the allocation's feasibility and every evaluation's
    data; a SpecError names the field and value at fault. Returns the source and the matrix shapes."""
    try:
        source = open_supported(spec.model.source)
    except ValueError as err:
        raise SpecError(f"model.source = {spec.model.source!r}: {err}") from None
    arch = source.architecture
    for field, text_source in _text_sources(spec):
        if text_source.path is not None and not Path(text_source.path).is_file():
            raise SpecError(f"{field}.path = {str(text_source.path)!r}: file not found")
    try:
        arch.matrix_paths(spec.target.matrices)
    except KeyError as err:
        raise SpecError(f"target.matrices: {err.args[0]}") from None
    shapes = matrix_shapes(source, spec.target.matrices)
    _check_allocation(spec, source, shapes)
    if spec.kv_cache is not None:
        _check_kv_cache(spec, source.config)
    if spec.fitting is not None and arch.experts:
        raise SpecError("fitting.kind anchored: a mixture's experts see different tokens in the dense and the "
                        "compressed streams (the router's choices differ), so their cross statistics are "
                        "undefined; fit this model without `fitting`")
    if needs_calibration(spec) or spec.fitting is not None:
        _check_calibration(spec, source)
    check_evaluations(spec, source, lambda: planned_decode(spec, source, shapes))
    return source, shapes


def _check_kv_cache(spec: JobSpec, config) -> None:
    """The KV method's own check against the model (e.g. Palu: head groups divide the KV heads)."""
    try:
        KV_METHODS.get(spec.kv_cache.name).check(spec.kv_cache, config)
    except ValueError as err:
        raise SpecError(f"kv_cache.{err}") from None

def _check_calibration(spec: JobSpec, source: ModelSource) -> None:
    """The calibration text holds `num_samples` distinct windows of `seq_len` tokens."""
    try:
        spec.calibration.sample().ids(source.tokenizer())
    except DataError as err:
        raise SpecError(f"calibration.data ({spec.calibration.data.describe()}): {err}") from None


def _text_sources(spec: JobSpec) -> list[tuple[str, object]]:
    sources = [("calibration.data", spec.calibration.data)]
    for evaluator in EVALUATORS:
        for k, options in enumerate(getattr(spec.evaluation, evaluator.name)):
            sources += [(f"evaluation.{evaluator.name}[{k}].data", data) for data in evaluator.inputs(options)]
    return sources


def _check_allocation(spec: JobSpec, source: ModelSource, shapes: Shapes) -> None:
    allocation = spec.target.allocation
    layout = plan_layout(spec.method, spec.target.ratio, source.architecture, shapes, experts=spec.target.experts).by_layer
    problem = AllocationProblem(method_of(spec.method), layout, shapes, spec.target.ratio,
                                source.architecture.layer_prefix)
    try:
        ALLOCATORS.get(allocation.kind).check(allocation, problem)
    except ValueError as err:
        raise SpecError(str(err)) from None


def check_evaluations(spec: JobSpec | EvalSpec, source: ModelSource,
                      decode: Callable[[], DecodeFacts | None] | None = None) -> None:
    """Every evaluation entry's own check against what is known of the model before it loads (its
    tokenizer, context and, compressed, its decode units: `decode`, default the source's recorded
    layout); a SpecError names the entry."""
    method = getattr(spec, "method", None)  # an evaluation spec has none: its layout is checked at evaluation
    if method is not None and method_of(method).structure.skip:
        for k, options in enumerate(spec.evaluation.generation):
            if options.progressive is not None:
                raise SpecError(f"evaluation.generation[{k}].progressive with method.name {method.name!r}: "
                                f"{SKIP_TRUNCATION}")
    facts = ModelFacts(source.tokenizer(), getattr(source.config, "max_position_embeddings", None),
                       decode or (lambda: recorded_decode(source)))
    for evaluator in EVALUATORS:
        for k, options in enumerate(getattr(spec.evaluation, evaluator.name)):
            try:
                evaluator.check(options, facts)
            except (ValueError, DataError) as err:
                raise SpecError(f"evaluation.{evaluator.name}[{k}] ({options.name}): {err}") from None


def recorded_decode(source: ModelSource) -> DecodeFacts | None:
    """Decode facts of a checkpoint from its config's layout (None: dense) and its side files."""
    if not is_compressed(source.config):
        return None
    model = meta_model(source.config, compressed_layout(source.config))
    return DecodeFacts(decode_units(model), gains=source.side_file(RANK_GAINS) is not None)


def planned_decode(spec: JobSpec, source: ModelSource, shapes: Shapes) -> DecodeFacts:
    """Decode facts of the model this job will write: its layout at the uniform rule's ranks. An allocator
    moves ranks but not the budget, so costs hold to within one direction per unit; with a sparse part
    (ranks traded for entries) nothing about costs is decided before allocation."""
    arch, allocation = source.architecture, spec.target.allocation
    layout = plan_layout(spec.method, spec.target.ratio, arch, shapes, experts=spec.target.experts)
    modules = [CompressedModule.from_json(entry) for entry in layout.flat(arch)]
    units = decode_units(meta_model(source.config, modules))
    allocator, names = ALLOCATORS.get(allocation.kind), {unit.name for unit in units}
    if allocation.kind == "uniform":
        slack = 0.0
    elif any((module.shared_path or module.members[0]) not in names for module in modules):
        slack = math.inf  # a module PLRD does not set (e.g. low rank + sparse): the allocation decides its share
    else:
        slack = float(sum(unit.cost_per_rank for unit in units))
    return DecodeFacts(units, gains=allocator.gains is not None, slack=slack)


def prepare_output(spec: JobSpec, store: ArtifactStore) -> Path:
    """Create output.dir, refusing one that holds a different job with completed stages (its files
    stay untouched). A folder whose job completed nothing accepts the corrected spec; one whose job
    compressed the same way accepts any evaluation entries (they add stages, `job_id`)."""
    out = Path(spec.output.dir)
    job_file = out / JOB_FILE
    if job_file.is_file():
        previous = job_file.read_text()
        if not _same_job(previous, spec) and _has_results(store, previous):
            raise SpecError(f"output.dir = {str(out)!r}: holds another job's results (see {job_file}); "
                            "choose a new folder or delete it")
    elif out.exists() and any(out.iterdir()):
        raise SpecError(f"output.dir = {str(out)!r}: exists and is not empty; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"output.dir = {str(out)!r}: cannot create ({err.strerror})") from None
    job_file.write_text(spec.canonical_json())
    return out


def _has_results(store: ArtifactStore, previous: str) -> bool:
    """The job recorded in `previous` (a job.json) completed stages (under its id, or the id an older
    rankfold gave it: the digest of the whole spec)."""
    ids = {digest_of(previous)}
    try:
        ids.add(_identity(json.loads(previous)))
    except (json.JSONDecodeError, TypeError):
        pass
    return any(Manifest(store, job).stages for job in ids)


def _same_job(previous: str, spec: JobSpec) -> bool:
    """`previous` (a job.json) describes this job's compression — also when written by an older rankfold
    whose spec lacked an optional field since added (its JSON then differs only by that field's
    default), and whatever its evaluation entries were."""
    if previous == spec.canonical_json():
        return True
    try:
        return job_id(type(spec).model_validate_json(previous)) == job_id(spec)
    except (ValidationError, ValueError):
        return False


def job_id(spec: JobSpec | EvalSpec) -> str:
    """The job's identity: the digest of what its compression depends on (the canonical spec less its
    `evaluation` entries, which only add stages). An evaluation run (EvalSpec) is its evaluations."""
    data = json.loads(spec.canonical_json())
    return _identity(data) if isinstance(spec, JobSpec) else digest_of(spec.canonical_json())


def _identity(data: dict) -> str:
    data.pop("evaluation", None)
    return digest_of(json.dumps(data, sort_keys=True, separators=(",", ":")))
