"""Perplexity's scoring a slice of positions at a time equals scoring each window whole."""

import torch
import torch.nn.functional as F
from torch import nn

from rankfold.models.architecture import OutputHead
from rankfold.workers.streamed_perplexity import window_nll


def test_scoring_in_slices_equals_scoring_whole_windows():
    torch.manual_seed(0)
    windows, seq, hidden_size, vocab = 3, 17, 8, 50
    head = OutputHead(nn.LayerNorm(hidden_size), torch.randn(vocab, hidden_size), softcap=30.0)
    hidden, ids = torch.randn(windows, seq, hidden_size), torch.randint(vocab, (windows, seq))
    whole = sum(float(F.cross_entropy(head(h[:-1]), i[1:], reduction="sum")) for h, i in zip(hidden, ids))

    for rows in (1, 5, 16, 100):  # a position per slice, slices that do not divide T − 1, one slice
        total, count = window_nll(hidden, head, ids, logits_bytes=4 * vocab * rows)
        assert count == windows * (seq - 1)
        assert abs(total - whole) <= 1e-5 * whole
