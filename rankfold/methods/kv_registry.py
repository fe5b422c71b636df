"""The KV-cache method registry: methods that compress the K/V cache itself (Palu's latent cache),
beside the weight method. Each registers in one `register_kv_method(KVMethod(...))` call: its spec
options (the job spec's `kv_cache` part, tagged by `name`), its VERSION, the stage kinds the plan adds
for it (each plans itself, StageKind.plan), the assemble stage's inputs among them, the cache module of
every layer from what they found, that module's tensors at assembly, and its preflight check.

The plan, the assemble stage and the preflight ask the registry; none names a KV method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rankfold.core.options import Strict
from rankfold.core.registry import Registry
from rankfold.modules.layout import CompressedModule


class KVCacheOptions(Strict):
    """Base of a KV method's spec options; subclasses narrow `name` to a Literal (the discriminator)."""

    name: str


@dataclass(frozen=True)
class KVMethod:
    name: str
    options: type[KVCacheOptions]
    version: str
    # Stage kinds the plan adds, in order; each plans itself from the spec (StageKind.plan).
    stages: tuple[str, ...]
    # The assemble stage's inputs among those stages: {role: stage name}.
    assemble_inputs: dict[str, str]
    # layout(options, target.matrices, model config, ranks (the allocating stage's result))
    #   -> {layer: its cache module (a CompressedModule whose kind's tensors are this method's)}
    layout: Callable[[KVCacheOptions, tuple[str, ...], object, dict], dict[int, CompressedModule]]
    # layer_tensors(the layer's stored factors, its dense state, model config, its cache module)
    #   -> the module's tensors, paths inside the layer
    layer_tensors: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], object, CompressedModule],
                            dict[str, torch.Tensor]]
    # check(options, model config): ValueError whose message starts with the offending field's name
    check: Callable[[KVCacheOptions, object], None]


KV_METHODS: Registry[KVMethod] = Registry("kv_cache method")


def register_kv_method(method: KVMethod) -> KVMethod:
    if method.options.model_fields["name"].annotation is str:
        raise ValueError(f"kv_cache method {method.name!r}: its options must narrow `name` to a Literal")
    return KV_METHODS.register(method.name, method)
