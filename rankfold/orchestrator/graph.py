"""The plan as a graph of typed stages. A stage = a kind (stages/), its params (the spec fields and
values it reads) and its named inputs (earlier stages whose outputs it reads). Its digest is derived
from exactly those — nothing is hand-listed:

    digest = H(kind, kind VERSION, rankfold version, producer VERSION, params, {role: input digest})

so a changed input, setting or code is recomputed and everything else is reused (two jobs that share a
calibration share its statistics). Wiring is checked when the stage is added: an undeclared, missing or
mistyped input is a PlanError, and inputs must already be planned (so the graph has no cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

from rankfold.core.errors import RankfoldError
from rankfold.core.hashing import digest_of
from rankfold.core.version import __version__
from rankfold.orchestrator.stages import STAGE_KINDS
from rankfold.orchestrator.stages.stage import Stage


class PlanError(RankfoldError, ValueError):
    """A stage wired against its kind's declared inputs (a bug in a planner, not in a spec)."""


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


class PlanBuilder:
    """Stages added in an order where every input comes first."""

    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def add(self, name: str, kind: str, params: dict | None = None, inputs: dict[str, str | None] | None = None,
            labels: dict | None = None) -> Stage:
        """Plan a stage; `inputs`: role -> stage name (None: an optional role left unwired)."""
        if name in self._stages:
            raise PlanError(f"stage {name!r} is planned twice")
        stage_kind, params = STAGE_KINDS.get(kind), dict(params or {})
        wired = {role: source for role, source in (inputs or {}).items() if source is not None}
        self._check_wiring(name, stage_kind, wired)
        upstream = {role: self._stages[source].digest for role, source in wired.items()}
        producer = stage_kind.producer(params) if stage_kind.producer else None
        digest = digest_of(kind, stage_kind.version, __version__, producer, params, upstream)
        stage = Stage(name, kind, digest, params, wired, dict(labels or {}))
        self._stages[name] = stage
        return stage

    def _check_wiring(self, name: str, kind, wired: dict[str, str]) -> None:
        for role, source in wired.items():
            declared = kind.roles.get(role)
            expected = declared.type if declared else kind.more
            if expected is None:
                raise PlanError(f"stage {name!r} ({kind.kind}): input {role!r} is not declared by the kind "
                                f"(it declares: {', '.join(kind.roles) or 'none'})")
            if source not in self._stages:
                raise PlanError(f"stage {name!r}: input {role!r} reads {source!r}, which is not planned before it")
            given = STAGE_KINDS.get(self._stages[source].kind).output
            if not issubclass(given, expected):
                raise PlanError(f"stage {name!r}: input {role!r} expects {expected.__name__}, but {source!r} "
                                f"gives {given.__name__}")
        missing = [role for role, declared in kind.roles.items() if not declared.optional and role not in wired]
        if missing:
            raise PlanError(f"stage {name!r} ({kind.kind}): required inputs not wired: {', '.join(missing)}")

    def plan(self) -> Plan:
        return Plan(tuple(self._stages.values()))
