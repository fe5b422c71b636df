"""The streamed Fisher (layer-by-layer backward from stored inputs) equals whole-model autograd."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from rankfold.allocators.flra import BATCHES_KEY, fisher_scores
from rankfold.data.source import TextSource
from rankfold.data.text import calibration_samples, load_text, tokenize
from rankfold.execution.local import LocalExecutor
from rankfold.execution.streaming import split_batches, stream_fisher
from rankfold.models.sources import ModelSource, open_source
from rankfold.workers.layers import runtime_config
from rankfold.workers.shard import ShardConfig


def whole_model(source: ModelSource) -> LlamaForCausalLM:
    """The source's model in memory, float32, SDPA attention (the reference computation)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(runtime_config(source.config))
    state = {key: source.tensor(key).float() for key in source.keys()}
    model.load_state_dict(state, strict=False, assign=True)
    if source.architecture.lm_head_key not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    source.architecture.rebuild_buffers(model, source.config)
    return model.eval()


def autograd_fisher(model: LlamaForCausalLM, ids: torch.Tensor, batch_size: int, paths: list[str]):
    """Σ over batches of (∂ℒ_b/∂W)², ℒ_b = transformers' own causal-LM loss of batch b."""
    weights = {f"model.layers.{i}.{p}": model.model.layers[i].get_submodule(p).weight
               for i in range(len(model.model.layers)) for p in paths}
    model.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    sums = {key: torch.zeros(w.shape, dtype=torch.float64) for key, w in weights.items()}
    for batch in ids.split(batch_size):
        loss = model(batch, labels=batch).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for key, grad in zip(weights, grads):
            sums[key] += grad.double().square()
    return sums


def streamed_fisher(source: ModelSource, ids: torch.Tensor, batch_size: int, workers: int, tmp_path):
    layers: dict[int, dict[str, torch.Tensor]] = {}
    config = ShardConfig(source.location, "float32", 1 << 30, str(tmp_path), "float32")
    result = stream_fisher(LocalExecutor(workers=workers), config, ids, batch_size, source.num_layers,
                           on_layer=lambda i, t: layers.__setitem__(i, t))
    return result, layers


PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def compare(reference, layers, rel: float) -> None:
    for i, tensors in layers.items():
        for path in PATHS:
            want = reference[f"model.layers.{i}.{path}"]
            torch.testing.assert_close(tensors[f"{path}.fisher"], want.sum(), rtol=rel, atol=0)
            torch.testing.assert_close(tensors[f"{path}.fisher_rows"], want.sum(1), rtol=rel, atol=want.sum() * rel / want.shape[0])
            torch.testing.assert_close(tensors[f"{path}.fisher_cols"], want.sum(0), rtol=rel, atol=want.sum() * rel / want.shape[1])


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (2, 2)])
def test_streamed_fisher_equals_whole_model_autograd_tiny(tiny_model_dir, tmp_path, batch_size, workers):
    source = open_source(tiny_model_dir)
    ids = torch.randint(0, source.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(1))
    result, layers = streamed_fisher(source, ids, batch_size, workers, tmp_path)
    assert sorted(layers) == [0, 1]
    batches = -(-5 // batch_size)
    assert result["batches"] == batches and all(int(t[BATCHES_KEY][0]) == batches for t in layers.values())
    compare(autograd_fisher(whole_model(source), ids, batch_size, PATHS), layers, rel=1e-4)
    assert not list(tmp_path.iterdir()) or not any(tmp_path.rglob("*.safetensors"))  # spills cleaned up


def test_fisher_does_not_depend_on_the_number_of_workers(tiny_model_dir, tmp_path):
    source = open_source(tiny_model_dir)
    ids = torch.randint(0, source.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(2))
    _, one = streamed_fisher(source, ids, 2, 1, tmp_path)
    _, three = streamed_fisher(source, ids, 2, 3, tmp_path)
    for i in one:
        for key in one[i]:
            torch.testing.assert_close(one[i][key], three[i][key], rtol=1e-6, atol=0)


def test_split_batches_keeps_batches_whole():
    rows = torch.arange(7)[:, None]
    parts = split_batches(rows, 2, 3)
    assert [p.flatten().tolist() for p in parts] == [[0, 1, 2, 3], [4, 5], [6]]
    assert [p.flatten().tolist() for p in split_batches(rows, 4, 5)] == [[0, 1, 2, 3], [4, 5, 6]]


def test_streamed_fisher_matches_autograd_on_smollm2(smollm2, shared_data, tmp_path):
    """The real model: 30 layers, GQA, tied head. Two batches of two 48-token sequences."""
    text = load_text(TextSource(path=shared_data / "calibration" / "enwiki_excerpt.txt"))
    ids = calibration_samples(tokenize(text, smollm2.tokenizer())[:20000], 4, 48, seed=0)
    result, layers = streamed_fisher(smollm2, ids, 2, 2, tmp_path)
    reference = autograd_fisher(whole_model(smollm2), ids, 2, PATHS)
    compare(reference, layers, rel=1e-5)  # measured: 5e-16 (the same float32 operations)
    scores = {i: fisher_scores(t) for i, t in layers.items()}
    assert all(v > 0 for s in scores.values() for v in s.values())
    assert 1.0 < result["loss"] < 10.0  # a sane next-token loss for a trained model


def test_head_group_scores_slice_rows_for_kv_and_columns_for_o(tiny_model_dir, tmp_path):
    source = open_source(tiny_model_dir)  # 4 query heads, 2 KV heads, head_dim 16
    ids = torch.randint(0, source.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    _, layers = streamed_fisher(source, ids, 1, 1, tmp_path)
    reference = autograd_fisher(whole_model(source), ids, 1, PATHS)
    from rankfold.workers.fisher_backward import head_group_scores

    k = reference["model.layers.0.self_attn.k_proj"]
    o = reference["model.layers.0.self_attn.o_proj"]
    torch.testing.assert_close(head_group_scores(layers[0], "self_attn.k_proj", slice(None), 16, 1),
                               k.reshape(2, 16, -1).sum((1, 2)) / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(head_group_scores(layers[0], "self_attn.o_proj", slice(None), 16, 2),
                               o.reshape(-1, 2, 32).sum((0, 2)) / 2, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="do not split"):
        head_group_scores(layers[0], "self_attn.k_proj", slice(None), 16, 3)


def test_fisher_sums_by_row_blocks_equal_the_whole_square(monkeypatch):
    """A gradient squared by row blocks (a 70B down_proj's float64 square is never whole) gives the sums of
    the whole square: its rows exactly, its columns and total up to float64 rounding."""
    from rankfold.workers import fisher_backward
    from rankfold.workers.fisher_backward import FisherSums

    grads = [torch.randn(37, 11, generator=torch.Generator().manual_seed(n)) for n in range(2)]
    whole, blocked = FisherSums.zeros(grads[0].shape), FisherSums.zeros(grads[0].shape)
    for grad in grads:
        whole.add_(grad)
    monkeypatch.setattr(fisher_backward, "SQUARE_BLOCK_BYTES", 5 * 8 * 11)  # blocks of 5 rows, a last of 2
    for grad in grads:
        blocked.add_(grad)
    reference = sum(grad.double().square() for grad in grads)
    assert torch.equal(blocked.rows, whole.rows)
    torch.testing.assert_close(blocked.rows, reference.sum(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(blocked.cols, reference.sum(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(blocked.total, reference.sum(), rtol=1e-14, atol=0)
