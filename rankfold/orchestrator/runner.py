"""The one runner of every plan (a compression job's and `rankfold eval`'s): each stage in order is
reused when the manifest holds a verified record of its digest, run otherwise with exactly the outputs
of the stages it declared; then its record is written."""

from __future__ import annotations

import logging

from rankfold.orchestrator.graph import Plan
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.stages import STAGE_KINDS, Env
from rankfold.orchestrator.stages.outputs import Output

log = logging.getLogger(__name__)


def run_plan(plan: Plan, env: Env, manifest: Manifest, meter: StageMeter) -> tuple[dict[str, Output], list[str]]:
    """(every stage's output by name, the names of the reused stages). A record is reused only if made
    from its input stages' records as they are now (Manifest: `inputs`)."""
    outputs: dict[str, Output] = {}
    reused, fingerprints = [], {}
    for stage in plan.stages:
        kind = STAGE_KINDS.get(stage.kind)
        read = {source: fingerprints[source] for source in sorted(set(stage.inputs.values()))}
        record = manifest.completed(stage.name, stage.digest)
        if record is not None and not record.made_from(read):
            log.info("%s: run again, an input stage changed since its record", stage.name)
            record = None
        if record is not None and kind.reusable(env, stage, record):
            reused.append(stage.name)
            log.info("%s: reusing verified artifacts (%s)", stage.name, stage.digest)
        else:
            inputs = {role: outputs[source] for role, source in stage.inputs.items()}
            with meter.stage(stage.name, env.executor.take_worker_peak_mb):
                result, artifacts = kind.run(env, stage, **inputs)
            record = manifest.record(stage.name, stage.digest, artifacts, result, read)
        fingerprints[stage.name] = record.fingerprint()
        outputs[stage.name] = kind.output(stage, record, env.store)
    return outputs, reused


def evaluation_rows(plan: Plan, outputs: dict[str, Output]) -> list[dict]:
    """Every evaluate stage's rows, labelled with the evaluator, the entry's name and the variant."""
    return [{**stage.labels, **row} for stage in plan.stages if stage.kind == "evaluate"
            for row in outputs[stage.name].rows]
