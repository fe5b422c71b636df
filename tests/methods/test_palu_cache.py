"""Palu as a registered KV method: a layer's shard built by its layer_tensors from stored full-rank factors
(prefix cut, Hadamard, value folding, biases moved) runs as the same factors applied as plain k/v projections."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from rankfold.methods.kv_registry import KV_METHODS
from rankfold.methods.palu import group_factors
from rankfold.models.architecture import ARCHITECTURES
from rankfold.modules.latent_kv import LatentKVAttention
from rankfold.modules.layout import CompressedModule
from rankfold.workers.layer_state import assemble_layer_state
from rankfold.workers.layers import LayerRunner, materialize_layer, runtime_config

ARCH = ARCHITECTURES.get("llama")


@pytest.mark.parametrize("fold,hadamard,bits", [(False, False, 16), (True, True, 16), (True, True, 4)])
def test_assembled_layer_equals_the_simulated_factors(fold, hadamard, bits):
    config = LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=16, num_hidden_layers=1, attention_bias=True, vocab_size=32)
    config = runtime_config(config)  # SDPA: causal without a mask, as the streamed evaluators run layers
    torch.manual_seed(0)
    dense = {k: v * 4 if v.ndim == 2 else torch.randn_like(v) for k, v in
             ARCH.build_layer(config, 0).to_empty(device="cpu").apply(_init).state_dict().items()}
    x = torch.randn(48, 400, dtype=torch.float64)
    factor = torch.linalg.cholesky(x @ x.T)
    ranks = [8, 16, 8]
    stored = {}
    for kind, path in (("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")):
        for k, f in enumerate(group_factors(dense[f"{path}.weight"], factor, 16, 1, [16] * 3)):
            stored[f"{kind}.{k}.up"], stored[f"{kind}.{k}.down"] = f.up.float(), f.down.float()
    options = {"group_heads": 1, "key_ranks": ranks, "value_ranks": ranks, "fold_values": fold, "bits": bits,
               "group": 8, "residual": 0, "hadamard": hadamard, "value_bias": True}
    module = CompressedModule("latent_kv", ("self_attn.k_proj", "self_attn.v_proj"), 48, "self_attn", options=options)
    tensors = KV_METHODS.get("palu").layer_tensors(stored, dense, config, module)
    state = assemble_layer_state(dense, tensors, [module], torch.float32)
    assert "self_attn.k_proj.bias" not in state and "self_attn.k_bias" in state
    assert ("self_attn.v_bias" in state) != fold
    layer = materialize_layer(ARCH, config, 0, state, torch.float32, [module])
    assert isinstance(layer.self_attn, LatentKVAttention)

    simulated = copy.deepcopy(dense)
    for kind, path in (("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")):
        simulated[f"{path}.weight"] = torch.cat([stored[f"{kind}.{k}.up"][:, :r] @ stored[f"{kind}.{k}.down"][:r]
                                                 for k, r in enumerate(ranks)])
    reference = materialize_layer(ARCH, config, 0, simulated, torch.float32)
    runner, hidden = LayerRunner(ARCH, config), torch.randn(2, 10, 48)
    got, expected = runner(layer, hidden), runner(reference, hidden)
    if bits == 16:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:  # 4-bit latents: close, not equal
        error = float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected - hidden))
        assert 0 < error < 0.2, error


def _init(module):
    for parameter in module.parameters(recurse=False):
        torch.nn.init.normal_(parameter, std=0.1)
