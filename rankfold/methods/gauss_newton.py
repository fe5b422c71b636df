"""Kronecker-factored Gauss–Newton steps for a compressed layer's factors (fitting.refine's
`optimizer: gauss_newton`).

The refinement minimises ℓ = (1/T) Σ‖layer′(x̂) − layer(x)‖² over T tokens. For a factor P (out, in)
applied as y = P u, the Gauss–Newton curvature of ℓ in P is approximated as 2 L ⊗ R (K-FAC, Martens &
Grosse 2015, eq. 1 with the loss's own output metric): R = (1/T) Σ u uᵀ, the Gram of P's input, and L
the metric of P's output as the module passes it on — Σ_c B_cᵀ B_c for a projection A whose latent the
members B_c read, I for a B (its output leaves the module). The step −η L⁻¹ ∇ℓ R⁻¹ / 2 is, for η = 1 and
a B whose output is the layer's, the least-squares refit of that B on the batch; the nonlinearities
between a module and the layer output (softmax, the MLP's gate) are what L leaves out.

Why not Adam: whitened factors scale their columns inversely to their inputs' sizes, so one rate is
too large for some entries and too small for others (docs/methods/anchored.md, Local refinement);
R⁻¹ undoes exactly that scaling.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from rankfold.modules.shared import SharedProjection


class InputGrams:
    """Σ u uᵀ (float64) of the input u of every module that owns one of `names` (parameter names of
    `layer`, e.g. "mlp.down_proj.B"), gathered by forward pre-hooks while the layer runs; an input
    tensor a module is called with again (a shared projection's members) counts once. Zeros before any
    call (a shard with no rows to fit adds nothing, with the same shapes). `remove()` drops the hooks."""

    def __init__(self, layer: nn.Module, names: list[str]):
        owners = {name.rpartition(".")[0] for name in names}
        modules = [(path, module) for path, module in layer.named_modules() if path in owners]
        self.grams = {path: torch.zeros(m.in_features, m.in_features, dtype=torch.float64,
                                        device=next(m.parameters()).device)
                      for path, m in modules if isinstance(getattr(m, "in_features", None), int)}
        self._last: dict[str, weakref.ref] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(path)) for path, module in modules
                         if path in self.grams]

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last.get(path)
            if last is not None and last() is x:
                return
            self._last[path] = weakref.ref(x)
            u = x.detach().reshape(-1, x.shape[-1]).double()
            self.grams[path].add_(u.T @ u)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def curvature_factors(layer: nn.Module, names: list[str], grams: dict[str, torch.Tensor],
                      tokens: int) -> dict[str, torch.Tensor]:
    """K-FAC factors of each parameter in `names` (module docstring): `right.<name>` (in, in) float64,
    the Gram of its input summed over `tokens` tokens (a bias: (1, 1), the token count), linear in the
    data so shards' factors add up; `left.<name>` (out, out) float64 for a projection read through
    factors B: `tokens` × Σ_c B_cᵀ B_c, weighted so that the shards' sum over their tokens is the mean
    (a shard without rows adds zeros). A parameter of another kind (a sparse part, a
    dense weight) gets neither: the Gauss–Newton step leaves it as it is."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        module = layer.get_submodule(path)
        gram = grams.get(path)
        if gram is None:
            continue
        if attr == "bias":
            out[f"right.{name}"] = torch.tensor([[float(tokens)]], dtype=torch.float64)
        elif attr == "B" and hasattr(module, "factors"):
            a = module.factors()[1].detach().double()  # (rank, in): the latent's map, a skip's identity included
            out[f"right.{name}"] = a @ gram @ a.T
        elif attr in ("A", "A_prime"):
            readers = module._members if isinstance(module, SharedProjection) else [module]
            out[f"left.{name}"] = tokens * sum(m.B.detach().double().T @ m.B.detach().double() for m in readers)
            if attr == "A_prime":  # reads the permuted inputs past the identity block
                rest = module.permutation[module.rank:]
                gram = gram[rest][:, rest]
            out[f"right.{name}"] = gram
    return out


def gauss_newton_step(grad: torch.Tensor, right: torch.Tensor, left: torch.Tensor | None,
                      damping: float) -> torch.Tensor:
    """The step direction L⁻¹ ∇ℓ R⁻¹ / 2 (to be subtracted, times the rate η) for a parameter of
    `grad`'s shape (out, in) or (out,) (a bias): `right` (in, in) and `left` (out, out) the mean factors,
    each damped by `damping` × its mean diagonal (Tikhonov: a few tokens leave R singular). float64
    solves, returned in grad's dtype."""
    g = grad.double().reshape(grad.shape[0], -1)
    g = torch.linalg.solve(_damped(right, damping), g.T).T
    if left is not None:
        g = torch.linalg.solve(_damped(left, damping), g)
    return (g / 2).reshape(grad.shape).to(grad.dtype)


def _damped(factor: torch.Tensor, damping: float) -> torch.Tensor:
    scale = float(factor.diagonal().mean()) if factor.numel() else 0.0
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return factor + (damping * scale if scale > 0 else damping) * eye
