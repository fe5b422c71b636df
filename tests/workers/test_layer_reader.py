"""LayerReader: a shard reads the next layer's weights on a background thread while the current one
runs; what it returns is the source's own tensors, whichever order the walk asks in."""

from __future__ import annotations

import torch

from rankfold.models.sources import open_source
from rankfold.workers.layer_reader import LayerReader
from rankfold.workers.shard import LayerStep, SequenceShard, ShardConfig


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_states_read_ahead_equal_the_sources_in_any_order(tiny_model_dir):
    source = open_source(str(tiny_model_dir))
    reader = LayerReader(source, torch.float32)  # the tiny model is stored in float32: the same tensors
    assert _equal(reader.state(0, then=1), source.layer_state(0))
    assert _equal(reader.state(1, then=0), source.layer_state(1)) and reader.read_ahead == 1  # layer 1 was ahead
    assert _equal(reader.state(1), source.layer_state(1)) and reader.read_ahead == 1  # 0 was ahead, not 1: dropped
    reader.prefetch(0)
    reader.prefetch(5)  # past the last layer: nothing to read
    assert _equal(reader.state(0), source.layer_state(0)) and reader.read_ahead == 1


def test_a_calibration_walk_reads_every_layer_after_the_first_ahead(tiny_model_dir):
    shard = SequenceShard(ShardConfig(str(tiny_model_dir), "float32", 1 << 30))
    shard.load(torch.randint(0, 100, (4, 16)), 2)
    for i in range(shard.source.num_layers):
        shard.advance(i, LayerStep(keep_outputs=i < shard.source.num_layers - 1))
    assert shard.weights.read_ahead == shard.source.num_layers - 1
    shard.release()
