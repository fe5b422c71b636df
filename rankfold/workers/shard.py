"""A data-parallel shard of token sequences walking the model layer by layer.

Calibration and streamed evaluation both push a set of sequences through every decoder layer in
order. A `SequenceShard` holds one shard's activations (spilling to disk past a budget) and, per
call, reads one layer's weights from the model source, runs it, returns that layer's input
statistics (sums: shards reduce by addition), and keeps the outputs as the next layer's inputs.
The driver only moves layer indices and small statistics; no shard ever holds more than one layer.
In-process this class is used directly; the Ray executor runs one instance per worker (an actor).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rankfold.models.sources import ModelSource, open_source
from rankfold.modules.layout import CompressedModule
from rankfold.workers.activations import Activations
from rankfold.workers.calibrate import propagate_layer
from rankfold.workers.evaluate import window_nll
from rankfold.workers.layers import LayerRunner, embed, materialize_layer, runtime_config

_SOURCES: dict[str, ModelSource] = {}


def cached_source(location: str) -> ModelSource:
    """One open source per process and location (sources read lazily, so this holds no weights)."""
    if location not in _SOURCES:
        _SOURCES[location] = open_source(location)
    return _SOURCES[location]


class SequenceShard:
    def __init__(self, source: str, dtype: str, budget_bytes: int, spill_dir: str | None = None,
                 product_dtype: str = "float64", threads: int | None = None):
        if threads:  # Ray sets OMP_NUM_THREADS=1 for 1-CPU workers: use the CPUs this worker was given
            torch.set_num_threads(threads)
        self.location, self.source = source, cached_source(source)
        self.dtype, self.product_dtype = getattr(torch, dtype), getattr(torch, product_dtype)
        self.budget_bytes, self.spill_dir = budget_bytes, Path(spill_dir) if spill_dir else None
        self.config = runtime_config(self.source.config)
        self.runner = LayerRunner(self.source.architecture, self.config)
        self.hidden: Activations | None = None
        self.ids: torch.Tensor | None = None

    def load(self, ids: torch.Tensor, batch_size: int) -> int:
        """Embed this shard's (samples, seq) token ids; returns the number of tokens."""
        self.release()
        table = self.source.embedding()
        self.hidden = Activations(self.budget_bytes, self.spill_dir)
        for batch in ids.split(batch_size):
            self.hidden.append(embed(batch, table, self.dtype))
        self.ids, self.batch_size = ids, batch_size
        return ids.numel()

    def advance(self, index: int, layout: list[dict] | None = None, collect_stats: bool = True,
                keep_outputs: bool = True) -> dict[str, torch.Tensor]:
        """Run layer `index` (its compressed modules per `layout`, JSON) on the held activations.
        Returns the layer's input statistics (empty unless `collect_stats`)."""
        if self.hidden is None:
            raise RuntimeError("shard holds no activations: call load() first")
        arch = self.source.architecture
        modules = [CompressedModule.from_json(m) for m in layout] if layout else None
        layer = materialize_layer(arch, self.config, index, self.source.layer_state(index), self.dtype,
                                  layout=modules)
        outputs = Activations(self.budget_bytes, self.spill_dir) if keep_outputs else None
        groups = arch.groups if collect_stats else ()
        stats = propagate_layer(layer, self.runner, self.hidden, outputs, groups, self.product_dtype)
        self.hidden.release()
        self.hidden = outputs
        tensors: dict[str, torch.Tensor] = {}
        for name, group_stats in stats.items():
            tensors.update(group_stats.to_tensors(name))
        return tensors

    def nll(self) -> tuple[float, int]:
        """Summed next-token NLL of the held windows after the last layer."""
        model = self.source
        norm = model.architecture.build_final_norm(model.config)
        norm.weight.data = model.final_norm().to(self.dtype)
        head = model.lm_head().to(self.dtype)
        total, count = 0.0, 0
        with torch.no_grad():
            for chunk, ids in zip(self.hidden, self.ids.split(self.batch_size)):
                chunk_total, chunk_count = window_nll(chunk, norm, head, ids)
                total, count = total + chunk_total, count + chunk_count
        return total, count

    def release(self) -> None:
        if self.hidden is not None:
            self.hidden.release()
        self.hidden, self.ids = None, None

    def pid(self) -> int:
        return os.getpid()
