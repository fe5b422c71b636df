"""Kronecker-factored Gauss–Newton steps for a compressed layer's factors (fitting.refine's
`optimizer: gauss_newton`).

The refinement minimises ℓ = (1/T) Σ‖f(x̂) − layer(x)‖² over T tokens, f the compressed layer. For a
factor P (out, in) applied as y = P u, the Gauss–Newton curvature of ℓ in P is approximated as 2 L ⊗ R
(K-FAC, Martens & Grosse 2015, §3; the Gauss–Newton form of Botev et al. 2017): R = (1/T) Σ u uᵀ, the
Gram of P's input, and L = (1/T) Σ JᵀJ, the metric of P's output y as the rest of the layer maps it to
the layer output (J = ∂f/∂y: through attention's softmax, the MLP's gate, the residual). L is estimated
by probes — g = Jᵀε for ε ~ N(0, I) at the layer output has E[g gᵀ] = JᵀJ — one backward per batch.
The step −η L⁻¹ ∇ℓ R⁻¹ / 2 is, for η = 1 and a factor the loss is quadratic in (every other held), that
factor's least-squares fit on the batch.

Why not Adam: whitened factors scale their columns inversely to their inputs' sizes and the modules'
outputs reach the layer output at very different gains (a query through the softmax, down_proj
directly), so one rate is too large for some entries and too small for others (docs/methods/anchored.md,
Local refinement). Why not L = I: measured — a step that ignores J overshoots wherever the layer
amplifies a module's output (on SmolLM2 every held-out check was worse than the start).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from rankfold.modules.shared import SharedProjection


# Projections whose outputs attention mixes across tokens before they reach the layer output. Per-token
# Kronecker factors treat each token's output as reaching the layer output on its own; where a query
# attends to many similar tokens their values add up coherently and the true curvature is larger by about
# the number attended, so the step overshoots (measured on the tiny model: one full step on v_proj's B,
# a factor the loss is quadratic in, raised the fitted error 5×).
TOKEN_MIXING = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj"})


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


class OutputMetrics:
    """Σ g gᵀ (float64) at the output of each factor in `names`, g the probe gradients (module
    docstring): `outputs[path]` of a module owning a B (and its bias), over its output (out, out);
    `latents[path]` of a projection A / A′, over its latent z = A u (rank, rank), g_z = Σ_c g_c B_c over
    the members c reading z. Forward hooks
    keep the modules' latest outputs; `probe(output, direction)` backpropagates ⟨output, direction⟩ to
    them (parameters' .grad untouched). Zeros before any probe. `remove()` drops the hooks."""

    def __init__(self, layer: nn.Module, names: list[str]):
        paths = {id(module): path for path, module in layer.named_modules()}
        self.readers: dict[str, list[str]] = {}  # A's owner -> the paths of the modules reading its latent
        for name in names:
            path, _, attr = name.rpartition(".")
            if attr in ("A", "A_prime"):
                module = layer.get_submodule(path)
                owners = module._members if isinstance(module, SharedProjection) else [module]
                self.readers[path] = [paths[id(m)] for m in owners]
        hooked = {name.rpartition(".")[0] for name in names if name.rpartition(".")[2] in ("B", "bias")}
        hooked |= {p for readers in self.readers.values() for p in readers}
        self._modules = {path: layer.get_submodule(path) for path in hooked}
        self.outputs = {path: _zeros(m.out_features, m.B) for path, m in self._modules.items()}
        self.latents = {path: _zeros(self._modules[r[0]].B.shape[1], self._modules[r[0]].B)
                        for path, r in self.readers.items()}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(path)) for path, m in self._modules.items()]

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._outputs[path] = output
        return hook

    def probe(self, output: torch.Tensor, direction: torch.Tensor) -> None:
        """Add the metrics of one probe: `direction` (output's shape) backpropagated from `output` to the
        modules' outputs of the forward that made it (the graph is retained for the loss's backward)."""
        paths = [p for p in self._modules if self._outputs.get(p) is not None and self._outputs[p].requires_grad]
        grads = torch.autograd.grad(output, [self._outputs[p] for p in paths], grad_outputs=direction,
                                    retain_graph=True, allow_unused=True)
        found = {p: g.reshape(-1, g.shape[-1]).double() for p, g in zip(paths, grads) if g is not None}
        for path, g in found.items():
            self.outputs[path].add_(g.T @ g)
        for path, readers in self.readers.items():
            parts = [found[r] @ self._modules[r].B.detach().double() for r in readers if r in found]
            if parts:
                latent = sum(parts)
                self.latents[path].add_(latent.T @ latent)
        self._outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _zeros(width: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(width, width, dtype=torch.float64, device=like.device)


def curvature_factors(layer: nn.Module, names: list[str], grams: InputGrams, metrics: OutputMetrics,
                      tokens: int) -> dict[str, torch.Tensor]:
    """K-FAC factors of each parameter in `names` (module docstring), sums over `tokens` tokens so
    shards' factors add up (a shard without rows adds zeros): `right.<name>` (in, in) float64, the Gram
    of its input (`grams`: InputGrams'; a bias: (1, 1), the token count), and `left.<name>` (out, out)
    float64, its output's metric (OutputMetrics.outputs or .latents). A parameter of another kind (a sparse
    part, a dense weight) gets neither, nor does one whose output attention mixes across tokens (q, k, v
    and a projection they read: TOKEN_MIXING): the Gauss–Newton step leaves it as it is."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        readers = metrics.readers.get(path, [path]) if attr in ("A", "A_prime") else [path]
        if any(reader.rpartition(".")[2] in TOKEN_MIXING for reader in readers):
            continue
        module, gram = layer.get_submodule(path), grams.grams.get(path)
        metric = (metrics.latents if attr in ("A", "A_prime") else metrics.outputs).get(path)
        if gram is None or metric is None:
            continue
        if attr == "bias":
            out[f"right.{name}"] = torch.tensor([[float(tokens)]], dtype=torch.float64, device=gram.device)
        elif attr == "B" and hasattr(module, "factors"):
            a = module.factors()[1].detach().double()  # (rank, in): the latent's map, a skip's identity included
            out[f"right.{name}"] = a @ gram @ a.T
        elif attr == "A_prime":  # reads the permuted inputs past the identity block
            rest = module.permutation[module.rank:]
            out[f"right.{name}"] = gram[rest][:, rest]
        elif attr == "A":
            out[f"right.{name}"] = gram
        else:
            continue
        out[f"left.{name}"] = metric
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
