"""A shard carrying two streams through the model for anchored fitting: the dense activations X and
the compressed-so-far activations X̂ of the same token sequences.

Per (layer, input group) the shard runs the dense layer on X and the layer with its groups
factorised so far on X̂, each stopped at the group's input, and returns the paired statistics
(G, Ĝ, C; methods/anchored.py) of its fitted rows and of its held-out rows apart (of X alone for a
group fitted by the plain method). Once every group of the layer is factorised, `advance_pair` moves
X through the dense layer and X̂ through the compressed one.

The dense layer's outputs are computed once per layer — by the first pass that runs the whole dense
layer (the last projection's output statistics) — and kept: the output correction, the held-out
layer-output scores and advance_pair read them instead of running the dense layer again. Three
buffers (X, X̂, the dense layer's outputs) spill past a third of the shard's memory budget each.
"""

from __future__ import annotations

import torch
from torch import nn

from rankfold.core.device import to_host
from rankfold.core.resources import release_free_heap
from rankfold.methods.anchored import CorrectionStats, OutputStats, PairedStats, relative_weights
from rankfold.modules.layout import CompressedModule
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.activations import Activations
from rankfold.workers.anchored_tasks import (
    HELDOUT,
    PAIRED,
    AnchoredItem,
    CorrectionItem,
    KeepItem,
    anchored_item,
    correction_item,
    fit_candidates,
    keep_candidate,
)
from rankfold.workers.layer_state import assemble_layer_state
from rankfold.workers.layer_statistics import check_finite
from rankfold.workers.layers import LayerRunner, materialize_layer
from rankfold.workers.shard import SequenceShard, ShardConfig


class _Captured(Exception):
    """Raised by the capture hook: the rest of the layer is not needed."""


def capture_input(layer: nn.Module, path: str, runner: LayerRunner, hidden: torch.Tensor) -> torch.Tensor:
    """The input the linear at `path` reads when `layer` runs on `hidden` (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        raise _Captured

    handle = layer.get_submodule(path).register_forward_pre_hook(hook)
    try:
        runner(layer, hidden)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the layer's forward never reached {path}")
    return seen[0]


def residual_at(layer: nn.Module, point: str | None, runner: LayerRunner, hidden: torch.Tensor) -> torch.Tensor:
    """The residual stream `layer` gives at `point` on `hidden`: the input of the module at `point`
    (the forward stops there; e.g. post_attention_layernorm: the residual after attention), or the
    layer's output (None)."""
    return runner(layer, hidden) if point is None else capture_input(layer, point, runner, hidden)


def adds_to_residual(layer: nn.Module, module: nn.Module, runner: LayerRunner, hidden: torch.Tensor,
                     point: str | None = None) -> bool:
    """Whether the residual at `point` (residual_at) moves by exactly δ when `module`'s output moves by δ (a
    pre-norm block's output projection; not behind Gemma's post-norms or Granite's scaled residual)."""
    delta = torch.randn(hidden.shape[:-1] + (module.out_features,), generator=torch.Generator().manual_seed(0),
                        dtype=hidden.dtype).to(hidden.device)  # drawn on the CPU: the same δ on every device
    handle = module.register_forward_hook(lambda _m, _a, output: output + delta)
    try:
        moved = residual_at(layer, point, runner, hidden)
    finally:
        handle.remove()
    return bool(torch.allclose(moved - residual_at(layer, point, runner, hidden), delta, rtol=1e-3,
                               atol=1e-3 * float(delta.abs().max())))


def dense_side(dense: nn.Module, path: str, point: str | None, runner: LayerRunner,
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the dense residual at `point` (residual_at), the input of the projection at `path` on the way there)."""
    seen: list[torch.Tensor] = []
    handle = dense.get_submodule(path).register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        residual = residual_at(dense, point, runner, x)
    finally:
        handle.remove()
    return residual, seen[0]


def wanted_output(dense: nn.Module, compressed: nn.Module, path: str, point: str | None, runner: LayerRunner,
                  x: torch.Tensor, x_hat: torch.Tensor,
                  dense_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, x̂) of the projection y = W′ x̂ + bias at `path` of `compressed` (dense or factorised): e = dense
    residual at `point` − (compressed residual there − y) − bias, the output the projection should give
    for the two streams to agree there (residual_at: `point` None is the layer's output), and its input
    x̂ in the compressed stream. Shapes (..., out_features), (..., in_features). `dense_residual`: the
    dense residual at `point`, when already computed."""
    module = compressed.get_submodule(path)
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        seen["x"], seen["y"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        target = residual_at(dense, point, runner, x) if dense_residual is None else dense_residual
        wanted = target - residual_at(compressed, point, runner, x_hat) + seen["y"]
    finally:
        handle.remove()
    return (wanted - module.bias if module.bias is not None else wanted), seen["x"]


def correction_pair(dense: nn.Module, compressed: nn.Module, path: str, point: str | None, runner: LayerRunner,
                    x: torch.Tensor, x_hat: torch.Tensor,
                    dense_residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, u) of the output correction of the factorised projection y = B A x̂ + bias at `path`: e as
    wanted_output, u = A x̂ its latent. Shapes (..., out_features), (..., rank)."""
    wanted, inputs = wanted_output(dense, compressed, path, point, runner, x, x_hat, dense_residual)
    return wanted, nn.functional.linear(inputs, compressed.get_submodule(path).factors()[1])


class AnchoredShard(SequenceShard):
    def __init__(self, config: ShardConfig):
        super().__init__(config)
        self.budget_bytes //= 3  # the two streams and the dense layer's outputs share the shard's budget
        self.compressed: Activations | None = None
        self.heldout_rows = 0
        self.relative = False  # fitting.token_weights "relative": errors toward a residual weighted per token
        self._dense: tuple[int, nn.Module] | None = None  # (layer index, its dense module), reused per group
        self._dense_outputs: tuple[int, Activations] | None = None  # (layer index, dense layer(X) per chunk)
        self._refining: tuple[int, nn.Module] | None = None  # (layer index, the compressed layer being refined)

    def load(self, ids: torch.Tensor, batch_size: int, heldout_rows: int = 0, relative: bool = False) -> int:
        """Embed (samples, seq) ids into both streams; the last `heldout_rows` rows are held out. `relative`
        (fitting.token_weights): every fit and score toward a dense residual weighs a token's squared error
        by methods.anchored.relative_weights of that residual."""
        tokens = super().load(ids, batch_size)
        self.relative = relative
        self.compressed = self.activations(self.budget_bytes)
        for chunk in self.hidden:
            self.compressed.append(chunk)
        self.heldout_rows = heldout_rows
        return tokens

    @property
    def fitted_rows(self) -> int:
        """This shard's rows that are fitted (not held out): the first ones."""
        return self.ids.shape[0] - self.heldout_rows

    def _layer(self, index: int, layout: list[dict], store: StoreRef | None, keys: list[str]) -> nn.Module:
        """Layer `index` with the modules of `layout` built from the factors under `keys` (dense without)."""
        state = self.source.layer_state(index)
        if not layout:
            return materialize_layer(self.source.architecture, self.config, index, state, self.dtype, device=self.device)
        modules = [CompressedModule.from_json(m) for m in layout]
        fragment: dict[str, torch.Tensor] = {}
        for key in keys:
            fragment.update(open_ref(store).get_tensors(key))
        state = assemble_layer_state(state, fragment, modules, self.dtype)
        return materialize_layer(self.source.architecture, self.config, index, state, self.dtype, layout=modules,
                                 device=self.device)

    def _dense_layer(self, index: int) -> nn.Module:
        if self._dense is None or self._dense[0] != index:  # read ahead by the previous advance_pair
            state = self.weights.state(index)
            self._dense = (index, materialize_layer(self.source.architecture, self.config, index, state, self.dtype,
                                                    device=self.device))
        return self._dense[1]

    def paired_stats(self, index: int, group: str, reader: str, layout: list[dict], store: StoreRef | None,
                     keys: list[str], dense_only: bool = False) -> dict[str, torch.Tensor]:
        """Paired statistics of `group` (its first member at `reader`) at layer `index`, the compressed
        stream running the layer with `layout` (the groups factorised so far, factors under `keys`).
        Returns `<group>.*` of the fitted rows and `heldout.<group>.*` of the held-out rows. `dense_only`
        (the group fitted by the plain method, w = 1): X's statistics alone (PairedStats.add_dense_), the
        compressed stream not run."""
        dense = self._dense_layer(index)
        compressed = None if dense_only else self._layer(index, layout, store, keys)
        fitted, heldout = None, None
        first = self.fitted_rows
        with torch.no_grad():
            for k, (x, x_hat) in enumerate(zip(self.hidden, self.compressed, strict=True)):
                inputs = capture_input(dense, reader, self.runner, x)
                if fitted is None:
                    zeros = PairedStats.dense_zeros if dense_only else PairedStats.zeros
                    fitted, heldout = zeros(inputs.shape[-1], inputs.device), zeros(inputs.shape[-1], inputs.device)
                split = min(max(first - k * self.batch_size, 0), x.shape[0])  # rows of this chunk that are fitted
                if dense_only:
                    fitted.add_dense_(inputs[:split], self.product_dtype)
                    heldout.add_dense_(inputs[split:], self.product_dtype)
                    continue
                inputs_hat = capture_input(compressed, reader, self.runner, x_hat)
                fitted.add_(inputs[:split], inputs_hat[:split], self.product_dtype)
                heldout.add_(inputs[split:], inputs_hat[split:], self.product_dtype)
        return to_host({**fitted.to_tensors(group), **heldout.to_tensors(HELDOUT + group)})

    def fit(self, item: AnchoredItem) -> tuple[dict[str, dict[str, float]], str, str]:
        """anchored_item run in this shard's worker (the walk's shards hold the workers)."""
        return anchored_item(item)

    def fit_candidates(self, item: AnchoredItem) -> list[float]:
        """anchored_tasks.fit_candidates run in this shard's worker."""
        return fit_candidates(item)

    def keep(self, item: KeepItem) -> tuple[dict[str, dict[str, float]], str, str]:
        """anchored_tasks.keep_candidate run in this shard's worker."""
        return keep_candidate(item)

    def _heldout(self, buffer: Activations):
        """(chunk index, the chunk's held-out rows) of `buffer`, for the chunks that have any."""
        first = self.fitted_rows
        for k, chunk in enumerate(buffer):
            split = min(max(first - k * self.batch_size, 0), chunk.shape[0])
            if split < chunk.shape[0]:
                yield k, chunk[split:]

    def heldout_output_error(self, index: int, layout: list[dict], store: StoreRef | None,
                             keys: list[str], params: dict[str, torch.Tensor] | None = None) -> float:
        """Σ ‖dense layer(X_h) − compressed layer(X̂_h)‖² (float64) over this shard's held-out rows, layer
        `index` compressed with `layout` (factors under `keys`, those named in `params` replaced by its
        tensors: the refinement's): the layer-output choice's score."""
        if not self.heldout_rows:
            return 0.0
        total = 0.0
        compressed = self._layer(index, layout, store, keys) if params is None else self._refined(
            index, layout, store, keys, params)
        with torch.no_grad():
            wanted = self._heldout(self.dense_outputs(index))
            for (_, x_hat), (_, dense) in zip(self._heldout(self.compressed), wanted, strict=True):
                total += float(self._weighted_error(self.runner(compressed, x_hat), dense))
        return total

    def dense_outputs(self, index: int) -> Activations:
        """The dense layer `index`'s outputs on X, chunk by chunk: computed by the first pass that needs them
        (here, or the last projection's output statistics: _output_sums) and kept until advance_pair."""
        if self._dense_outputs is None or self._dense_outputs[0] != index:
            outputs, dense = self._new_outputs(index), self._dense_layer(index)
            with torch.no_grad():
                for chunk in self.hidden:
                    outputs.append(self._checked(index, self.runner(dense, chunk)))
            self._dense_outputs = (index, outputs)
        return self._dense_outputs[1]

    @staticmethod
    def _checked(index: int, outputs: torch.Tensor) -> torch.Tensor:
        check_finite(outputs, f"layer {index} (dense stream of the anchored walk)")
        return outputs

    def _new_outputs(self, index: int) -> Activations:
        """An empty buffer for the dense layer `index`'s outputs, the one it replaces (an earlier layer's) released."""
        if self._dense_outputs is not None:
            self._dense_outputs[1].release()
            self._dense_outputs = None
        return self.activations(self.budget_bytes)

    def _weighted_error(self, output: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Σ‖output − wanted‖² over tokens (float64), each token's weighted by relative_weights(wanted) when
        the shard's errors are relative; differentiable in `output`."""
        squared = (output - wanted).double().square()
        return squared.sum() if not self.relative else (squared.sum(-1) * relative_weights(wanted)).sum()

    def _refined(self, index: int, layout: list[dict], store: StoreRef | None, keys: list[str],
                 params: dict[str, torch.Tensor]) -> nn.Module:
        """Layer `index` compressed (built once per layer), its tensors named in `params` set to those."""
        if self._refining is None or self._refining[0] != index:
            self._refining = (index, self._layer(index, layout, store, keys))
        layer = self._refining[1]
        unexpected = layer.load_state_dict(params, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"layer {index}: refined tensors {sorted(unexpected)} are not the layer's")
        return layer

    def _fitted_window(self, index: int, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense layer `index`(X), X̂) of `rows` fitted rows (not held out), the window of step `step` cycling
        through them."""
        fitted = self.fitted_rows
        picked = [(step * min(rows, fitted) + j) % fitted for j in range(min(rows, fitted))]
        by_chunk: dict[int, list[int]] = {}
        for row in picked:
            by_chunk.setdefault(row // self.batch_size, []).append(row % self.batch_size)
        outputs = self.dense_outputs(index)
        wanted = torch.cat([outputs[k][within] for k, within in sorted(by_chunk.items())])
        x_hat = torch.cat([self.compressed[k][within] for k, within in sorted(by_chunk.items())])
        return wanted, x_hat

    def refine_gradients(self, index: int, layout: list[dict], store: StoreRef | None, keys: list[str],
                         params: dict[str, torch.Tensor], step: int, rows: int) -> dict[str, torch.Tensor]:
        """fitting.refine's step on this shard: the gradient of Σ‖layer′(X̂) − layer(X)‖² (layer′: layer
        `index` compressed with `layout`, its tensors in `params` set to those) over this step's `rows`
        fitted rows (_fitted_window), run `batch_size` rows at a time. Returns `grad.<name>` (float32, the
        tensor's shape; zero where it had no gradient) for each of `params` that is a parameter of the
        layer (a buffer, e.g. a skip permutation, gets none), `refine.error` (float64, (1,)) and
        `refine.tokens` (int64, (1,)): partial sums the walk reduces. With relative errors each token's squared
        error is weighted (_weighted_error)."""
        layer = self._refined(index, layout, store, keys, params)
        named = dict(layer.named_parameters(remove_duplicate=False))
        for name, parameter in named.items():
            parameter.requires_grad_(name in params)
            parameter.grad = None
        error, tokens = torch.zeros((), dtype=torch.float64), 0
        if self.fitted_rows:  # a shard of held-out rows only adds zeros
            wanted, x_hat = self._fitted_window(index, step, rows)
            for start in range(0, x_hat.shape[0], self.batch_size):  # batch_size rows a backward: its memory bounded
                with torch.enable_grad():
                    part = self._weighted_error(self.runner.run(layer, x_hat[start:start + self.batch_size]),
                                                wanted[start:start + self.batch_size])
                    part.backward()  # gradients add up in .grad
                error += float(part.detach())
            tokens = x_hat.shape[0] * x_hat.shape[1]
        for parameter in named.values():
            parameter.requires_grad_(False)
        grads = {f"grad.{name}": (named[name].grad.float() if named[name].grad is not None
                                  else torch.zeros(named[name].shape)) for name in params if name in named}
        return to_host({**grads, "refine.error": error.reshape(1),
                        "refine.tokens": torch.tensor([tokens], dtype=torch.int64)})

    def correct(self, item: CorrectionItem) -> tuple[dict[str, dict[str, float]], str, str]:
        """correction_item run in this shard's worker."""
        return correction_item(item)

    def correction_stats(self, index: int, path: str, layout: list[dict], store: StoreRef | None,
                         keys: list[str], point: str | None = None) -> dict[str, torch.Tensor]:
        """The output correction's statistics (methods/anchored.py CorrectionStats) of the projection at
        `path` of layer `index` compressed with `layout` (factors under `keys`), toward the dense residual
        at `point` (correction_pair; None: the layer's output). Returns `correction.*` of the fitted rows,
        `heldout.correction.*` of the held-out rows, and `correction.linear` (1 when the residual there
        moves with the projection's output unchanged, checked by moving it: else a correction of B cannot
        be solved for in closed form)."""
        return self._output_sums("correction", index, path, layout, store, keys, point)

    def output_stats(self, index: int, path: str, layout: list[dict], store: StoreRef | None,
                     keys: list[str], point: str | None = None) -> dict[str, torch.Tensor]:
        """fitting.output_mix's statistics (methods/anchored.py OutputStats: e and the projection's input
        x̂, wanted_output) of the still dense projection at `path` toward the dense residual at `point`
        (None: the layer output; the projection is the layer's last); the rest of layer `index` compressed
        with `layout` (factors under `keys`).
        Returns `output.*` and `heldout.output.*` (linearity: output_is_linear, checked by the walk first); with
        relative errors also the problem's PairedStats of the projection's input, weighted alike, as
        `output.paired.*` and `heldout.output.paired.*` (they replace the group's paired statistics)."""
        return self._output_sums("output", index, path, layout, store, keys, point)

    def output_is_linear(self, index: int, path: str, layout: list[dict], store: StoreRef | None,
                         keys: list[str], point: str | None = None) -> bool:
        """Whether the dense residual at `point` (None: the layer's output) moves exactly with the output of
        the projection at `path` (layer `index` compressed with `layout`): where it does not,
        fitting.output_mix does not apply."""
        compressed = self._layer(index, layout, store, keys)
        with torch.no_grad():
            return adds_to_residual(compressed, compressed.get_submodule(path), self.runner,
                                    next(iter(self.compressed)), point)

    def _output_sums(self, kind: str, index: int, path: str, layout: list[dict], store: StoreRef | None,
                     keys: list[str], point: str | None) -> dict[str, torch.Tensor]:
        compressed = self._layer(index, layout, store, keys)
        module = compressed.get_submodule(path)
        pair, stats = (correction_pair, CorrectionStats) if kind == "correction" else (wanted_output, OutputStats)
        first, fitted, heldout, paired = self.fitted_rows, None, None, None
        with torch.no_grad():
            for k, (residual, dense_input, x_hat) in enumerate(self._dense_side(index, path, point, kind == "output")):
                wanted, inputs = pair(None, compressed, path, point, self.runner, None, x_hat, residual)
                if fitted is None:
                    fitted, heldout = (stats.zeros(wanted.shape[-1], inputs.shape[-1], wanted.device) for _ in range(2))
                split = min(max(first - k * self.batch_size, 0), x_hat.shape[0])
                if self.relative:  # rows scaled by √c: every sum below is weighted by c
                    scale = relative_weights(residual).sqrt().unsqueeze(-1)
                    wanted, inputs = wanted * scale.to(wanted.dtype), inputs * scale.to(inputs.dtype)
                    dense_input = None if dense_input is None else dense_input * scale.to(dense_input.dtype)
                if kind == "output":  # the problem's own paired statistics (its plain term and Ĝ weighted alike)
                    paired = paired or [PairedStats.zeros(inputs.shape[-1], inputs.device) for _ in range(2)]
                    paired[0].add_(dense_input[:split], inputs[:split], self.product_dtype)
                    paired[1].add_(dense_input[split:], inputs[split:], self.product_dtype)
                fitted.add_(wanted[:split], inputs[:split], self.product_dtype)
                heldout.add_(wanted[split:], inputs[split:], self.product_dtype)
        sums = {**fitted.to_tensors(kind), **heldout.to_tensors(HELDOUT + kind)}
        if paired is not None:
            sums.update({**paired[0].to_tensors(PAIRED), **paired[1].to_tensors(HELDOUT + PAIRED)})
        if kind == "correction":  # output_stats: the walk checked output_is_linear before gathering them
            linear = adds_to_residual(compressed, module, self.runner, next(iter(self.compressed)), point)
            sums["correction.linear"] = torch.tensor([int(linear)])
        return to_host(sums)

    def _dense_side(self, index: int, path: str, point: str | None, with_input: bool):
        """Per chunk: (the dense residual at `point`, the input of the projection at `path` when `with_input`
        else None, X̂'s chunk). The layer's outputs (point None) come from dense_outputs when kept; a pass
        that runs the whole dense layer keeps them for the rest of the layer."""
        kept = self._dense_outputs is not None and self._dense_outputs[0] == index
        if point is None and kept and not with_input:
            yield from zip(self.dense_outputs(index), [None] * len(self.compressed), self.compressed, strict=True)
            return
        outputs = self._new_outputs(index) if point is None and not kept else None
        dense = self._dense_layer(index)
        for x, x_hat in zip(self.hidden, self.compressed, strict=True):
            residual, dense_input = dense_side(dense, path, point, self.runner, x)
            if outputs is not None:
                outputs.append(self._checked(index, residual))
            yield residual, dense_input, x_hat
        if outputs is not None:
            self._dense_outputs = (index, outputs)

    def advance_pair(self, index: int, layout: list[dict], store: StoreRef | None, keys: list[str],
                     keep_outputs: bool = True) -> int:
        """X through the dense layer `index` (its kept outputs: dense_outputs), X̂ through it compressed
        (`layout`, factors under `keys`). Returns the tokens run."""
        compressed = self._layer(index, layout, store, keys)
        if keep_outputs:
            self.weights.prefetch(index + 1)  # read while the compressed stream runs through this layer
            dense_outputs = self.dense_outputs(index)
            self._dense_outputs = None
        self.hidden.release()
        self.hidden = dense_outputs if keep_outputs else None
        outputs = self.activations(self.budget_bytes) if keep_outputs else None
        with torch.no_grad():
            for chunk in self.compressed:
                hidden = self.runner(compressed, chunk)
                check_finite(hidden, f"layer {index} (compressed stream of the anchored walk)")
                if outputs is not None:
                    outputs.append(hidden)
        self.compressed.release()
        self.compressed = outputs
        self._release_layer()
        return int(self.ids.numel())

    def _release_layer(self) -> None:
        """Forget the layer's dense module, kept dense outputs and refined layer."""
        if self._dense_outputs is not None:
            self._dense_outputs[1].release()
        self._dense = self._dense_outputs = self._refining = None
        release_free_heap()  # the layer's forward temporaries: not held in RSS for the rest of the walk

    def release(self) -> float:
        if self.compressed is not None:
            self.compressed.release()
            self.compressed = None
        self._release_layer()
        return super().release()
