"""The memory a job needs per layer and per model, for the families people compress at their real
sizes: counted from rankfold's own layout of each family (its adapter builds the decoder layer on the
meta device from transformers' config class, so the groups, experts and widths are the job's), not
measured. What it counts:

- weights: one decoder layer's parameters in the model dtype (what a worker holds to run it);
- statistics: each input group's float64 Gram, packed (its upper block triangle, ≈ n²/2) and Σ|x| (n) —
  per expert for a mixture — i.e. what a shard sums, Ray moves and calibration writes per layer;
- largest factorisation: the widest group's Gram unpacked, its whitening factor and inverse (3 n² float64) — the
  peak of one decomposition task besides its matrices;
- activations: `--tokens` calibration tokens of hidden states in the model dtype, twice (a layer's
  input and output are both resident while it runs; past the shard's budget they spill to disk);
- the job's store at its end: every layer's statistics, the factors ((1 − `--ratio`) × the layers'
  parameters, stored in float32) and the compressed checkpoint (as many parameters in the model dtype,
  plus embedding, head and norms) — the 12 GB float32 synthetic of `benchmarks/job_memory.py` at 20 %:
  counted 10.8 + 8.7 + 9.9 = 29.4 GB; `du -h` showed 11, 8.1 and 9.3 GiB (statistics rounded up).

And the rule for where a calibration worker's memory goes (`--workers` shards, one `--gpu-gb` GPU each;
`execution.device_activations_mb` at its default, a quarter of the GPU; `calibration.max_resident_mb`
split over the shards as the host budget):

- device: one layer's weights, its float64 Gram sums (accumulated where the layer runs), the
  activations that fit the pool (its tokens' input and output), and the largest decomposition task's
  factorisation when one runs there;
- host (pinned): the next layer's weights (read ahead), the layer's partial statistics on their way to
  Ray's object store, the activations past the pool up to the host budget;
- disk: the activations past both.

    python -m benchmarks.memory_model                   # seconds
    python -m benchmarks.memory_model --tokens 262144 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from transformers import Gemma2Config, LlamaConfig, MixtralConfig, Qwen2Config, Qwen3MoeConfig

from benchmarks.common import provenance, write_result
from rankfold.methods.packed_gram import packed_size
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
    parser.add_argument("--workers", type=int, default=8, help="calibration shards, one GPU each")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of each worker's GPU")
    parser.add_argument("--host-budget-mb", type=int, default=2048, help="calibration.max_resident_mb")
    parser.add_argument("--ratio", type=float, default=0.2, help="target.ratio: the parameters removed")
    parser.add_argument("--name", default="families")
    return parser.parse_args(argv)


def layer_memory(name: str, tokens: int, dtype_bytes: int, ratio: float = 0.2) -> dict:
    """One model's row: per-layer and whole-model bytes (module docstring), in GB."""
    config_class, sizes = MODELS[name]
    config = config_class(**sizes)
    arch = architecture_for(config)
    layer = arch.build_layer(config, 0)
    widths = {group.name: layer.get_submodule(group.members[0]).in_features for group in arch.groups}
    layers = config.num_hidden_layers
    weights = sum(p.numel() for p in layer.parameters()) * dtype_bytes
    stats = sum((packed_size(n) + n) * 8 for n in widths.values())  # packed Grams (their upper block triangle)
    embeddings = (1 if config.tie_word_embeddings else 2) * config.vocab_size * config.hidden_size * dtype_bytes
    kept = (1 - ratio) * weights / dtype_bytes * layers  # parameters of the compressed layers
    return {"model": name, "layers": layers, "input groups per layer": len(widths),
            "weights GB / layer": round(weights / GB, 3), "statistics GB / layer": round(stats / GB, 3),
            "statistics GB, all layers": round(stats * layers / GB, 1),
            "largest factorisation GB": round(3 * max(widths.values()) ** 2 * 8 / GB, 3),
            "activations GB": round(2 * tokens * config.hidden_size * dtype_bytes / GB, 2),
            "embedding GB": round(config.vocab_size * config.hidden_size * dtype_bytes / GB, 2),
            "model GB": round((weights * layers + embeddings) / GB, 1),
            "store GB at the end": round((stats * layers + kept * (4 + dtype_bytes) + embeddings) / GB, 1)}


def worker_rule(row: dict, tokens: int, dtype_bytes: int, workers: int, gpu_gb: float, host_mb: int) -> dict:
    """Where one calibration worker's memory goes (module docstring), GB; `device fits` is whether the
    layer, its statistics and the largest factorisation fit the GPU beside the pool."""
    activations = row["activations GB"] / workers  # this shard's tokens, input and output
    pool = gpu_gb / 4
    on_device = min(activations, pool)
    host_budget = host_mb * 2**20 / workers / GB
    on_host = min(activations - on_device, host_budget)
    fixed = row["weights GB / layer"] + row["statistics GB / layer"]
    return {"device GB": round(fixed + on_device, 2), "device fits": fixed + pool <= gpu_gb
            and row["largest factorisation GB"] + row["weights GB / layer"] <= gpu_gb,
            "host GB": round(row["weights GB / layer"] + row["statistics GB / layer"] + on_host, 2),
            "disk GB": round(activations - on_device - on_host, 2)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rows = [layer_memory(name, args.tokens, dtype_bytes, args.ratio) for name in args.models]
    for row in rows:
        row.update({f"per worker: {k}": v for k, v in worker_rule(row, args.tokens, dtype_bytes, args.workers,
                                                                   args.gpu_gb, args.host_budget_mb).items()})
    for row in rows:
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    result = {**provenance("memory_model", argv),
              "setting": {"tokens": args.tokens, "dtype": args.dtype, "ratio": args.ratio, "workers": args.workers, "gpu_gb": args.gpu_gb,
                          "host_budget_mb": args.host_budget_mb, "counted": "rankfold's layout of each family "
                          "at its released sizes (meta device), not measured"},
              "rows": rows}
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main()
