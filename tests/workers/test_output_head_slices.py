"""Scoring and the Fisher head a slice of positions at a time equal the whole window or batch at once."""

import torch
import torch.nn.functional as F
from torch import nn

from rankfold.models.architecture import OutputHead
from rankfold.workers.fisher_backward import head_gradient
from rankfold.workers.streamed_perplexity import window_nll


def test_scoring_in_slices_equals_scoring_whole_windows():
    torch.manual_seed(0)
    windows, seq, hidden_size, vocab = 3, 17, 8, 50
    head = OutputHead(nn.LayerNorm(hidden_size), torch.randn(vocab, hidden_size), softcap=30.0)
    hidden, ids = torch.randn(windows, seq, hidden_size), torch.randint(vocab, (windows, seq))
    with torch.no_grad():
        whole = sum(float(F.cross_entropy(head(h[:-1]), i[1:], reduction="sum")) for h, i in zip(hidden, ids))

    for rows in (1, 5, 16, 100):  # a position per slice, slices that do not divide T − 1, one slice
        total, count = window_nll(hidden, head, ids, logits_bytes=4 * vocab * rows)
        assert count == windows * (seq - 1)
        assert abs(total - whole) <= 1e-5 * whole


def test_fisher_head_gradient_in_slices_equals_the_whole_batchs():
    torch.manual_seed(1)
    batch, seq, hidden_size, vocab = 2, 9, 8, 40
    head = OutputHead(nn.LayerNorm(hidden_size), torch.randn(vocab, hidden_size), softcap=None)
    hidden, ids = torch.randn(batch, seq, hidden_size), torch.randint(vocab, (batch, seq))
    reference = hidden.clone().requires_grad_(True)
    loss = F.cross_entropy(head(reference[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1))
    (expected,) = torch.autograd.grad(loss, reference)
    loss = float(loss.detach())

    for rows in (1, 3, 7, 16, 64):
        value, grad = head_gradient(hidden, head, ids, logits_bytes=4 * vocab * rows)
        assert abs(value - loss) <= 1e-6 * loss
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
        assert not grad[:, -1].any()  # the last position predicts nothing
