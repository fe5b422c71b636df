"""Mistral: Llama's layout, with sliding-window attention when the config sets `sliding_window`
(Mistral-7B-v0.1: 4096 tokens; v0.2 and later: none)."""

from rankfold.models.architecture import Architecture, register_architecture


def sliding_window(config, index: int) -> int | None:
    return getattr(config, "sliding_window", None) or None


register_architecture(Architecture("mistral", ("mistral", "Mistral"), sliding_window=sliding_window))
