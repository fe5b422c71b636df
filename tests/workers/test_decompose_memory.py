"""The decompose stage frees a group's Gram once it is factorised (a 70B down_proj's is 6.6 GB)."""

from __future__ import annotations

import gc
import weakref

import torch

import rankfold.methods.svd_llm as svd_llm
from rankfold.methods import group_decomposition as decompose
from rankfold.methods.statistics import InputStats
from rankfold.methods.svd_llm import SvdLlmOptions
from rankfold.modules.layout import CompressedModule


def test_gram_is_released_before_the_svd(monkeypatch):
    stats = InputStats.zeros(64)
    stats.add_(torch.randn(500, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    gram = weakref.ref(stats.gram)
    alive_at_svd = []
    factors = svd_llm.svd_llm_factors

    def spy(weight, factor, rank):
        gc.collect()
        alive_at_svd.append(gram() is not None)
        return factors(weight, factor, rank)

    monkeypatch.setattr(svd_llm, "svd_llm_factors", spy)
    weights = {"a": torch.randn(32, 64), "b": torch.randn(48, 64)}
    modules = [CompressedModule("lowrank", ("a",), 8), CompressedModule("lowrank", ("b",), 8)]
    holder = [stats]
    del stats
    result = decompose.decompose_group(SvdLlmOptions(name="svd_llm"), weights, holder.pop(), modules)
    assert alive_at_svd == [False, False]
    assert result.tensors["a.B"].shape == (32, 8) and result.tensors["b.A"].shape == (8, 64)
