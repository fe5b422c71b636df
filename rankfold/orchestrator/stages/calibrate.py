"""calibrate: input statistics (Gram, Σ|x|) of every layer's input groups, streamed over the shards.

params: model {id, dtype}, calibration (CalibrationSpec), sample (CalibrationSample)."""

from __future__ import annotations

import torch

from rankfold.core.errors import NumericalError
from rankfold.execution.streaming import stream_shards
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.shard import ShardConfig


def calibrate(env: Env, stage: Stage) -> tuple[dict, Artifacts]:
    """One artifact per layer; the result counts the calibration tokens."""
    cal, artifacts = stage.params["calibration"], {}
    samples = stage.params["sample"].ids(env.source.tokenizer())

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        check_statistics(i, tensors, cal.gram_product_dtype)
        key = Statistics.key_of(stage, i)
        artifacts[key] = env.store.put_tensors(key, tensors)

    config = ShardConfig(env.source.location, stage.params["model"]["dtype"], env.max_resident_mb << 20,
                         str(env.scratch), cal.gram_product_dtype)
    stream_shards(env.executor, config, samples, cal.batch_size, "calibrate", env.source.num_layers,
                  on_stats=save).release()
    return {"tokens": samples.numel()}, artifacts


def check_statistics(layer: int, tensors: dict[str, torch.Tensor], product_dtype: str) -> None:
    """Σ|x| and the Gram's diagonal bound every entry (|G_ij| ≤ √(G_ii G_jj)): cheap to check."""
    for name, value in tensors.items():
        if name.endswith((".abs_sum", ".gram")):
            checked = value.diagonal() if value.ndim == 2 else value
            if not bool(torch.isfinite(checked).all()):
                raise NumericalError(f"layer {layer}: calibration statistic {name} is not finite (products in "
                                     f"calibration.gram_product_dtype {product_dtype}); try float64 products or "
                                     "model.dtype bfloat16 / float32")


register_stage(StageKind("calibrate", calibrate, "1", Statistics))
