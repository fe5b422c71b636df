"""Kronecker-factored Gauss–Newton steps (methods/gauss_newton.py): where the loss is quadratic in one
factor (every other factor held), one full step (η = 1, almost no damping) lands on that factor's
least-squares solution — for a B, a plain A read through B, and a skipping shared projection's A′ read
through its members' B."""

from __future__ import annotations

import torch
from torch import nn

from rankfold.methods.gauss_newton import InputGrams, OutputMetrics, curvature_factors, gauss_newton_step
from rankfold.modules.lowrank import LowRankLinear
from rankfold.modules.shared import replace_group

TOKENS, IN, RANK = 96, 8, 3


def _fill(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)


def _stepped(model: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`name` after one full Gauss–Newton step on mean ‖model(x) − target‖² (every other parameter held)."""
    parameter = dict(model.named_parameters())[name]
    grams, metrics = InputGrams(model, [name]), OutputMetrics(model, [name])
    output = model(x)
    for k in range(output.shape[-1]):  # probes along every output axis: the metric exactly, not sampled
        metrics.probe(output, torch.nn.functional.one_hot(torch.full(output.shape[:-1], k), output.shape[-1]).double())
        output = model(x)
    grams.remove(), metrics.remove()
    loss = (output - target).square().sum() / x.shape[0]
    (grad,) = torch.autograd.grad(loss, [parameter])
    tokens = x.shape[0]
    factors = {key: value / tokens for key, value in curvature_factors(model, [name], grams, metrics, tokens).items()}
    step = gauss_newton_step(grad, factors[f"right.{name}"], factors.get(f"left.{name}"), damping=1e-12)
    return parameter.detach() - step


def test_a_full_step_on_b_is_its_least_squares_refit():
    module = LowRankLinear(IN, 5, RANK, bias=False, dtype=torch.float64)
    _fill(module, 0)
    x, target = torch.randn(TOKENS, IN, dtype=torch.float64), torch.randn(TOKENS, 5, dtype=torch.float64)
    z = x @ module.A.detach().T
    wanted = torch.linalg.lstsq(z, target).solution.T  # argmin_B ‖z Bᵀ − target‖
    torch.testing.assert_close(_stepped(module, "B", x, target), wanted)


def test_a_full_step_on_a_read_through_b_is_its_least_squares_fit():
    module = LowRankLinear(IN, 5, RANK, dtype=torch.float64)
    _fill(module, 1)
    x, target = torch.randn(TOKENS, IN, dtype=torch.float64), torch.randn(TOKENS, 5, dtype=torch.float64)
    b = module.B.detach()
    wanted = torch.linalg.pinv(b) @ torch.linalg.lstsq(x, target).solution.T  # B⁺ (argmin_W ‖x Wᵀ − t‖)
    torch.testing.assert_close(_stepped(module, "A", x, target), wanted)


def test_a_skipping_shared_projection_steps_to_its_fit_and_counts_its_input_once():
    root = nn.Module()
    root.q, root.k = nn.Linear(IN, 4, bias=False), nn.Linear(IN, 2, bias=False)
    replace_group(root, "shared", {"q": 4, "k": 2}, RANK, skip=True, dtype=torch.float64)
    _fill(root, 2)
    root.shared.permutation.copy_(torch.randperm(IN, generator=torch.Generator().manual_seed(3)))
    model = _Concat(root)
    x, target = torch.randn(TOKENS, IN, dtype=torch.float64), torch.randn(TOKENS, 6, dtype=torch.float64)
    kept, rest = root.shared.permutation[:RANK], root.shared.permutation[RANK:]
    b = torch.cat([root.q.B.detach(), root.k.B.detach()])  # (6, r): target ≈ (x_kept + x_rest A′ᵀ) Bᵀ
    residual = target - x[:, kept] @ b.T
    wanted = torch.linalg.pinv(b) @ torch.linalg.lstsq(x[:, rest], residual).solution.T
    torch.testing.assert_close(_stepped(model, "root.shared.A_prime", x, target), wanted)
    grams = InputGrams(model, ["root.shared.A_prime"])
    model(x)
    torch.testing.assert_close(grams.grams["root.shared"], x.T @ x)  # two members, one input: counted once


class _Concat(nn.Module):
    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.root.q(x), self.root.k(x)], dim=-1)
