"""OLMo 2: Llama's linear groups with post-norms (after attention and after the MLP, transformers'
layer runs them) and RMSNorms over the whole query and key projections (q_norm, k_norm) before RoPE."""

from rankfold.models.architecture import Architecture, register_architecture

register_architecture(Architecture("olmo2", ("olmo2", "Olmo2"), attention_residual="mlp"))
