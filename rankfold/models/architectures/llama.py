"""Llama 2 / 3.x and SmolLM2: the reference layout (q/k/v and gate/up read one input each)."""

from rankfold.models.architecture import Architecture, register_architecture

register_architecture(Architecture("llama", ("llama", "Llama"), gguf=True))
