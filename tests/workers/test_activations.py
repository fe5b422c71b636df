from __future__ import annotations

import pytest
import torch

from rankfold.workers.activations import Activations, DevicePool, device_pool


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


def test_the_device_pool_is_shared_by_buffers_then_host_then_disk_and_given_back(tmp_path):
    # The tiers' accounting; the "device" is the CPU here (on a GPU the pooled chunks stay there).
    chunks = [torch.randn(2, 8, 16) for _ in range(4)]
    size = chunks[0].numel() * 4
    pool = DevicePool(3 * size)
    first = Activations(max_resident_bytes=size, spill_dir=tmp_path, pool=pool)
    for chunk in chunks[:2]:
        first.append(chunk)
    second = Activations(max_resident_bytes=size, spill_dir=tmp_path, pool=pool)
    for chunk in chunks:
        second.append(chunk)
    assert (first.pooled, second.pooled, second.spilled, pool.used_bytes) == (2, 1, 2, 3 * size)
    assert all(torch.equal(got, want) for got, want in zip(second, chunks))
    first.release()
    assert pool.used_bytes == size
    third = Activations(max_resident_bytes=0, spill_dir=tmp_path, pool=pool)
    third.append(chunks[0]), third.append(chunks[1]), third.append(chunks[2])
    assert (third.pooled, third.spilled) == (2, 1)
    second.release(), third.release()
    assert pool.used_bytes == 0 and not list(tmp_path.rglob("*.safetensors"))


def test_on_the_cpu_there_is_no_device_pool():
    assert device_pool(torch.device("cpu"), 1 << 30) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_chunks_stay_there_then_go_to_pinned_host_memory():
    device = torch.device("cuda", 0)
    chunks = [torch.randn(2, 8, 16, device=device) for _ in range(3)]
    buffer = Activations(max_resident_bytes=1 << 20, device=device, pool=device_pool(device, chunks[0].numel() * 4))
    for chunk in chunks:
        buffer.append(chunk)
    assert buffer.pooled == 1 and buffer._chunks[0].is_cuda and buffer._chunks[1].is_pinned()
    assert all(got.is_cuda and torch.equal(got, want) for got, want in zip(buffer, chunks))
    buffer.release()
    free, _ = torch.cuda.mem_get_info(device)
    assert device_pool(device, None, share=0.5).capacity_bytes <= free // 8 + (1 << 20)


def test_workers_sharing_a_gpu_size_their_pool_by_their_share():
    from types import SimpleNamespace

    from rankfold.execution.local import LocalExecutor
    from rankfold.execution.streaming import per_shard_config
    from rankfold.workers.shard import ShardConfig

    config = ShardConfig("unused", "float32", 1 << 20)
    ray_like = SimpleNamespace(threads_per_worker=1, device="auto", device_activations_bytes=None, gpus_per_worker=0.25)
    assert per_shard_config(config, ray_like, 2).gpu_share == 0.25
    assert per_shard_config(config, LocalExecutor(device="cpu"), 2).gpu_share == 1.0
