"""The plan: spec + the method's and allocator's declared needs + the model's shapes -> the ordered
stages of a job, each with the digest of everything its output depends on.

    [calibrate] -> [the allocator's stages, e.g. fisher, spectra] -> allocate -> decompose -> assemble
      -> evaluate (one stage per evaluation entry and variant: dense, compressed)

calibrate runs when the method needs statistics or the allocator has stages (svd needs neither).

A digest hashes the stage kind and its VERSION, rankfold's version, the producing method's or
allocator's or evaluator's VERSION, the spec fields the stage reads, the content of its input data
and the digests of the stages it consumes. So a changed input or changed code is recomputed, and
everything else is reused (two jobs that share a calibration share its statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankfold.allocators.registry import ALLOCATORS
from rankfold.core.hashing import digest_of
from rankfold.core.version import __version__
from rankfold.data.text import text_fingerprint
from rankfold.evaluation.registry import EVALUATORS
from rankfold.jobs.spec import JobSpec
from rankfold.methods.palu import VERSION as PALU_VERSION
from rankfold.methods.registry import method_of
from rankfold.orchestrator.stages import STAGES, PlanInputs


@dataclass(frozen=True)
class Stage:
    name: str                   # unique in the job, e.g. "decompose", "evaluate compressed wikitext2"
    kind: str                   # key in STAGES (how it runs)
    digest: str
    params: dict = field(default_factory=dict)  # kind-specific: the evaluation entry, the variant, ...

    def prefix(self, folder: str) -> str:
        """Where its artifacts live in the store, e.g. 'stats/<digest>'."""
        return f"{folder}/{self.digest}"


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"the plan has no stage {name!r}")

    def __contains__(self, name: str) -> bool:
        return any(stage.name == name for stage in self.stages)

    def digests(self) -> dict[str, str]:
        return {stage.name: stage.digest for stage in self.stages}


def _digest(kind: str, *parts: object) -> str:
    return digest_of(kind, STAGES.get(kind).version, __version__, *parts)


def make_plan(spec: JobSpec, model_id: str, uniform_layout: list[dict]) -> Plan:
    """The job's stages in order. `model_id`: the source's content fingerprint; `uniform_layout`: the
    method's structure over every layer with the uniform ranks (JSON), which allocators start from."""
    model = (model_id, spec.model.dtype)
    method, allocation = method_of(spec.method), spec.target.allocation
    allocator = ALLOCATORS.get(allocation.kind)
    cal = spec.calibration
    calibration = (cal.model_dump(mode="json", exclude={"max_resident_mb"}), text_fingerprint(cal.data))
    stages = []
    if needs_calibration(spec):
        stages.append(Stage("calibrate", "calibrate", _digest("calibrate", model, calibration)))
    structure = [{k: v for k, v in module.items() if k != "rank"} for module in uniform_layout]
    sample = (calibration[1], cal.num_samples, cal.seq_len, cal.seed)
    for kind in allocator.stages_for(allocation):  # e.g. FLRA's fisher and spectra, in the allocator's order
        declared, owner = STAGES.get(kind).inputs, STAGES.get(kind).shared_by
        if declared is None:
            raise ValueError(f"allocator {allocator.kind!r} asks for stage {kind!r}, which declares no inputs")
        inputs = PlanInputs(spec, model_id, sample, structure, {s.name: s.digest for s in stages})
        version = ALLOCATORS.get(owner).version if owner else allocator.version
        stages.append(Stage(kind, kind, _digest(kind, *declared(inputs), version)))
    allocate = _digest("allocate", model, [s.digest for s in stages if s.kind in allocator.stages_for(allocation)],
                       uniform_layout,
                       spec.target.model_dump(mode="json"), allocator.version)
    upstream = {s.name: s.digest for s in stages}
    stages.append(Stage("allocate", "allocate", allocate))
    decompose = _digest("decompose", model, upstream.get("calibrate"), allocate, spec.method.model_dump(mode="json"),
                        method.version)
    stages.append(Stage("decompose", "decompose", decompose))
    kv = _kv_stages(spec, model, stages, sample, structure) if spec.kv_cache is not None else []
    stages += kv
    assemble = _digest("assemble", model, decompose, *([kv[-1].digest, _kv_cache_settings(spec)] if kv else []))
    stages.append(Stage("assemble", "assemble", assemble))
    return Plan(tuple(stages + _evaluations(spec, model, stages[-1].digest)))


def _kv_stages(spec: JobSpec, model: tuple, stages: list[Stage], sample: tuple, structure: list) -> list[Stage]:
    """Palu: [fisher, unless planned already] -> kv_factors (per layer) -> kv_allocate (the rank search)."""
    kv, planned = spec.kv_cache, {s.name: s.digest for s in stages}
    out = []
    if kv.rank_search == "fisher" and "fisher" not in planned:
        inputs = PlanInputs(spec, model[0], sample, structure, planned)
        # The same pass FLRA's allocator plans (same digest for the same settings): one serves both.
        owner = ALLOCATORS.get(STAGES.get("fisher").shared_by).version
        out.append(Stage("fisher", "fisher", _digest("fisher", *STAGES.get("fisher").inputs(inputs), owner)))
    factors = _digest("kv_factors", model, planned["calibrate"], kv.group_heads, PALU_VERSION)
    out.append(Stage("kv_factors", "kv_factors", factors))
    fisher = ([s.digest for s in out if s.name == "fisher"] or [planned.get("fisher")])[0] \
        if kv.rank_search == "fisher" else None
    search = kv.model_dump(mode="json", include={"ratio", "group_heads", "rank_search", "rank_multiple"})
    out.append(Stage("kv_allocate", "kv_allocate", _digest("kv_allocate", factors, fisher, search, PALU_VERSION)))
    return out


def _kv_cache_settings(spec: JobSpec) -> dict:
    """What the assembled checkpoint takes from the kv_cache part beyond the ranks."""
    return spec.kv_cache.model_dump(mode="json", include={"bits", "quant_group", "residual", "hadamard"})


def needs_calibration(spec: JobSpec) -> bool:
    """Calibration statistics are collected when the method, the allocator's stages or a latent KV
    cache (its whitening) read them."""
    allocation = spec.target.allocation
    return bool(method_of(spec.method).needs or ALLOCATORS.get(allocation.kind).stages_for(allocation)
                or spec.kv_cache is not None)


def evaluation_digest(model: object, evaluator_name: str, options) -> str:
    """Identity of one evaluation entry's result on one model (`model`: its content identity): the
    evaluator's VERSION, its settings (not its label) and its data files' content."""
    evaluator = EVALUATORS.get(evaluator_name)
    data = [text_fingerprint(source) for source in evaluator.inputs(options)]
    # An optional field left unset (None) stays out: adding one (e.g. generation's `progressive`) keeps
    # every stored result of the entries that do not use it.
    settings = {k: v for k, v in options.model_dump(mode="json", exclude={"name"}).items() if v is not None}
    return _digest("evaluate", model, evaluator.name, evaluator.version, settings, data)


def _evaluations(spec: JobSpec, model: tuple, checkpoint: str) -> list[Stage]:
    stages, seen = [], set()
    variants = ([("dense", model)] if spec.evaluation.dense else []) + [("compressed", checkpoint)]
    for evaluator in EVALUATORS:
        for k, options in enumerate(getattr(spec.evaluation, evaluator.name)):
            for variant, base in variants:
                name = f"evaluate {variant} {options.name}" if evaluator.name == "perplexity" else \
                    f"evaluate {evaluator.name} {variant} {options.name}"
                name += f" #{k}" if name in seen else ""
                seen.add(name)
                digest = evaluation_digest(base, evaluator.name, options)
                stages.append(Stage(name, "evaluate", digest, {"evaluator": evaluator.name, "entry": k,
                                                               "variant": variant}))
    return stages
