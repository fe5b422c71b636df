"""Compressed checkpoints: safetensors shards + an index + a config that records every rank.

Layout of a checkpoint folder:
    config.json                      the model's HF config plus a "rankfold" section (method, ratio
                                     definition, rank of every compressed matrix, format version)
    rankfold.safetensors.index.json  HF index format: weight_map + sha256 of every shard
    layers-00000.safetensors ...     one shard per decoder layer; `globals.safetensors` for the rest
    rank_gains.safetensors           (FLRA only) loss removed per parameter of every kept direction,
                                     by module path: progressive decoding's order; checksummed, no weights
    tokenizer files

The index is deliberately not named model.safetensors.index.json: plain transformers would load the
folder as a dense model, initialise the missing dense weights at random and only warn. Load with
`rankfold.load(path)`; `rankfold export` (rankfold/export/) writes a folder that loads without rankfold.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rankfold.core.errors import BadInput
from rankfold.core.files import atomic_write, atomic_write_text
from rankfold.core.hashing import sha256_file
from rankfold.models.architecture import architecture_for
from rankfold.models.sources import (
    RANK_GAINS_NAME,
    RANKFOLD_INDEX_NAME,
    ModelSource,
    ModelSourceError,
    SafetensorsSource,
)
from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.transformers_hook import PREFIX, compressed_config

FORMAT_VERSION = 1
INDEX_NAME = RANKFOLD_INDEX_NAME
RANK_GAINS = RANK_GAINS_NAME


class CheckpointError(BadInput, ValueError):
    """A compressed checkpoint that is incomplete, damaged or not a rankfold checkpoint."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    keys: tuple[str, ...]


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> ShardInfo:
    """Write atomically (temp file, then rename) and return the shard's checksum."""
    digest = ""

    def write(temp: Path) -> None:
        nonlocal digest
        save_file({key: value.contiguous() for key, value in tensors.items()}, temp)
        digest = sha256_file(temp)

    atomic_write(folder / name, write)
    return ShardInfo(name, digest, tuple(sorted(tensors)))


def write_index(folder: Path, shards: list[ShardInfo], config: PretrainedConfig, rankfold_meta: dict) -> None:
    """Config first, index last: the index is the commit marker of a complete checkpoint."""
    config = copy.deepcopy(config)  # the source's config stays as it was
    config.rankfold = {"format_version": FORMAT_VERSION, **rankfold_meta}
    atomic_write_text(folder / "config.json", config.to_json_string(use_diff=False))
    # config.json carries the layout every reader builds the model from: checksummed like the shards.
    checksums = {shard.name: shard.sha256 for shard in shards} | {"config.json": sha256_file(folder / "config.json")}
    index = {
        "metadata": {"format": "rankfold", "format_version": FORMAT_VERSION, "sha256": checksums},
        "weight_map": {key: shard.name for shard in shards for key in shard.keys},
    }
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True))


def read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {INDEX_NAME}: not a rankfold checkpoint, or an unfinished one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: damaged index ({err})") from None


def verify_checkpoint(folder: Path) -> None:
    """Every shard the index names exists and matches its recorded sha256."""
    folder = Path(folder)
    for name, expected in read_index(folder)["metadata"]["sha256"].items():
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{folder}: shard {name} is missing")
        actual = sha256_file(shard)
        if actual != expected:
            raise CheckpointError(f"{folder}: shard {name} is corrupted (sha256 {actual[:12]}…, index says {expected[:12]}…)")


def rank_gains(source: ModelSource) -> dict[str, torch.Tensor] | None:
    """The checkpoint's FLRA decode gains (module path -> (rank,) float32), None when it has none."""
    from safetensors.torch import load_file

    path = source.side_file(RANK_GAINS)
    return load_file(path) if path is not None else None


def meta_model(config: PretrainedConfig, layout: list[CompressedModule] | None = None) -> PreTrainedModel:
    """The model's modules on the meta device (no memory, no weights): dense, or with `layout` (full
    paths) applied — what a check reads before anything loads (e.g. progressive decoding's units)."""
    arch = architecture_for(config)
    base = copy.deepcopy(config)
    base.rankfold = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base)
        arch.prepare(model)
        if layout:
            apply_layout(model, layout)
    return model


def is_compressed(config: PretrainedConfig) -> bool:
    """The config records a rankfold layout (a compressed model's), not a dense model's."""
    return isinstance(getattr(config, "rankfold", None), dict)


def compressed_layout(config: PretrainedConfig) -> list[CompressedModule]:
    """The checkpoint's compressed modules (full paths), from config.json's rankfold section."""
    meta = getattr(config, "rankfold", None)
    if not isinstance(meta, dict) or "layout" not in meta:
        raise CheckpointError("config.json has no 'rankfold' layout: not a rankfold checkpoint")
    try:
        return [CompressedModule.from_json(entry) for entry in meta["layout"]]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json: damaged rankfold layout ({err})") from None


def layer_layouts(config: PretrainedConfig) -> dict[int, list[dict]]:
    """Per decoder layer, its compressed modules with layer-relative paths (CompressedModule JSON, as
    the streamed layer runners take them); empty for a dense config."""
    if not is_compressed(config):
        return {}
    arch, out = architecture_for(config), {}
    for i in range(config.num_hidden_layers):
        prefix = arch.layer_prefix.format(i=i)
        mine = [m for m in compressed_layout(config) if all(p.startswith(prefix) for p in m.members)]
        out[i] = [m.relocated(lambda path, cut=len(prefix): path[cut:]).to_json() for m in mine]  # noqa: B008 (called at once)
    return out


def load(path: str | Path, *, verify: bool = True, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A compressed checkpoint as a transformers causal LM (model type `rankfold_<base>`, a subclass of
    the base model's class) whose compressed linears are LowRankLinear / SharedLowRankLinear.

    `verify` checks every shard's sha256 first, so a damaged file is an error, never wrong weights.
    The model's `save_pretrained` output loads back with `rankfold.load` or transformers'
    `AutoModelForCausalLM.from_pretrained` (with rankfold imported; see modules/transformers_hook.py).
    """
    folder = Path(path)
    if not (folder / INDEX_NAME).is_file() and _saved_by_transformers(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").eval()
    if verify:
        verify_checkpoint(folder)
    source = SafetensorsSource(folder)
    compressed_layout(source.config)  # a config without a readable layout is a CheckpointError
    return model_from_source(source, dtype)


def model_from_source(source: ModelSource, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The whole model of any source (a GGUF, a Hugging Face folder, a rankfold checkpoint, in a store
    or not) as a transformers causal LM, in eval mode: compressed when its config records a rankfold
    layout, dense otherwise. `dtype`: default the checkpoint's recorded dtype, else float32.

    Raises CheckpointError when the tensors do not fit the config (missing or unexpected names).
    """
    config = copy.deepcopy(source.config)
    compressed = is_compressed(config)
    arch = architecture_for(config)
    if arch.lm_head_key in source.keys() and getattr(config, "tie_word_embeddings", False):
        # The file's own head is the one the job evaluated (ModelSource.lm_head): never re-tie it away.
        config.tie_word_embeddings = False
    dtype = dtype or getattr(torch, config.rankfold.get("dtype", "float32") if compressed else "float32")
    with torch.device("meta"):  # the compressed model type applies the layout as it is built
        model = AutoModelForCausalLM.from_config(compressed_config(config) if compressed else config, dtype=dtype)
    arch.prepare(model)  # a mixture's experts as one linear set per expert, as layer_state names them
    try:
        state = {key: _as(value, dtype) for key, value in _model_state(source).items()}
    except ModelSourceError as err:
        raise CheckpointError(str(err)) from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {arch.lm_head_key} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        what = "the recorded ranks" if compressed else f"the {config.model_type} config"
        raise CheckpointError(f"{source.location}: tensors do not fit {what} "
                              f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    arch.rebuild_buffers(model, config)  # non-persistent buffers were created on meta
    return model.eval()


def _model_state(source: ModelSource) -> dict[str, torch.Tensor]:
    """Every tensor of `source`, each layer's as its built layer names them (ModelSource.layer_state:
    checkpoint names mapped, a mixture's experts split per expert)."""
    prefixes = [source.architecture.layer_prefix.format(i=i) for i in range(source.num_layers)]
    state = {key: source.tensor(key) for key in source.keys() if not key.startswith(tuple(prefixes))}
    for i, prefix in enumerate(prefixes):
        state.update({prefix + key: value for key, value in source.layer_state(i).items()})
    return state


def _saved_by_transformers(folder: Path) -> bool:
    """A compressed model's `save_pretrained` folder: config.json of a `rankfold_*` model type."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return str(config.get("model_type", "")).startswith(PREFIX)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor  # permutations stay integer
