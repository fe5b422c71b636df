"""assemble: the compressed checkpoint into the store (tasks write its layer shards and the globals one) and placed in
the job's output folder (Env.checkpoint).

params: model {id, dtype}, source (spec model.source, recorded in config.json), method, target,
kv_cache (a KV method's options or None). inputs: factors, ranks, and the KV method's kv_factors +
kv_ranks for a compressed KV cache."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig

from rankfold.checkpoint import (
    INDEX_NAME,
    RANK_GAINS,
    CheckpointError,
    ShardInfo,
    read_index,
    verify_checkpoint,
    write_index,
)
from rankfold.core.hashing import sha256_file
from rankfold.evaluation.report import RATIO_DEFINITION
from rankfold.execution.base import Executor
from rankfold.methods.kv_registry import KV_METHODS
from rankfold.models.sources import ModelSource, ModelSourceError, SafetensorsSource
from rankfold.orchestrator.manifest import StageRecord
from rankfold.orchestrator.model_layout import ModelLayout
from rankfold.orchestrator.stages.decompose import layer_groups
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Checkpoint, Factors, KVFactors, KVRanks, Ranks
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.store import ArtifactStore
from rankfold.workers.tasks import AssembleItem, GlobalsItem, assemble_globals, assemble_item, global_keys


def assemble(env: Env, stage: Stage, *, factors: Factors, ranks: Ranks, kv_factors: KVFactors | None = None,
             kv_ranks: KVRanks | None = None) -> tuple[dict, Artifacts]:
    params = stage.params
    layout = compressed_layout(env, params, ranks, kv_ranks)
    factor_keys = {i: [] for i in range(env.source.num_layers)}
    for i, group in layer_groups(env, layout):
        factor_keys[i].append(factors.key(i, group))
    meta = {"method": params["method"].model_dump(mode="json"), "target": params["target"].model_dump(mode="json"),
            "source": params["source"], "digest": stage.digest}
    extras = {RANK_GAINS: ranks.gains} if ranks.gains else {}
    kv_keys = {i: kv_factors.key(i) for i in layout.kv} if kv_factors is not None else {}
    if kv_ranks is not None:
        meta["kv_cache"] = {**params["kv_cache"].model_dump(mode="json"), **kv_ranks.summary}
    artifacts = assemble_checkpoint(env.source, layout, params["model"]["dtype"], env.store, env.executor,
                                    factor_keys, stage.prefix(Checkpoint.folder_name), env.checkpoint, meta, extras,
                                    kv_keys, params["kv_cache"].name if kv_ranks is not None else None)
    return {}, artifacts  # where it is placed is the job's (Env.checkpoint), not part of a shared record


def compressed_layout(env: Env, params: dict, ranks: Ranks, kv_ranks: KVRanks | None) -> ModelLayout:
    """The allocated modules, with each layer's KV cache module (its KV method's layout) when there is one."""
    layout, kv = ranks.layout, params["kv_cache"]
    if kv_ranks is not None:
        layout.kv.update(KV_METHODS.get(kv.name).layout(kv, params["target"].matrices, env.source.config,
                                                        kv_ranks.ranks))
    return layout


def restore_checkpoint(env: Env, stage: Stage, record: StageRecord) -> bool:
    """A finished assembly counts only if the output folder holds its verified checkpoint — placed
    again from the store when the folder is gone or damaged."""
    if checkpoint_is(env.checkpoint, stage.digest):
        return True
    shutil.rmtree(env.checkpoint, ignore_errors=True)
    place_checkpoint(env.store, record.artifacts, env.checkpoint)
    return checkpoint_is(env.checkpoint, stage.digest)


def assemble_checkpoint(source: ModelSource, layout: ModelLayout, dtype: str, store: ArtifactStore,
                        executor: Executor, factor_keys: dict[int, list[str]], prefix: str, folder: Path,
                        meta: dict, extras: dict[str, str] | None = None,
                        kv_keys: dict[int, str] | None = None, kv_method: str | None = None) -> dict[str, str]:
    """Write the checkpoint under `prefix` in the store, then place it in `folder`; `meta` goes into
    config.json's rankfold section; `extras` (file name -> store key) are copied in and checksummed
    by the index without being weights (e.g. rank_gains.safetensors); `kv_keys`: each layer's factors
    of `kv_method` when the KV cache is compressed. Returns its artifacts (key -> sha256)."""
    arch = source.architecture
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)  # whatever was here is not a finished checkpoint now
    items = [AssembleItem(source.location, i, arch.layer_prefix.format(i=i), tuple(layout.layer_json(i)), dtype,
                          store.ref(), tuple(factor_keys[i]), store.ref(), f"{prefix}/layers-{i:05d}.safetensors",
                          (kv_keys or {}).get(i), kv_method)
             for i in range(source.num_layers)]
    shards = executor.map(assemble_item, items, "assemble")
    shards += executor.map(assemble_globals, [GlobalsItem(source.location, dtype, store.ref(),
                                                          f"{prefix}/globals.safetensors")], "assemble globals",
                           memory=[_globals_bytes(source, dtype)])
    artifacts = {f"{prefix}/{shard.name}": shard.sha256 for shard in shards}
    staging = folder / ".staging"  # small files made here, then stored
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    source.tokenizer().save_pretrained(staging)
    for name, key in (extras or {}).items():
        store.fetch(key, staging / name)
        shards.append(ShardInfo(name, sha256_file(staging / name), ()))  # checksummed, not in the weight map
    meta = {**meta, "ratio_definition": RATIO_DEFINITION, "dtype": dtype, "layout": layout.flat(arch),
            "ranks": layout.ranks(arch)}
    write_index(staging, shards, _plain_config(source, dtype), meta)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == INDEX_NAME):  # the index, last
        artifacts[f"{prefix}/{path.name}"] = store.put_file(f"{prefix}/{path.name}", path)
    shutil.rmtree(staging)
    place_checkpoint(store, artifacts, folder)
    return artifacts


def place_checkpoint(store: ArtifactStore, artifacts: dict[str, str], folder: Path) -> None:
    """Copy (local store: hard-link) a stored checkpoint into `folder`, its index last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)
    for key in sorted(artifacts, key=lambda k: k.endswith(INDEX_NAME)):
        store.fetch(key, folder / key.rsplit("/", 1)[-1])
    _write_placed(folder)  # each file was verified as it was fetched


def checkpoint_is(folder: Path, digest: str) -> bool:
    """`folder` holds a verified checkpoint made by the assemble stage with this digest. Files unchanged
    since they were placed or last verified (same size and mtime, PLACED) are not read again."""
    try:
        if _placed(folder) != _tokens(folder):
            verify_checkpoint(folder)
            _write_placed(folder)
        config = SafetensorsSource(folder).config
    except (CheckpointError, ModelSourceError, OSError, ValueError):
        return False
    return getattr(config, "rankfold", {}).get("digest") == digest


PLACED = ".placed.json"  # {file name: "size:mtime_ns"} of a checkpoint folder's files when last verified


def _tokens(folder: Path) -> dict[str, str]:
    """Size and mtime of every file the index names, and of the index itself."""
    names = [INDEX_NAME, *read_index(folder)["metadata"]["sha256"]]
    return {name: f"{(stat := (folder / name).stat()).st_size}:{stat.st_mtime_ns}" for name in names}


def _placed(folder: Path) -> dict[str, str] | None:
    try:
        return json.loads((folder / PLACED).read_text())
    except (OSError, ValueError):
        return None


def _write_placed(folder: Path) -> None:
    try:
        (folder / PLACED).write_text(json.dumps(_tokens(folder), sort_keys=True))
    except OSError:  # a read-only folder: it is verified in full each time instead
        pass


def _globals_bytes(source: ModelSource, dtype: str) -> int:
    """Estimated peak host bytes of `assemble_globals`: its tensors in `dtype` and safetensors' serialised
    copy of them (Llama-3-70B in bf16: 8.4 GB)."""
    return 2 * getattr(torch, dtype).itemsize * sum(math.prod(source.shape(key)) for key in global_keys(source))


def _plain_config(source: ModelSource, dtype: str) -> PretrainedConfig:
    """The source's config as a plain model's: a GGUF's quantizer settings do not apply to the result,
    and a head stored in the file is untied (it is the head the job evaluated, see ModelSource.lm_head)."""
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if source.architecture.lm_head_key in source.keys():
        config.tie_word_embeddings = False
    config.dtype = dtype
    return config


register_stage(StageKind("assemble", assemble, "1", Checkpoint, reusable=restore_checkpoint))
