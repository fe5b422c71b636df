"""reduced_svd / singular_values: LAPACK's result unchanged on the CPU, cuSOLVER's QR driver on CUDA."""

import torch

from rankfold.methods import linalg


def test_on_the_cpu_the_factors_are_torchs_own_bit_for_bit():
    a = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(linalg.reduced_svd(a), torch.linalg.svd(a, full_matrices=False)):
        assert torch.equal(ours, theirs)
    assert torch.equal(linalg.singular_values(a), torch.linalg.svdvals(a))


class _OnCuda:
    is_cuda = True


def test_on_cuda_the_qr_driver_is_asked_for(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: calls.append(("svd", kw)))
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a, **kw: calls.append(("svdvals", kw)))
    linalg.reduced_svd(_OnCuda())
    linalg.singular_values(_OnCuda())
    assert calls == [("svd", {"full_matrices": False, "driver": "gesvd"}), ("svdvals", {"driver": "gesvd"})]
