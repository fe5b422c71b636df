"""OLMo 2: Llama's linear groups with post-norms (after attention and after the MLP, transformers'
layer runs them) and RMSNorms over the whole query and key projections (q_norm, k_norm) before RoPE."""

from rankfold.models.architecture import Architecture, register_architecture

register_architecture(Architecture(
    "olmo2", ("olmo2", "Olmo2"),
    latent_kv_unsupported="its k_norm normalises the whole key projection before RoPE; a latent cache would have "
                          "to rebuild every key to normalise it, which rankfold's latent attention does not do yet"))
