"""The compressed checkpoint of a job: written into the artifact store (a shard per layer, by the
workers; globals, tokenizer, config; the index last) and placed in output.dir/model."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig

from rankfold.checkpoint import INDEX_NAME, CheckpointError, ShardInfo, verify_checkpoint, write_index, write_shard
from rankfold.core.hashing import sha256_file
from rankfold.evaluation.report import RATIO_DEFINITION
from rankfold.execution.base import Executor
from rankfold.models.sources import ModelSource, ModelSourceError, SafetensorsSource
from rankfold.orchestrator.layout import ModelLayout
from rankfold.storage.store import ArtifactStore
from rankfold.workers.tasks import AssembleItem, assemble_item


def assemble_checkpoint(source: ModelSource, layout: ModelLayout, dtype: str, store: ArtifactStore,
                        executor: Executor, factor_keys: dict[int, list[str]], prefix: str, folder: Path,
                        meta: dict, extras: dict[str, str] | None = None,
                        kv_keys: dict[int, str] | None = None) -> dict[str, str]:
    """Write the checkpoint under `prefix` in the store, then place it in `folder`; `meta` goes into
    config.json's rankfold section; `extras` (file name -> store key) are copied in and checksummed
    by the index without being weights (e.g. rank_gains.safetensors); `kv_keys`: each layer's Palu
    factors when the cache is latent. Returns its artifacts (key -> sha256)."""
    arch = source.architecture
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)  # whatever was here is not a finished checkpoint now
    items = [AssembleItem(source.location, i, arch.layer_prefix.format(i=i), tuple(layout.layer_json(i)), dtype,
                          store.ref(), tuple(factor_keys[i]), store.ref(), f"{prefix}/layers-{i:05d}.safetensors",
                          (kv_keys or {}).get(i))
             for i in range(source.num_layers)]
    shards = executor.map(assemble_item, items, "assemble")
    artifacts = {f"{prefix}/{shard.name}": shard.sha256 for shard in shards}
    staging = folder / ".staging"  # small files made here, then stored
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shards.append(write_shard(staging, "globals.safetensors", _global_tensors(source, getattr(torch, dtype))))
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


def checkpoint_is(folder: Path, digest: str) -> bool:
    """`folder` holds a verified checkpoint made by the assemble stage with this digest."""
    try:
        verify_checkpoint(folder)
        config = SafetensorsSource(folder).config
    except (CheckpointError, ModelSourceError, OSError, ValueError):
        return False
    return getattr(config, "rankfold", {}).get("digest") == digest


def _global_tensors(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    arch = source.architecture
    tensors = {arch.embedding_key: source.embedding().to(dtype), arch.final_norm_key: source.final_norm().to(dtype)}
    if arch.lm_head_key in source.keys():
        tensors[arch.lm_head_key] = source.lm_head().to(dtype)
    return tensors


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
