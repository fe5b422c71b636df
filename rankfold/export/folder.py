"""`rankfold export`: any model rankfold opens, written as a transformers folder that loads without rankfold.

Forms (forms.py says what each structure becomes):
- `native`: every structure as rankfold stores it (shared and skip projections, low rank + sparse,
  Palu's latent KV cache with its quantised latents and residual window); config.json's `auto_map`
  points at the generated remote code (modeling.py), so
  `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` gives rankfold.load's logits.
- `lowrank`: every compressed matrix as two nn.Linear factors — the form vLLM's Transformers backend
  serves on its own GEMMs (remote code too).
- `dense`: W = B A multiplied out, the family's own model type: no remote code, loads and serves anywhere.
A dense source (a GGUF, a Hugging Face folder) is written as the family's dense folder in every form.

The folder is written beside OUT and renamed into place when complete; an existing OUT is refused.
Weights: safetensors shards with the standard index (`model.safetensors.index.json`), written by
transformers' `save_pretrained`; side files (FLRA's rank gains) stay behind (they are not weights).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rankfold.checkpoint import compressed_layout, is_compressed, model_from_source
from rankfold.export.forms import ExportError, dense_model, lowrank_model
from rankfold.export.modeling import remote_code
from rankfold.models.sources import ModelSource, open_supported

FORMS = ("native", "lowrank", "dense")


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: the folder, its form, its model type and the Python files it ships."""

    folder: Path
    form: str
    model_type: str
    code_files: tuple[str, ...]


def export(source: str | Path, out: str | Path, form: str = "native", max_shard_size: str = "2GB") -> Exported:
    """Write the model at `source` (a checkpoint or job output folder, a store location, a GGUF or
    Hugging Face folder: whatever rankfold opens) to the new folder `out` in `form`.

    Raises ExportError (a CheckpointError, BadInput) for an unknown form, an existing `out`, a source
    that does not open, or a structure the form cannot hold (forms.py)."""
    if form not in FORMS:
        raise ExportError(f"export form {form!r} is not one of {', '.join(FORMS)}")
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists: export writes a new folder (remove it or name another)")
    model_source = _opened(source)
    model = model_from_source(model_source)
    return write_folder(model, model_source.tokenizer(), out, form, max_shard_size)


def write_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: Path, form: str = "native",
                 max_shard_size: str = "2GB") -> Exported:
    """`model` (a compressed model as rankfold.load gives it, or a dense one) written to `out` in `form`."""
    compressed = is_compressed(model.config)
    if compressed and form != "native":
        model = lowrank_model(model) if form == "lowrank" else dense_model(model)
        compressed = form == "lowrank"
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = _write(model, tokenizer, temp, compressed, max_shard_size)
        _usual_permissions(temp)
        temp.rename(out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return Exported(out, form, model.config.model_type, tuple(files))


def _write(model: PreTrainedModel, tokenizer, folder: Path, compressed: bool, max_shard_size: str) -> list[str]:
    files = {}
    if compressed:
        files, auto_map = remote_code(model.config, compressed_layout(model.config))
        model.config = copy.deepcopy(model.config)  # the caller's model keeps its config
        model.config.auto_map = auto_map
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for name, text in files.items():
        (folder / name).write_text(text)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return sorted(files)


def _usual_permissions(folder: Path) -> None:
    """The folder and its files as a plain mkdir / write would leave them (the umask's), not the private
    modes of a temporary folder: an exported model is made to be read by servers and other users."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _opened(location: str | Path) -> ModelSource:
    """The source at `location`; a job's output folder stands for the checkpoint in its `model/`."""
    path = Path(location)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        location = path / "model"
    try:
        return open_supported(location)
    except ValueError as err:
        raise ExportError(f"cannot export {location}: {err}") from None
