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
    """One artifact per layer; the result counts the calibration tokens, and names every input group
    that saw fewer tokens than its width (a mixture's rarely chosen experts: their Gram is singular, so
    whitening adds a ridge, or is the identity for an expert no token reached)."""
    cal, artifacts, few = stage.params["calibration"], {}, {}
    samples = stage.params["sample"].ids(env.source.tokenizer())

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        check_statistics(i, tensors, cal.gram_product_dtype)
        few.update(few_tokens(i, tensors))
        key = Statistics.key_of(stage, i)
        artifacts[key] = env.store.put_tensors(key, tensors)

    config = ShardConfig(env.source.location, stage.params["model"]["dtype"], env.max_resident_mb << 20,
                         str(env.scratch), cal.gram_product_dtype)
    stream_shards(env.executor, config, samples, cal.batch_size, "calibrate", env.source.num_layers,
                  on_stats=save).release()
    return {"tokens": samples.numel(), "few_tokens": few}, artifacts


def few_tokens(layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{"layer.group": tokens} of the groups whose token count is below their input width."""
    counts = {name.removesuffix(".count"): int(value[0]) for name, value in tensors.items() if name.endswith(".count")}
    return {f"{layer}.{group}": count for group, count in counts.items()
            if count < tensors[f"{group}.gram"].shape[0]}


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
