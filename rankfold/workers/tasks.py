"""Stage work items as plain data, and the functions that run them — in this process or on a worker.

An item names what it needs (model location, store refs, artifact keys) instead of holding it, so
it pickles small and any process can run it; each process opens sources and stores once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rankfold.allocators.flra import group_spectra
from rankfold.checkpoint import ShardInfo
from rankfold.core.device import to_host, worker_device
from rankfold.methods.group_decomposition import decompose_group
from rankfold.methods.kv_registry import KV_METHODS
from rankfold.methods.registry import MethodOptions
from rankfold.methods.statistics import InputStats
from rankfold.models.sources import ModelSource
from rankfold.modules.layout import CompressedModule
from rankfold.storage.store import StoreError, StoreRef, open_ref
from rankfold.workers.layer_state import assemble_layer_state
from rankfold.workers.layer_statistics import read_group_stats
from rankfold.workers.shard import cached_source


def _modules_and_weights(location: str, layer_prefix: str, modules_json: tuple[dict, ...],
                         ) -> tuple[list[CompressedModule], dict[str, torch.Tensor]]:
    """An item's compressed modules and the dense weight of each member (keyed by path in the layer)."""
    source, device = cached_source(location), worker_device()
    modules = [CompressedModule.from_json(m) for m in modules_json]
    return modules, {m: source.matrix(f"{layer_prefix}{m}.weight").to(device)
                     for module in modules for m in module.members}


def on_device(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors read from the store, on this worker's device (core/device.py)."""
    device = worker_device()
    return {key: value.to(device) for key, value in tensors.items()}


@dataclass(frozen=True)
class DecomposeItem:
    source: str
    method: MethodOptions
    layer_prefix: str          # e.g. "model.layers.3."
    group: str
    modules: tuple[dict, ...]  # CompressedModule JSON, paths inside the layer
    stats: StoreRef
    stats_key: str | None      # None: the method needs no calibration statistics
    factors: StoreRef
    factors_key: str
    reads: tuple[tuple[str, str, str], ...] = ()  # (stage kind, member path, key) of artifacts the method reads


def _group_stats(item: DecomposeItem) -> InputStats | None:
    if item.stats_key is None:
        return None
    return read_group_stats(item.stats, item.stats_key, item.group).to(worker_device())


def decompose_item(item: DecomposeItem) -> tuple[dict[str, dict[str, float]], str, str]:
    """Factors of one (layer, input group) into the store; skipped when they already exist and verify.
    Returns (diagnostics {quantity: {full module path: value}}, artifact key, sha256)."""
    factor_store = open_ref(item.factors)
    sha, diagnostics = factor_store.checksum(item.factors_key), None
    if sha is not None:
        try:  # reading the metadata verifies the artifact: one pass over its bytes
            diagnostics = json.loads(factor_store.get_metadata(item.factors_key).get("diagnostics", "{}"))
        except StoreError:  # damaged: recompute it
            diagnostics = None
    if diagnostics is None:
        modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
        # Passed without a name here, so the Gram can be freed once it is factorised (see GroupInputs).
        keys = {(kind, member): key for kind, member, key in item.reads}
        artifact = lambda kind, member: on_device(factor_store.get_tensors(keys[kind, member]))  # noqa: E731
        result = decompose_group(item.method, weights, _group_stats(item), modules, artifact)
        tensors = to_host({k: v.float() if v.is_floating_point() else v for k, v in result.tensors.items()})
        diagnostics = result.diagnostics
        sha = factor_store.put_tensors(item.factors_key, tensors, metadata={"diagnostics": json.dumps(diagnostics)})
    return ({quantity: {item.layer_prefix + path: value for path, value in values.items()}
             for quantity, values in diagnostics.items()}, item.factors_key, sha)


@dataclass(frozen=True)
class SpectrumItem:
    source: str
    layer_prefix: str
    group: str
    modules: tuple[dict, ...]  # CompressedModule JSON: which members are factorised together
    stats: StoreRef
    stats_key: str
    spectra: StoreRef
    spectra_key: str


def spectrum_item(item: SpectrumItem) -> tuple[str, str]:
    """Whitened spectra of one (layer, input group) into the store; returns (key, sha256)."""
    out = open_ref(item.spectra)
    sha = out.checksum(item.spectra_key)
    if sha is not None and out.actual_checksum(item.spectra_key) == sha:
        return item.spectra_key, sha
    modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
    stats = read_group_stats(item.stats, item.stats_key, item.group).to(worker_device())
    return item.spectra_key, out.put_tensors(item.spectra_key, to_host(group_spectra(weights, stats, modules)))


@dataclass(frozen=True)
class AssembleItem:
    source: str
    layer: int
    layer_prefix: str
    modules: tuple[dict, ...]
    dtype: str
    factors: StoreRef
    factor_keys: tuple[str, ...]
    checkpoint: StoreRef
    shard_key: str             # where the shard goes; its file name is the shard's name in the index
    kv_key: str | None = None     # the layer's stored KV-method factors, when the cache is compressed
    kv_method: str | None = None  # the KV method (methods/kv_registry.py) whose modules take them


def assemble_item(item: AssembleItem) -> ShardInfo:
    """One layer's checkpoint shard: dense tensors it keeps plus its factors, in the model dtype."""
    source, factor_store = cached_source(item.source), open_ref(item.factors)
    fragment: dict[str, torch.Tensor] = {}
    for key in item.factor_keys:
        fragment.update(factor_store.get_tensors(key))
    modules = [CompressedModule.from_json(m) for m in item.modules]
    dense = source.layer_state(item.layer)
    for module in modules:
        if module.handler.tensors is None:  # a KV cache module: its tensors are its KV method's
            method = KV_METHODS.get(item.kv_method)
            fragment.update(method.layer_tensors(factor_store.get_tensors(item.kv_key), dense, source.config, module))
    state = assemble_layer_state(dense, fragment, modules, getattr(torch, item.dtype))
    tensors = {item.layer_prefix + k: v for k, v in state.items()}
    sha = open_ref(item.checkpoint).put_tensors(item.shard_key, tensors)
    return ShardInfo(item.shard_key.rsplit("/", 1)[-1], sha, tuple(sorted(tensors)))


assemble_item.host_only = True  # reads factors and writes checkpoint shards: Ray gives its task no GPU


def global_keys(source: ModelSource) -> list[str]:
    """The checkpoint's tensors outside the decoder layers: embedding, final norm, and the head when the
    source stores one (untied)."""
    arch = source.architecture
    return [arch.embedding_key, arch.final_norm_key] + [arch.lm_head_key] * (arch.lm_head_key in source.keys())


@dataclass(frozen=True)
class GlobalsItem:
    source: str
    dtype: str
    checkpoint: StoreRef
    shard_key: str  # where the shard goes; its file name is the shard's name in the index


def assemble_globals(item: GlobalsItem) -> ShardInfo:
    """The checkpoint's shard of what is not a decoder layer — embedding, final norm, the head when stored
    (untied) — in the model dtype. A task, so the driver never holds them (4.2 GB at Llama-3-70B in bf16,
    and safetensors' serialised copy beside them)."""
    source, dtype = cached_source(item.source), getattr(torch, item.dtype)
    tensors = {key: source.tensor(key).to(dtype) for key in global_keys(source)}
    sha = open_ref(item.checkpoint).put_tensors(item.shard_key, tensors)
    return ShardInfo(item.shard_key.rsplit("/", 1)[-1], sha, tuple(sorted(tensors)))


assemble_globals.host_only = True
