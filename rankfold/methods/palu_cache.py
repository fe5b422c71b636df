"""Palu's latent KV cache as a registered KV method (methods/kv_registry.py): its stages (kv_factors:
full-rank G-LRD per layer; kv_allocate: the rank search, with a Fisher pass of its own when it cannot
share the allocator's), each layer's latent-KV attention at the searched ranks, that attention's
tensors at assembly, and what the model must allow. The math is methods/palu.py.

    kv_cache: {name: palu, ratio: 0.5, group_heads: 1, bits: 3, hadamard: true}
"""

from __future__ import annotations

import torch

from rankfold.methods.kv_registry import KVMethod, register_kv_method
from rankfold.methods.palu import VERSION, GroupFactors, PaluOptions, check_group_heads, kv_budget, rotate
from rankfold.models.architecture import architecture_for
from rankfold.modules.latent_kv import LatentKVShape, head_dim, latent_kv_state
from rankfold.modules.layout import CompressedModule

PROJECTIONS = {"k": "self_attn.k_proj", "v": "self_attn.v_proj"}  # the linears the latent cache replaces


def replaced_paths(arch) -> tuple[str, ...]:
    """The layer's linears the latent attention takes the place of: k_proj and v_proj, or the fused
    projection holding them (Phi-3's qkv_proj, whose query rows become a q_proj of their own)."""
    return tuple(dict.fromkeys(arch.part_rows(path)[0] for path in PROJECTIONS.values()))


def kv_layout(kv: PaluOptions, matrices: tuple[str, ...], config,
              ranks: dict[int, dict[str, list[int]]]) -> dict[int, CompressedModule]:
    """Every layer's latent-KV attention at the searched ranks ({layer: {"k": [...], "v": [...]}}); values
    fold into o_proj when the weight method (`matrices`: target.matrices) leaves it dense and it does not
    grow (modules/latent_kv.py)."""
    arch = architecture_for(config)
    modules, members = {}, replaced_paths(arch)
    for i, layer in ranks.items():
        options = {"group_heads": kv.group_heads, "key_ranks": list(layer["k"]), "value_ranks": list(layer["v"]),
                   "fold_values": False, "bits": kv.bits, "group": kv.quant_group, "residual": kv.residual,
                   "hadamard": kv.hadamard, "value_bias": arch.kv_bias(config)}
        window = arch.sliding_window(config, int(i))
        if window:  # the layer's cache holds the newest window − 1 tokens between forwards
            options["window"] = int(window)
        shape = LatentKVShape.from_options(config, options)
        options["fold_values"] = ("o_proj" not in matrices
                                  and shape.folded_width() <= shape.num_heads * shape.head_dim)
        modules[int(i)] = CompressedModule("latent_kv", members,
                                           sum(layer["k"]) + sum(layer["v"]), "self_attn", options=options)
    return modules


def layer_kv_tensors(factors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], config,
                     module: CompressedModule) -> dict[str, torch.Tensor]:
    """One layer's latent attention tensors, paths inside the layer: prefixes of the stored full-rank
    factors (`{k|v}.{group}.up|down`) at the module's ranks, Hadamard-rotated when asked, values folded
    into the dense o_proj (`dense`: the layer's dense state) when the layout says so; a fused qkv_proj's
    query rows as q_proj."""
    shape = LatentKVShape.from_options(config, module.options)
    arch = architecture_for(config)
    hadamard = bool(module.options.get("hadamard", False))

    def cut(kind: str, ranks: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for k, rank in enumerate(ranks):
            f = GroupFactors(factors[f"{kind}.{k}.up"][:, :rank].double(), factors[f"{kind}.{k}.down"][:rank].double())
            f = rotate(f) if hadamard else f
            out.append((f.up, f.down))
        return out

    def get(name: str) -> torch.Tensor | None:
        path, rows = arch.part_rows(name.rsplit(".", 1)[0])
        stored = f"{path}.{name.rsplit('.', 1)[1]}"
        return None if stored not in dense else dense[stored][rows].double()

    state = latent_kv_state(shape, cut("k", shape.key_ranks), cut("v", shape.value_ranks),
                            get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias"),
                            get("self_attn.o_proj.weight") if shape.fold_values else None,
                            get("self_attn.o_proj.bias"))
    tensors = {f"self_attn.{name}": value for name, value in state.items()}
    if arch.part_rows("self_attn.q_proj")[0] in replaced_paths(arch):  # the query rows of a fused qkv_proj
        for kind in ("weight", "bias"):
            rows = get(f"self_attn.q_proj.{kind}")
            if rows is not None:
                tensors[f"self_attn.q_proj.{kind}"] = rows
    return tensors


def check_cache(kv: PaluOptions, config) -> None:
    """The family's attention takes a latent cache; head groups divide the KV heads; the budget holds one
    rank multiple per head group, k and v. ValueError starting with the field's name otherwise."""
    arch = architecture_for(config)
    if arch.latent_kv_unsupported:
        raise ValueError(f"name: palu on model_type {arch.model_type!r}: {arch.latent_kv_unsupported}")
    try:
        check_group_heads(kv.group_heads, config.num_key_value_heads)
    except ValueError as err:
        raise ValueError(f"group_heads: {err}") from None
    width = head_dim(config) * kv.group_heads
    units = 2 * config.num_hidden_layers * (config.num_key_value_heads // kv.group_heads)
    budget = kv_budget(units * width, kv.ratio)
    if units * min(kv.rank_multiple, width) > budget:
        raise ValueError(f"ratio = {kv.ratio}: keeps {budget} latent dimensions, fewer than one rank "
                         f"multiple ({kv.rank_multiple}) for each of the {units} head groups' keys and values")


register_kv_method(KVMethod(
    "palu", PaluOptions, VERSION, stages=("kv_factors", "kv_allocate"),
    assemble_inputs={"kv_factors": "kv_factors", "kv_ranks": "kv_allocate"},
    layout=kv_layout, layer_tensors=layer_kv_tensors, check=check_cache))
