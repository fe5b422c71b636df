"""Model sources read the same tensors transformers would, one layer at a time; bad files are clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankfold.models.sources import GGUFSource, ModelSourceError, SafetensorsSource, open_source


@pytest.mark.realmodel
def test_gguf_layers_equal_transformers_gguf_load(smollm2):
    path = smollm2.path
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    for index in (0, 17, 29):
        for key, value in smollm2.layer_state(index).items():
            assert torch.equal(value, reference[f"model.layers.{index}.{key}"]), key
    assert torch.equal(smollm2.embedding(), reference["model.embed_tokens.weight"])
    assert torch.equal(smollm2.final_norm(), reference["model.norm.weight"])
    assert smollm2.config.tie_word_embeddings and torch.equal(smollm2.lm_head(), smollm2.embedding())
    assert smollm2.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)


def test_safetensors_source_reads_layers(tiny_model_dir):
    source = open_source(tiny_model_dir)
    assert isinstance(source, SafetensorsSource) and source.num_layers == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = model.state_dict()
    for key, value in source.layer_state(1).items():
        assert torch.equal(value, reference[f"model.layers.1.{key}"])
    assert source.shape("model.layers.0.self_attn.k_proj.weight") == (32, 64)
    with pytest.raises(IndexError):
        source.layer_state(2)


def test_pickle_only_folder_is_refused_not_unpickled(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="never unpickles"):
        open_source(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        open_source(tmp_path / "m").layer_state(1)


def test_unknown_source_and_damaged_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a built-in model"):
        open_source("no-such-model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        GGUFSource(bad)


def test_fingerprint_follows_the_weights_content_and_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    """A weight rewritten in place (same size) changes the fingerprint; an unchanged file is hashed once."""
    import rankfold.models.sources as sources

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = SafetensorsSource(folder).fingerprint()
    hashed = []
    monkeypatch.setattr(sources, "sha256_file", lambda path: hashed.append(path) or "x" * 64)
    assert SafetensorsSource(folder).fingerprint() == before and not hashed  # from the cache
    monkeypatch.undo()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x01\x02\x03\x04"  # the last tensor's last bytes
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == len(data)
    assert SafetensorsSource(folder).fingerprint() != before
