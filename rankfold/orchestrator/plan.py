"""A job's plan: the spec, the method's and allocator's declared needs and the model's shapes -> a
graph of typed stages (graph.py derives every digest from the stages' params and inputs).

    calibrate -> [the allocator's stages, e.g. fisher, spectra] -> allocate -> decompose (or, with
      `fitting`, the anchored walk) -> [the KV method's stages, e.g. kv_factors -> kv_allocate] -> assemble -> evaluate (one per entry
      and variant)

calibrate runs when the method, the allocator's stages or a KV method read statistics. A stage an
allocator or a KV method asks for by kind plans itself (StageKind.plan); the rest are wired here.
`rankfold eval` plans evaluate stages only (eval_plan), named as a job's are.
"""

from __future__ import annotations

from rankfold.allocators.registry import ALLOCATORS
from rankfold.data.text import text_fingerprint
from rankfold.evaluation.registry import EVALUATORS
from rankfold.jobs.spec import EvalSpec, JobSpec
from rankfold.methods.kv_registry import KV_METHODS
from rankfold.methods.registry import method_of
from rankfold.orchestrator.graph import Plan, PlanBuilder, PlanError
from rankfold.orchestrator.model_layout import ModelLayout
from rankfold.orchestrator.stages import STAGE_KINDS
from rankfold.orchestrator.stages.kind import PlanContext


def make_plan(spec: JobSpec, model_id: str, uniform: ModelLayout) -> Plan:
    """The job's stages. `model_id`: the source's content fingerprint; `uniform`: the method's structure
    over every layer with the uniform ranks, which allocators start from."""
    model, cal = {"id": model_id, "dtype": spec.model.dtype}, spec.calibration
    sample = cal.sample()
    builder = PlanBuilder()
    if needs_calibration(spec):
        builder.add("calibrate", "calibrate", {"model": model, "calibration": cal, "sample": sample})
    allocation = spec.target.allocation
    wanted = ALLOCATORS.get(allocation.kind).stages_for(allocation)
    context = PlanContext(spec, model, sample, uniform, builder)
    for kind in wanted:  # e.g. FLRA's fisher and spectra, in the allocator's order
        _add_by_kind(builder, kind, context)
    builder.add("allocate", "allocate", {"model": model, "method": spec.method, "target": spec.target,
                                         "layout": uniform.to_json()},
                {kind: kind for kind in wanted})
    factors = _add_factors(builder, spec, model, sample)
    kv = _kv_stages(builder, context) if spec.kv_cache is not None else {}
    builder.add("assemble", "assemble", {"model": model, "source": spec.model.source, "method": spec.method,
                                         "target": spec.target, "kv_cache": spec.kv_cache},
                {"factors": factors, "ranks": "allocate", **kv})
    variants = ("dense", "compressed") if spec.evaluation.dense else ("compressed",)
    for evaluation in _entries(spec.evaluation, variants):
        _add_evaluation(builder, model, *evaluation, checkpoint="assemble")
    return builder.plan()


def _add_factors(builder: PlanBuilder, spec: JobSpec, model: dict, sample) -> str:
    """The stage that fits the factors: decompose (each layer on its own dense inputs), or with
    `fitting` the anchored walk; returns its name."""
    if spec.fitting is not None:
        builder.add("anchored", "anchored", {"model": model, "method": spec.method, "calibration": spec.calibration,
                                             "sample": sample, "fitting": spec.fitting}, {"ranks": "allocate"})
        return "anchored"
    reads = {kind: kind for kind in method_of(spec.method).reads}
    builder.add("decompose", "decompose", {"model": model, "method": spec.method},
                {"ranks": "allocate", "statistics": _if("calibrate", builder), **reads})
    return "decompose"


def _add_by_kind(builder: PlanBuilder, kind: str, context: PlanContext) -> None:
    planner = STAGE_KINDS.get(kind).plan
    if planner is None:
        raise PlanError(f"stage kind {kind!r} is asked for by name but does not plan itself (StageKind.plan)")
    builder.add(kind, kind, *planner(context))


def _kv_stages(builder: PlanBuilder, context: PlanContext) -> dict[str, str]:
    """The KV method's stages, each planning itself; returns the assemble stage's inputs among them."""
    method = KV_METHODS.get(context.spec.kv_cache.name)
    for kind in method.stages:
        _add_by_kind(builder, kind, context)
    return dict(method.assemble_inputs)


def _if(name: str, builder: PlanBuilder) -> str | None:
    return name if name in builder else None


def needs_calibration(spec: JobSpec) -> bool:
    """Calibration statistics are collected when the method (unless the anchored walk collects its
    own), the allocator's stages or a KV method (Palu's whitening) read them."""
    allocation = spec.target.allocation
    return bool((method_of(spec.method).needs and spec.fitting is None) or ALLOCATORS.get(allocation.kind).stages_for(allocation)
                or spec.kv_cache is not None)


def eval_plan(spec: EvalSpec, model_id: str, variant: str) -> Plan:
    """`rankfold eval`: one evaluate stage per entry on the spec's model (`variant`: dense or compressed,
    for the stage names and the report's rows)."""
    builder = PlanBuilder()
    for evaluation in _entries(spec.evaluation, (variant,)):
        _add_evaluation(builder, {"id": model_id, "dtype": spec.model.dtype}, *evaluation, checkpoint=None)
    return builder.plan()


def _entries(evaluation, variants: tuple[str, ...]):
    """(evaluator, options, variant) of every entry, evaluator by evaluator, each entry's variants together."""
    for evaluator in EVALUATORS:
        for options in getattr(evaluation, evaluator.name):
            for variant in variants:
                yield evaluator.name, options, variant


def _add_evaluation(builder: PlanBuilder, model: dict, evaluator: str, options, variant: str,
                    checkpoint: str | None) -> None:
    """One entry on one variant; its data files' content and its settings (not its name) are hashed."""
    data = [text_fingerprint(source) for source in EVALUATORS.get(evaluator).inputs(options)]
    params = {"evaluator": evaluator, "options": options, "data": data, "dtype": model["dtype"]}
    if variant == "dense" or checkpoint is None:
        params["model"] = {"id": model["id"]}
    name = f"evaluate {evaluator} {variant} {options.name}"
    builder.add(name, "evaluate", params, {"checkpoint": checkpoint if variant == "compressed" else None},
                {"evaluator": evaluator, "name": options.name, "variant": variant})
