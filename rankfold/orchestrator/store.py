"""Artifact store over a local folder: tensors (safetensors) and JSON under slash-separated keys.

Writes are atomic (temp file in the same folder, then rename), so an interrupted run never leaves a
half-written artifact under its final key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"artifact key must be relative and stay inside the store: {key!r}")
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def _temp_for(self, key: str) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        temp = self._temp_for(key)
        save_file({name: value.contiguous() for name, value in tensors.items()}, temp, metadata=metadata)
        os.replace(temp, self.path(key))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(key))

    def get_metadata(self, key: str) -> dict[str, str]:
        with safe_open(self.path(key), framework="pt") as handle:
            return handle.metadata() or {}

    def put_json(self, key: str, value: object) -> None:
        temp = self._temp_for(key)
        temp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
        os.replace(temp, self.path(key))

    def get_json(self, key: str) -> object:
        return json.loads(self.path(key).read_text())
