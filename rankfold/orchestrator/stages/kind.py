"""A stage kind: how one kind of stage runs, what it reads and what it gives.

A kind's run function declares its inputs in its signature, after `(env, stage)`: one keyword-only
parameter per input role, annotated with the output type it reads (`statistics: Statistics`;
`Statistics | None = None` when optional), and optionally `**more: LayerArtifacts` for roles the
planner names (an allocator's or a method's own stages). The plan checks every stage's wiring against
that signature, and the runner passes exactly the wired outputs: a stage cannot read what it did not
declare, and everything it declares is in its digest (graph.py).

    def calibrate(env: Env, stage: Stage) -> tuple[dict, Artifacts]: ...
    register_stage(StageKind("calibrate", calibrate, version="1", output=Statistics))
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from rankfold.core.registry import Registry
from rankfold.data.text import CalibrationSample
from rankfold.execution.base import Executor
from rankfold.jobs.spec import JobSpec
from rankfold.models.sources import ModelSource
from rankfold.orchestrator.manifest import StageRecord
from rankfold.orchestrator.model_layout import ModelLayout, Shapes
from rankfold.orchestrator.stages.outputs import Output
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.store import ArtifactStore

Artifacts = dict[str, str]  # key -> sha256


@dataclass(frozen=True)
class Env:
    """What every stage may use besides its declared inputs and params: where it runs and what it runs
    on — never another stage's results. `checkpoint`: where a job places its compressed model
    (output.dir/model); `max_resident_mb`: activations a shard holds before spilling to `scratch`."""

    source: ModelSource
    shapes: Shapes
    store: ArtifactStore
    executor: Executor
    scratch: Path
    checkpoint: Path | None = None
    max_resident_mb: int = 2048


class Planned(Protocol):
    """The plan so far, as a kind's `plan` sees it (graph.PlanBuilder): its stages by name, and `add`."""

    def __contains__(self, name: str) -> bool: ...

    def __getitem__(self, name: str) -> Stage: ...

    def add(self, name: str, kind: str, params: dict, inputs: dict | None = None,
            labels: dict | None = None) -> Stage: ...


@dataclass(frozen=True)
class PlanContext:
    """What a kind's `plan` draws on when an allocator or a KV method asks for it by name: the spec, the
    model's identity {id, dtype}, the calibration sample, the method's structure at the uniform ranks,
    and the plan so far (`builder`: what is planned already; a kind may add a stage it reads, e.g.
    a Fisher pass of its own)."""

    spec: JobSpec
    model: dict
    sample: CalibrationSample
    uniform: ModelLayout
    builder: Planned


@dataclass(frozen=True)
class Role:
    type: type[Output]
    optional: bool


def _always(env: Env, stage: Stage, record: StageRecord) -> bool:
    return True


@dataclass(frozen=True)
class StageKind:
    kind: str
    run: Callable[..., tuple[dict, Artifacts]]  # run(env, stage, **inputs) -> (small result, artifacts)
    version: str                                # bump when a change could change its output
    output: type[Output]                        # what stages that read it receive
    # The VERSION of the method, allocator or evaluator whose code computes it, from its params.
    producer: Callable[[dict], str] | None = None
    # reusable(env, stage, record): a verified record may still need its outputs placed (a checkpoint)
    reusable: Callable[[Env, Stage, StageRecord], bool] = _always
    # plan(context) -> (params, inputs {role: stage name}): for kinds an allocator or a KV method asks
    # for by name
    plan: Callable[[PlanContext], tuple[dict, dict]] | None = None
    roles: dict[str, Role] = field(init=False)
    more: type[Output] | None = field(init=False)  # the type of **roles, if it takes any

    def __post_init__(self) -> None:
        roles, more = declared_inputs(self.run)
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "more", more)


def declared_inputs(run: Callable) -> tuple[dict[str, Role], type[Output] | None]:
    """Roles and types from `run(env, stage, *, role: Type | None = None, **more: Type)`; TypeError for a
    signature that declares anything else."""
    parameters = list(inspect.signature(run).parameters.values())
    if len(parameters) < 2 or any(p.kind != p.POSITIONAL_OR_KEYWORD for p in parameters[:2]):
        raise TypeError(f"{run.__qualname__}: a stage's run takes (env, stage, *, inputs...)")
    roles, more = {}, None
    for parameter in parameters[2:]:
        hint = parameter.annotation
        hint = eval(hint, run.__globals__) if isinstance(hint, str) else hint  # noqa: S307 (its own annotation)
        kinds = [t for t in typing.get_args(hint) if t is not type(None)] if _is_union(hint) else [hint]
        if len(kinds) != 1 or not (isinstance(kinds[0], type) and issubclass(kinds[0], Output)):
            raise TypeError(f"{run.__qualname__}: input {parameter.name!r} must be annotated with one Output type")
        if parameter.kind == parameter.VAR_KEYWORD:
            more = kinds[0]
        elif parameter.kind == parameter.KEYWORD_ONLY:
            optional = _is_union(hint) and type(None) in typing.get_args(hint)
            if optional and parameter.default is not None:
                raise TypeError(f"{run.__qualname__}: optional input {parameter.name!r} must default to None")
            roles[parameter.name] = Role(kinds[0], optional)
        else:
            raise TypeError(f"{run.__qualname__}: input {parameter.name!r} must be keyword-only (after *)")
    return roles, more


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


STAGE_KINDS: Registry[StageKind] = Registry("stage kind")


def register_stage(kind: StageKind) -> StageKind:
    return STAGE_KINDS.register(kind.kind, kind)
