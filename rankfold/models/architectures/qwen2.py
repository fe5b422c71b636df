"""Qwen2 / Qwen2.5: Llama's layout with biases on q, k and v (none on o). Sliding windows only when
`use_sliding_window` is set, on the layers from `max_window_layers` on (transformers' layer_types)."""

from rankfold.models.architecture import Architecture, register_architecture


def sliding_window(config, index: int) -> int | None:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[index] == "sliding_attention" else None
    return None


register_architecture(Architecture("qwen2", ("qwen2", "Qwen2"), sliding_window=sliding_window,
                                   kv_bias=lambda config: True, gguf=True))
