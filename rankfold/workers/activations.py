"""Hidden states of all samples between two layers: chunked, and spilled to disk past a memory budget."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from rankfold.core.device import CPU


class Activations:
    """An append-only list of (batch, seq, hidden) chunks, held in host memory — past `max_resident_bytes`
    on disk — and handed out on `device` (where the layers run; a no-op on the CPU)."""

    def __init__(self, max_resident_bytes: int, spill_dir: Path | None = None, device: torch.device = CPU):
        self.max_resident_bytes, self.device = max_resident_bytes, device
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self._chunks: list[torch.Tensor | Path] = []
        self._resident_bytes = 0

    def append(self, chunk: torch.Tensor) -> None:
        chunk = chunk.to(CPU).contiguous()
        size = chunk.numel() * chunk.element_size()
        if self._resident_bytes + size <= self.max_resident_bytes:
            self._chunks.append(chunk)
            self._resident_bytes += size
            return
        if self._spill_dir is None:
            if self._spill_parent is not None:
                self._spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self._spill_parent))
        path = self._spill_dir / f"{len(self._chunks):06d}.safetensors"
        save_file({"hidden": chunk}, path)
        self._chunks.append(path)

    @property
    def spilled(self) -> int:
        return sum(isinstance(chunk, Path) for chunk in self._chunks)

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self._chunks:
            yield (load_file(chunk)["hidden"] if isinstance(chunk, Path) else chunk).to(self.device)

    def release(self) -> None:
        """Drop the chunks and delete spilled files (this buffer is not needed downstream)."""
        self._chunks.clear()
        self._resident_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
