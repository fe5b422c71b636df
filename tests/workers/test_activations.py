from __future__ import annotations

import torch

from rankfold.workers.activations import Activations


def test_chunks_past_the_budget_spill_to_disk_and_read_back_equal(tmp_path):
    chunks = [torch.randn(2, 8, 16) for _ in range(5)]
    chunk_bytes = chunks[0].numel() * 4
    buffer = Activations(max_resident_bytes=2 * chunk_bytes, spill_dir=tmp_path)
    for chunk in chunks:
        buffer.append(chunk)
    assert len(buffer) == 5 and buffer.spilled == 3
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    for got, want in zip(buffer, chunks):
        assert torch.equal(got, want)
    buffer.release()
    assert not list(tmp_path.rglob("*.safetensors")) and len(buffer) == 0
