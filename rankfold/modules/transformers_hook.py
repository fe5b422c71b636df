"""Compressed models as transformers model types, so `save_pretrained` / `from_pretrained` round-trip.

Every supported family (models/architectures/) registers its type when rankfold is imported.
A compressed model's tensors are factors (A, B, A′, a permutation), not dense weights: loaded as a
plain Llama, its dense projections would be initialised at random and transformers would only warn.
So a compressed model is saved as its own model type, `rankfold_<base>` (e.g. `rankfold_llama`),
whose class turns the dense linears into the low-rank modules its config's `rankfold.layout` records
before the weights load. With rankfold imported, `AutoModelForCausalLM.from_pretrained` loads it;
without, transformers refuses the unknown model type — never silently random weights. A folder
written by `rankfold export` carries the same model type with generated remote code (`auto_map`),
so it loads without rankfold too (rankfold/export/modeling.py).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from rankfold.modules.layout import CompressedModule, apply_layout

PREFIX = "rankfold_"
_CLASSES: dict[str, tuple[type, type]] = {}  # base model_type -> (config class, model class)


def _layout(config: PretrainedConfig) -> list[CompressedModule]:
    meta = getattr(config, "rankfold", None)
    if not isinstance(meta, dict) or "layout" not in meta:
        raise ValueError(f"{config.model_type} config has no rankfold.layout: not a compressed model's config")
    return [CompressedModule.from_json(entry) for entry in meta["layout"]]


def register_compressed(base_type: str, prepare=None) -> tuple[type, type]:
    """Define and register `rankfold_<base_type>`: transformers' own config and causal-LM classes of
    `base_type` with the layout applied at construction (idempotent). `prepare(model)`, when given,
    runs first (a mixture of experts unfuses its experts: their factors are per expert)."""
    if base_type in _CLASSES:
        return _CLASSES[base_type]
    base_config = CONFIG_MAPPING[base_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    model_type = PREFIX + base_type

    config_class = type(f"Rankfold{base_config.__name__}", (base_config,), {"model_type": model_type})

    def __init__(self, config: PretrainedConfig) -> None:
        base_model.__init__(self, config)
        if prepare is not None:
            prepare(self)
        apply_layout(self, _layout(config))  # on transformers' meta device while loading: no memory

    model_class = type(f"Rankfold{base_model.__name__}", (base_model,), {"config_class": config_class,
                                                                           "__init__": __init__})
    AutoConfig.register(model_type, config_class)
    AutoModelForCausalLM.register(config_class, model_class)
    _CLASSES[base_type] = (config_class, model_class)
    return config_class, model_class


def compressed_classes(base_type: str) -> tuple[type, type]:
    """(config class, model class) of `rankfold_<base_type>`; KeyError when none is registered."""
    if base_type not in _CLASSES:
        raise KeyError(f"no compressed model type for model_type {base_type!r} (known: {', '.join(_CLASSES)})")
    return _CLASSES[base_type]


def compressed_config(config: PretrainedConfig) -> PretrainedConfig:
    """A dense model's config (with its rankfold section) as the compressed model type's config."""
    config_class, _ = compressed_classes(config.model_type.removeprefix(PREFIX))
    fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    return config_class.from_dict(fields)
