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
from dataclasses import dataclass
from pathlib import Path

import torch

import rankfold.storage  # noqa: F401  (registers the "store:" source scheme: checkpoints read from a store)
from rankfold.core.arrays import shareable
from rankfold.core.device import to_host, use_device
from rankfold.core.resources import process_peak_rss_mb, release_free_heap
from rankfold.methods.cap import masked_weight
from rankfold.models.architecture import OutputHead
from rankfold.models.sources import ModelSource, open_source
from rankfold.modules.layout import CompressedModule
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.activations import Activations, device_pool
from rankfold.workers.fisher_backward import fisher_tensors, head_gradient, layer_backward, prepare_for_gradients
from rankfold.workers.layer_reader import LayerReader
from rankfold.workers.layer_statistics import propagate_layer
from rankfold.workers.layers import LayerRunner, materialize_layer, runtime_config
from rankfold.workers.streamed_perplexity import window_nll

_SOURCES: dict[str, ModelSource] = {}


def cached_source(location: str) -> ModelSource:
    """One open source per process and location (sources read lazily, so this holds no weights)."""
    if location not in _SOURCES:
        _SOURCES[location] = open_source(location)
    return _SOURCES[location]


@dataclass(frozen=True)
class ShardConfig:
    """What a shard is built from (small and picklable: it travels to a worker)."""

    location: str               # model source location (open_source)
    dtype: str                  # forward dtype, e.g. "float32"
    budget_bytes: int           # resident activations before spilling to `spill_dir`
    spill_dir: str | None = None
    product_dtype: str = "float64"  # dtype of each chunk's x·xᵀ (statistics are float64 sums)
    threads: int | None = None      # torch threads in this worker (None: keep the process's)
    device: str = "cpu"             # where the layers run (core/device.py)
    device_budget_bytes: int | None = None  # activations kept on that GPU (None: a quarter of its free memory)
    gpu_share: float = 1.0          # this worker's fraction of its GPU (Ray's gpus_per_worker below 1)


@dataclass(frozen=True)
class LayerStep:
    """How `advance` runs one layer."""

    layout: list[dict] | None = None  # the layer's compressed modules (CompressedModule JSON), None: dense
    collect_stats: bool = True        # return the layer's input statistics
    keep_outputs: bool = True         # keep the outputs as the next layer's inputs (False: last calibration layer)
    keep_input: bool = False          # keep the input for `fisher_backward`


class SequenceShard:
    def __init__(self, config: ShardConfig):
        if config.threads:  # Ray sets OMP_NUM_THREADS=1 for 1-CPU workers: use the CPUs this worker was given
            torch.set_num_threads(config.threads)
        self.device = use_device(config.device)
        self.location, self.source = config.location, cached_source(config.location)
        self.dtype, self.product_dtype = getattr(torch, config.dtype), getattr(torch, config.product_dtype)
        self.budget_bytes = config.budget_bytes
        self.spill_dir = Path(config.spill_dir) if config.spill_dir else None
        self.pool = device_pool(self.device, config.device_budget_bytes, config.gpu_share)  # None on the CPU
        self.config = runtime_config(self.source.config)
        self.runner = LayerRunner(self.source.architecture, self.config)
        self.weights = LayerReader(self.source, self.dtype, pin=self.device.type == "cuda")  # one layer ahead
        self.hidden: Activations | None = None
        self.ids: torch.Tensor | None = None
        self.saved_inputs: dict[int, Activations] = {}  # Fisher: each layer's input, for the backward pass
        self.grads: Activations | None = None            # Fisher: ∂ℒ/∂(input of the layer above)
        self.units: dict[str, dict[str, torch.Tensor]] = {}  # CAP search: robust PCA units kept between steps

    def load(self, ids: torch.Tensor, batch_size: int) -> int:
        """Embed this shard's (samples, seq) token ids; returns the number of tokens."""
        self.release()
        table = self.source.embedding()
        self.hidden = self.activations(self.budget_bytes)
        for batch in ids.split(batch_size):
            self.hidden.append(self.source.architecture.embed(batch, table, self.config, self.dtype))
        self.ids, self.batch_size = ids, batch_size
        del table
        release_free_heap()
        return ids.numel()

    def advance(self, index: int, step: LayerStep = LayerStep()) -> dict[str, torch.Tensor]:
        """Run layer `index` on the held activations, as `step` says. Returns the layer's input
        statistics (empty unless `step.collect_stats`). With `step.keep_input` the layer's input stays
        held for `fisher_backward` (each layer's share of the memory budget)."""
        if self.hidden is None:
            raise RuntimeError("shard holds no activations: call load() first")
        arch = self.source.architecture
        modules = [CompressedModule.from_json(m) for m in step.layout] if step.layout else None
        state = self.weights.state(index, then=index + 1 if step.keep_outputs else None)
        layer = materialize_layer(arch, self.config, index, state, self.dtype, layout=modules, device=self.device)
        del state  # on a GPU, the host copy: not held while the layer runs
        outputs = self.activations(self._budget(step.keep_input)) if step.keep_outputs else None
        groups = arch.groups if step.collect_stats else ()
        stats = propagate_layer(layer, self.runner, self.hidden, outputs, groups, self.product_dtype,
                                where=f"layer {index} (model.dtype {str(self.dtype).removeprefix('torch.')})")
        if step.keep_input:
            self.saved_inputs[index] = self.hidden
        else:
            self.hidden.release()
        self.hidden = outputs
        tensors: dict[str, torch.Tensor] = {}
        for name, group_stats in stats.items():
            tensors.update(group_stats.to_tensors(name))
        del layer, stats
        release_free_heap()  # the forward's temporaries: not held in RSS for the rest of the walk
        return to_host(tensors)

    def apply(self, fn, *args):
        """fn(*args) in this shard's worker (a reduce of the shards' partials: no process of its own)."""
        return fn(*args)

    def split(self, method: str, *args) -> tuple[int, object]:
        """(0, this shard's `method`(*args)): a status the driver fetches and a partial it does not
        (Executor.call_all_split), its tensors as NumPy arrays (core/arrays.py: read without a copy)."""
        return 0, shareable(getattr(self, method)(*args))

    def activations(self, budget_bytes: int) -> Activations:
        """An activation buffer of this shard: its device's pool, host memory (`budget_bytes`), then
        `spill_dir`; handed out on its device."""
        return Activations(budget_bytes, self.spill_dir, self.device, self.pool)

    def advance_masked(self, index: int, units: StoreRef, keys: dict[str, str],
                       masks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """CAP's search: run layer `index` with every matrix in `keys` (path -> its robust PCA units'
        key) replaced by W̃ = U diag(σ⊙m_σ) Vᵀ + S⊙m_S under its (triple, entry) masks. Units stay
        cached between steps while they fit half this shard's memory budget. Returns the tokens run."""
        if self.hidden is None:
            raise RuntimeError("shard holds no activations: call load() first")
        state = self.weights.state(index, then=index + 1)
        for path, key in keys.items():
            name = f"{path}.weight"
            triples, entries = masks[path]  # W̃'s product where the layer runs, not m·n·rank on the host
            state[name] = masked_weight(self._units(units, key), triples, entries, tuple(state[name].shape),
                                        self.dtype, self.device)
        layer = materialize_layer(self.source.architecture, self.config, index, state, self.dtype,
                                  device=self.device)
        outputs = self.activations(self.budget_bytes // 2)
        propagate_layer(layer, self.runner, self.hidden, outputs, where=f"layer {index} (masked by the search)")
        self.hidden.release()
        self.hidden = outputs
        return int(self.ids.numel())

    def _units(self, ref: StoreRef, key: str) -> dict[str, torch.Tensor]:
        if key not in self.units:
            tensors = open_ref(ref).get_tensors(key)
            held = sum(t.numel() * t.element_size() for cached in self.units.values() for t in cached.values())
            if held + sum(t.numel() * t.element_size() for t in tensors.values()) > self.budget_bytes // 2:
                return tensors
            self.units[key] = tensors
        return self.units[key]

    def _output_head(self) -> OutputHead:
        """What follows the last layer (no gradients: it is not compressed)."""
        source = self.source
        return source.architecture.build_output_head(source.config, source.final_norm().to(self.device, self.dtype),
                                                     source.lm_head().to(self.device, self.dtype))

    def nll(self) -> tuple[float, int]:
        """Summed next-token NLL of the held windows after the last layer."""
        head = self._output_head()
        total, count = 0.0, 0
        with torch.no_grad():
            for chunk, ids in zip(self.hidden, self.ids.split(self.batch_size)):
                chunk_total, chunk_count = window_nll(chunk, head, ids.to(self.device))
                total, count = total + chunk_total, count + chunk_count
        return total, count

    def _budget(self, per_layer: bool) -> int:
        """Resident bytes for one activation buffer; split over all layers when every input is kept."""
        return self.budget_bytes // (self.source.num_layers + 1) if per_layer else self.budget_bytes

    def fisher_head(self) -> float:
        """Start the backward pass: per batch (one held chunk), ∂ℒ/∂(last layer's output) of its mean
        next-token loss. Returns the summed batch losses."""
        if self.hidden is None:
            raise RuntimeError("shard holds no activations: run the forward pass first")
        head = self._output_head()
        self.grads = self.activations(self._budget(True))
        total = 0.0
        for chunk, ids in zip(self.hidden, self.ids.split(self.batch_size)):
            loss, grad = head_gradient(chunk, head, ids.to(self.device))
            self.grads.append(grad)
            total += loss
        self.hidden.release()
        self.hidden = None
        return total

    def fisher_backward(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index` of the backward pass (layers in reverse order): recompute it from its kept
        input, backpropagate the held gradient, return Σ(∂ℒ/∂W)² sums of its projections and keep
        ∂ℒ/∂input for layer index − 1."""
        if self.grads is None or index not in self.saved_inputs:
            raise RuntimeError(f"shard cannot run the backward pass of layer {index}: its forward "
                               "pass (keep_input) or the gradient from the layer above is missing")
        arch = self.source.architecture
        paths = [member for group in arch.groups for member in group.members]
        layer = materialize_layer(arch, self.config, index, self.weights.state(index, then=index - 1), self.dtype,
                                  device=self.device)
        prepare_for_gradients(layer, paths)
        inputs = self.saved_inputs.pop(index)
        below = self.activations(self._budget(True)) if index else None
        sums: dict = {}
        batches = 0
        for hidden, grad in zip(inputs, self.grads):
            grad_in = layer_backward(layer, self.runner, hidden, grad, sums, paths)
            batches += 1
            if below is not None:
                below.append(grad_in)
        inputs.release()
        self.grads.release()
        self.grads = below
        tensors = to_host(fisher_tensors(sums, batches))
        del layer, sums
        release_free_heap()
        return tensors

    def release(self) -> float:
        """Drop every buffer (and spilled file); returns this process's peak RSS in MiB."""
        self.weights.drop()
        for buffer in [self.hidden, self.grads, *self.saved_inputs.values()]:
            if buffer is not None:
                buffer.release()
        self.hidden, self.ids, self.grads, self.saved_inputs = None, None, None, {}
        return process_peak_rss_mb()

    def pid(self) -> int:
        return os.getpid()
