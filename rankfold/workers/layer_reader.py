"""A shard's reads of layer weights, one layer ahead.

While layer i runs, the layer the walk needs next (i + 1 forward, i − 1 in Fisher's backward pass) is
read from the model source on a background thread — from disk, from a checkpoint fetched out of the
store, or dequantised from a GGUF —, narrowed to the model's dtype (never widened: `materialize_layer`
does that) and, when the layers run on a GPU, cast and put in pinned host memory, from which the copy to
the device is fast. A shard then holds at most two layers'
weights. The tensors are the source's own (`layer_state`), so every result is bit-identical to reading
in line.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rankfold.models.sources import ModelSource


class LayerReader:
    def __init__(self, source: ModelSource, dtype: torch.dtype, pin: bool = False):
        """Floating-point tensors wider than `dtype` come cast to it (as `materialize_layer` would: the same
        values), narrower ones as stored (`_cast`); `pin`: page-locked (for a CUDA device; pinning needs
        CUDA)."""
        self.source, self.dtype, self.pin = source, dtype, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._ahead: tuple[int, Future] | None = None
        self.read_ahead = 0  # states served from a read started ahead (a measure that the overlap happens)

    def state(self, index: int, then: int | None = None) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors (keyed by path inside the layer), then start reading layer `then` (when
        it is a layer of the model). A read of the wrong layer started ahead is waited for and dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            state = ahead[1].result()
            self.read_ahead += 1
        else:
            if ahead is not None:
                ahead[1].exception()  # never two reads at once; an unused read's error does not matter
            state = self._read(index)
        if then is not None and 0 <= then < self.source.num_layers:
            self._ahead = (then, self._pool.submit(self._read, then))
        return state

    def prefetch(self, index: int) -> None:
        """Start reading layer `index` now (unless that read is under way), for a later `state(index)`."""
        if self._ahead is None or self._ahead[0] != index:
            self.drop()
            if 0 <= index < self.source.num_layers:
                self._ahead = (index, self._pool.submit(self._read, index))

    def drop(self) -> None:
        """Forget a read started ahead (the walk ends or starts again), waiting for it to finish."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].exception()  # finished either way; an error of an unused read does not matter

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        state = {key: value.to(self.dtype) if self._cast(value) else value
                 for key, value in self.source.layer_state(index).items()}
        return {key: value.pin_memory() for key, value in state.items()} if self.pin else state

    def _cast(self, value: torch.Tensor) -> bool:
        """Whether a read tensor is cast here. On the host, only to narrow it: a bf16 checkpoint run in
        float32 (FLRA's Fisher pass) waits ahead in bf16 and is widened by `materialize_layer` — a
        Llama-3-70B layer held ahead is 1.7 GB, not 3.4 (the same values). Pinned for a GPU: always, so
        the copy to the device is the pinned one."""
        if not value.is_floating_point():
            return False
        return self.pin or value.element_size() > self.dtype.itemsize
