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


def test_a_narrower_checkpoint_waits_ahead_as_stored_and_runs_the_same(tiny_model_dir, tmp_path):
    """A bf16 checkpoint run in float32 (FLRA's Fisher pass) is held ahead in bf16 — half the bytes —
    and widened when the layer is built: the outputs equal a read cast in line."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, folder)
    for path in folder.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    source = open_source(str(folder))
    reader = LayerReader(source, torch.float32)
    reader.state(0, then=1)
    ahead = reader._ahead[1].result()
    assert {value.dtype for value in ahead.values() if value.is_floating_point()} == {torch.bfloat16}
    assert LayerReader(source, torch.bfloat16).state(0)["mlp.down_proj.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, 100, (2, 16))
    outputs = []
    for read_ahead in (True, False):
        shard = SequenceShard(ShardConfig(str(folder), "float32", 1 << 30))
        shard.load(ids, 2)
        for i in range(shard.source.num_layers):
            if not read_ahead:
                shard.weights.drop()
                shard.weights._read = lambda index, source=shard.source: {  # cast in line, as before
                    k: v.float() if v.is_floating_point() else v for k, v in source.layer_state(index).items()}
            shard.advance(i, LayerStep(collect_stats=False))
        outputs.append(torch.cat(list(shard.hidden)))
        shard.release()
    assert torch.equal(outputs[0], outputs[1])
