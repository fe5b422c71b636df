"""The servable forms of a compressed model: every compressed matrix as plain low-rank factors
(`lowrank`: kind 'factored', two nn.Linear that vLLM's Transformers backend runs on its own GEMMs, or
a shared projection kept shared) or multiplied out (`dense`: W = B A, the family's own dense model,
loadable and servable anywhere).

What each structure becomes (exact unless said):
- low rank B A: the same factors, as two nn.Linear.
- a projection shared by several members (SkipCat's Cat): kept shared — one A, a B per member (kind
  'shared' without skip), which vLLM serves; copying A into every member would store and compute it
  once per member (SkipCat 20 % on SmolLM2: 610 MB, more than the dense 538 MB).
- a skip projection: A = [I A′]·P written out (r·n numbers instead of r·(n − r)): a buffer-free form.
- low rank + sparse with entries in S: not a product of two factors: written dense (W = B A + S).
- Palu's latent KV attention (values not folded): K = blockdiag(L_k) R_k x + b_k and V likewise, as
  plain k_proj / v_proj; the cache then holds full keys and values, so the latent cache's memory saving
  and its quantisation are gone (logits equal the latent model's when its cache is unquantised).
  Folded values (o_proj′ = W_o L_v) have no v_proj to write: ExportError; so have a family's k and v
  that are rows of a fused qkv_proj (Phi-3).
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rankfold.checkpoint import CheckpointError, compressed_layout
from rankfold.models.architecture import architecture_for
from rankfold.modules.experts import fuse_split_experts
from rankfold.modules.layout import CompressedModule
from rankfold.modules.transformers_hook import PREFIX, compressed_config

# A compressed linear as (B, A, bias), or (W, None, bias) where it is not a product of two factors.
Parts = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class ExportError(CheckpointError):
    """A model that cannot be written in the asked form: names the module and why."""


def plain_parts(model: PreTrainedModel, layout: list[CompressedModule]) -> dict[str, Parts]:
    """Every compressed linear of `model` (full path) as Parts; a latent-KV attention's k_proj and v_proj too."""
    parts = {}
    fused = architecture_for(model.config).part_rows("self_attn.k_proj")[0]  # Phi-3: qkv_proj
    for entry in layout:
        if not entry.handler.linear:
            attention = model.get_submodule(entry.shared_path)
            if not hasattr(attention, "projection_factors"):
                raise ExportError(f"{entry.shared_path}: a {entry.kind} module has no plain projections to write")
            if not fused.endswith("k_proj"):
                raise ExportError(f"{entry.shared_path}: {model.config.model_type}'s keys and values are rows of "
                                  f"{fused}, which a latent cache splits; export it with --form native")
            try:
                factors = attention.projection_factors()
            except ValueError as err:
                raise ExportError(f"{entry.shared_path}: {err}; export it with --form native") from None
            parts.update({f"{entry.shared_path}.{name}": value for name, value in factors.items()})
            continue
        for member in entry.members:
            linear = model.get_submodule(member)
            factors = linear.factors()
            parts[member] = (factors[0], factors[1], linear.bias) if factors is not None else \
                (linear.dense(), None, linear.bias)
    return parts


def _owned_keys(state: dict[str, torch.Tensor], layout: list[CompressedModule]) -> set[str]:
    """The state keys the compressed modules hold (a latent attention's own, not its q_proj / o_proj or
    the family's q_norm / k_norm)."""
    owned = set()
    for entry in layout:
        paths = list(entry.members) + ([entry.shared_path] if entry.shared_path else [])
        keep = tuple(f"{entry.shared_path}.{child}." for child in ("q_proj", "o_proj", "q_norm", "k_norm")) \
            if not entry.handler.linear else ()  # what a latent attention keeps of the family's
        owned |= {k for k in state if k.startswith(tuple(p + "." for p in paths)) and not k.startswith(keep)}
    return owned


def _shared(model: PreTrainedModel, entry: CompressedModule, dtype) -> tuple[dict[str, torch.Tensor], CompressedModule]:
    """A projection shared by several members, kept shared with its A written out (no skip block): its
    tensors and layout entry."""
    state = {f"{entry.shared_path}.A": model.get_submodule(entry.shared_path).dense_a().detach().to(dtype).clone()}
    for member in entry.members:
        linear = model.get_submodule(member)
        state[f"{member}.B"] = linear.B.detach().to(dtype).clone()
        if linear.bias is not None:
            state[f"{member}.bias"] = linear.bias.detach().to(dtype)
    return state, CompressedModule("shared", entry.members, entry.rank, entry.shared_path, group=entry.group)


def _is_shared(entry: CompressedModule) -> bool:
    return entry.handler.linear and entry.shared_path is not None and len(entry.members) > 1


def plain_state(model: PreTrainedModel, factored: bool) -> tuple[dict[str, torch.Tensor], list[CompressedModule]]:
    """(state dict, layout) of the model in the `lowrank` form (factored=True) or the dense one."""
    layout = compressed_layout(model.config)
    state = model.state_dict()
    dtype = next(model.parameters()).dtype
    state = {k: v for k, v in state.items() if k not in _owned_keys(state, layout)}
    new_layout = []
    if factored:  # a projection several members share stays one A (copies would cost more than dense)
        for entry in filter(_is_shared, layout):
            tensors, module = _shared(model, entry, dtype)
            state.update(tensors)
            new_layout.append(module)
        layout = [entry for entry in layout if not _is_shared(entry)]
    parts = plain_parts(model, layout)
    for path, (b, a, bias) in parts.items():
        if bias is not None:
            state[f"{path}.bias"] = bias.detach().to(dtype)
        if a is None or not factored:
            weight = b if a is None else b.detach().double() @ a.detach().double()
            state[f"{path}.weight"] = weight.detach().to(dtype)
            continue
        # clones: the written model must not alias the source model's parameters
        state[f"{path}.A.weight"], state[f"{path}.B.weight"] = a.detach().to(dtype).clone(), b.detach().to(dtype).clone()
        new_layout.append(CompressedModule("factored", (path,), int(a.shape[0])))
    return state, new_layout


def lowrank_model(model: PreTrainedModel) -> PreTrainedModel:
    """The model with every compressed matrix a FactoredLinear (kind 'factored'); module docstring."""
    state, layout = plain_state(model, factored=True)
    config = copy.deepcopy(model.config)
    config.rankfold = {**config.rankfold, "layout": [m.to_json() for m in layout], "form": "lowrank"}
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(compressed_config(config), dtype=next(model.parameters()).dtype)
    return _filled(target, state, config)


def dense_model(model: PreTrainedModel) -> PreTrainedModel:
    """The family's own dense model with W = B A (+ S) for every compressed matrix; module docstring."""
    state, _ = plain_state(model, factored=False)
    config = copy.deepcopy(model.config)
    config.model_type = config.model_type.removeprefix(PREFIX)
    arch = architecture_for(config)
    dropped = ("rankfold", "model_type", "auto_map", "architectures")
    base = CONFIG_MAPPING[config.model_type].from_dict({k: v for k, v in config.to_dict().items() if k not in dropped})
    if arch.experts:
        for i in range(base.num_hidden_layers):
            state = fuse_split_experts(state, arch.layer_prefix.format(i=i) + arch.experts, arch.num_experts(base))
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(base, dtype=next(model.parameters()).dtype)
    return _filled(target, state, base)


def _filled(target: PreTrainedModel, state: dict[str, torch.Tensor], config) -> PreTrainedModel:
    missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"converted tensors do not fit the {type(target).__name__} they were written for "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        target.tie_weights()
    architecture_for(config).rebuild_buffers(target, config)
    return target.eval()
