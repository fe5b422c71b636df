"""The memory a job needs per layer and per model, for the families people compress at their real
sizes: counted from rankfold's own layout of each family (its adapter builds the decoder layer on the
meta device from transformers' config class, so the groups, experts and widths are the job's), not
measured. What it counts:

- weights: one decoder layer's parameters in the model dtype (what a worker holds to run it);
- statistics: each input group's float64 Gram (n²) and Σ|x| (n) — per expert for a mixture — i.e. what
  calibration writes per layer and the driver would hold if it gathered one layer's shards;
- largest factorisation: the widest group's Gram, its whitening factor and inverse (3 n² float64) — the
  peak of one decomposition task besides its matrices;
- activations: `--tokens` calibration tokens of hidden states in the model dtype, twice (a layer's
  input and output are both resident while it runs; past the shard's budget they spill to disk).

    python -m benchmarks.memory_model                   # seconds
    python -m benchmarks.memory_model --tokens 262144 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from transformers import Gemma2Config, LlamaConfig, MixtralConfig, Qwen2Config, Qwen3MoeConfig

from benchmarks.common import provenance, write_result
from rankfold.models.architecture import architecture_for

GB = 1e9
# Released configs' sizes (their config.json on the hub); vocabulary sizes only for the embedding.
MODELS = {
    "llama3-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama3-70b": (LlamaConfig, dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    "qwen2.5-72b": (Qwen2Config, dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=152064)),
    "gemma2-9b": (Gemma2Config, dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000)),
    "mixtral-8x7b": (MixtralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                         num_experts_per_tok=2, vocab_size=32000)),
    "qwen3-30b-a3b": (Qwen3MoeConfig, dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                           num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                           head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (SVD-LLM: 256 × 2048)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--name", default="families")
    return parser.parse_args(argv)


def layer_memory(name: str, tokens: int, dtype_bytes: int) -> dict:
    """One model's row: per-layer and whole-model bytes (module docstring), in GB."""
    config_class, sizes = MODELS[name]
    config = config_class(**sizes)
    arch = architecture_for(config)
    layer = arch.build_layer(config, 0)
    widths = {group.name: layer.get_submodule(group.members[0]).in_features for group in arch.groups}
    layers = config.num_hidden_layers
    weights = sum(p.numel() for p in layer.parameters()) * dtype_bytes
    stats = sum((n * n + n) * 8 for n in widths.values())
    return {"model": name, "layers": layers, "input groups per layer": len(widths),
            "weights GB / layer": round(weights / GB, 3), "statistics GB / layer": round(stats / GB, 3),
            "statistics GB, all layers": round(stats * layers / GB, 1),
            "largest factorisation GB": round(3 * max(widths.values()) ** 2 * 8 / GB, 3),
            "activations GB": round(2 * tokens * config.hidden_size * dtype_bytes / GB, 2),
            "embedding GB": round(config.vocab_size * config.hidden_size * dtype_bytes / GB, 2)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rows = [layer_memory(name, args.tokens, dtype_bytes) for name in args.models]
    for row in rows:
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    result = {**provenance("memory_model", argv),
              "setting": {"tokens": args.tokens, "dtype": args.dtype, "counted": "rankfold's layout of each family "
                          "at its released sizes (meta device), not measured"},
              "rows": rows}
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main()
