"""Granite (IBM Granite 3.x dense): Llama's layout with scalar multipliers — embeddings times
`embedding_multiplier`, residual branches and attention scores scaled inside transformers' layer, final
logits divided by `logits_scaling`."""

from rankfold.models.architecture import Architecture, register_architecture

register_architecture(Architecture(
    "granite", ("granite", "Granite"), embed_scale=lambda config: config.embedding_multiplier,
    logit_divisor=lambda config: config.logits_scaling))
