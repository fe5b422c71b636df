"""Stage kinds, one file each: a run function whose signature declares its typed inputs, registered
with `register_stage` (kind.py). Importing this package registers every kind in it."""

from rankfold.core.registry import import_all
from rankfold.orchestrator.stages.kind import STAGE_KINDS, Artifacts, Env, StageKind, register_stage

import_all(__name__, __path__)

__all__ = ["STAGE_KINDS", "Artifacts", "Env", "StageKind", "register_stage"]
