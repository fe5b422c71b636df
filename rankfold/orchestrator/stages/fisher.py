"""fisher: squared-gradient sums of every projection, a streamed backward over the first `samples`
calibration sequences in float32 (squared gradients in bf16 would lose most of their digits).

One pass serves FLRA's allocation, CAP's search start and Palu's rank search: its digest carries FLRA's
VERSION whichever of them planned it, so they share it.

params: model {id}, sample (CalibrationSample), samples, batch_size."""

from __future__ import annotations

import torch

from rankfold.allocators.registry import ALLOCATORS
from rankfold.data.text import CalibrationSample
from rankfold.execution.streaming import stream_fisher
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import FisherSums
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.shard import ShardConfig

FISHER_DTYPE = "float32"


def fisher(env: Env, stage: Stage) -> tuple[dict, Artifacts]:
    params, artifacts = stage.params, {}
    ids = params["sample"].ids(env.source.tokenizer())[:params["samples"]]

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        key = FisherSums.key_of(stage, i)
        artifacts[key] = env.store.put_tensors(key, tensors)

    config = ShardConfig(env.source.location, FISHER_DTYPE, env.max_resident_mb << 20, str(env.scratch),
                         FISHER_DTYPE)
    result = stream_fisher(env.executor, config, ids, params["batch_size"], env.source.num_layers, save)
    return result, artifacts


def fisher_params(model: dict, sample: CalibrationSample, samples: int, batch_size: int) -> dict:
    """Float32 whatever model.dtype: the model's dtype is not a param."""
    return {"model": {"id": model["id"]}, "sample": sample, "samples": samples, "batch_size": batch_size}


def plan(context: PlanContext) -> tuple[dict, dict]:
    """The pass the allocation asks for, with its own fisher_samples and fisher_batch_size."""
    allocation = context.spec.target.allocation
    return fisher_params(context.model, context.sample, allocation.fisher_samples, allocation.fisher_batch_size), {}


register_stage(StageKind("fisher", fisher, "1", FisherSums, producer=lambda params: ALLOCATORS.get("flra").version,
                         plan=plan))
