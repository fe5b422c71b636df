"""Hidden states of all samples between two layers: chunked, held on the device up to a budget shared by
the worker's buffers, then in (pinned) host memory up to a per-buffer budget, then on disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from rankfold.core.device import CPU


class DevicePool:
    """Bytes of activations a worker may keep on its GPU, shared by all its buffers (a layer's inputs
    and outputs, Fisher's saved inputs): first come, first served; given back on `release`."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes, self.used_bytes = capacity_bytes, 0

    def take(self, size: int) -> bool:
        if self.used_bytes + size > self.capacity_bytes:
            return False
        self.used_bytes += size
        return True

    def give(self, size: int) -> None:
        self.used_bytes -= size


def device_pool(device: torch.device, budget_bytes: int | None, share: float = 1.0) -> DevicePool | None:
    """The worker's pool on `device`: `budget_bytes`, or (None) a quarter of its `share` of the memory free
    on it now (workers sharing a GPU — Ray's fractional gpus_per_worker — start before any fills it). None
    on the CPU, where the device is host memory and the host budget governs."""
    if device.type == "cpu":
        return None
    if budget_bytes is None:
        torch.cuda.empty_cache()  # blocks this process's allocator caches count as free: they are this worker's
        free, _total = torch.cuda.mem_get_info(device)
        budget_bytes = int(free * min(share, 1.0)) // 4
    return DevicePool(budget_bytes)


class Activations:
    """An append-only list of (batch, seq, hidden) chunks handed out on `device` (where the layers run).
    Each chunk stays on the device while `pool` has room; else it goes to host memory (pinned when the
    device is a GPU, so its copy back is asynchronous) while this buffer's `max_resident_bytes` allows;
    else to a safetensors file under `spill_dir`. On the CPU the pool is None: host, then disk."""

    def __init__(self, max_resident_bytes: int, spill_dir: Path | None = None, device: torch.device = CPU,
                 pool: DevicePool | None = None):
        self.max_resident_bytes, self.device, self.pool = max_resident_bytes, device, pool
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self._chunks: list[torch.Tensor | Path] = []
        self._resident_bytes = 0
        self._device_bytes, self._pooled = 0, 0

    def append(self, chunk: torch.Tensor) -> None:
        size = chunk.numel() * chunk.element_size()
        if self.pool is not None and self.pool.take(size):
            self._chunks.append(chunk.to(self.device).contiguous())
            self._device_bytes, self._pooled = self._device_bytes + size, self._pooled + 1
            return
        if self._resident_bytes + size <= self.max_resident_bytes:
            self._chunks.append(self._on_host(chunk))
            self._resident_bytes += size
            return
        if self._spill_dir is None:
            if self._spill_parent is not None:
                self._spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self._spill_parent))
        path = self._spill_dir / f"{len(self._chunks):06d}.safetensors"
        save_file({"hidden": chunk.to(CPU).contiguous()}, path)
        self._chunks.append(path)

    def _on_host(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return chunk.to(CPU).contiguous()
        host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
        return host.copy_(chunk)

    @property
    def spilled(self) -> int:
        return sum(isinstance(chunk, Path) for chunk in self._chunks)

    @property
    def pooled(self) -> int:
        """Chunks held in the device pool."""
        return self._pooled

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k in range(len(self._chunks)):
            yield self[k]

    def __getitem__(self, k: int) -> torch.Tensor:
        """Chunk k on the device (read back from its file when spilled)."""
        chunk = self._chunks[k]
        if isinstance(chunk, Path):
            return load_file(chunk)["hidden"].to(self.device)
        return chunk.to(self.device, non_blocking=chunk.is_pinned())  # pinned: the copy overlaps, ordered before use

    def release(self) -> None:
        """Drop the chunks, give back their device memory and delete spilled files (this buffer is not
        needed downstream)."""
        self._chunks.clear()
        self._resident_bytes = 0
        if self.pool is not None:
            self.pool.give(self._device_bytes)
        self._device_bytes, self._pooled = 0, 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
