"""GPU benchmark: the same work on the GPU and on the CPU, timed in one run.

Three parts (`--parts`):
    job      the SmolLM2 job (FLRA + SVD-LLM at `--ratio`, WikiText-2 perplexity) run in-process with
             execution.device cuda and cpu: each stage's seconds, both perplexities, whether the
             allocated ranks agree, and the device's peak memory.
    layer    one Llama-3-70B-shaped decoder layer (bf16 weights, std 0.02; `--scale` divides its widths)
             on each device: the forward with every group's Gram accumulated (float32 products, float64
             sums: the job's default), then per input group the whitening factor (Cholesky, float64)
             and SVD-LLM's factors at `--ratio` for one matrix of each shape — the decomposition
             stage's work. The GPU factors are checked against the CPU ones (relative difference).
    kernels  benchmarks/speed.py's layer timings (dense, low-rank, skip, cat, skipcat; torch and, with
             CUDA, the Triton kernel) at SmolLM2 and Llama-3-8B shapes in bf16 on the device.

Without CUDA the GPU side is skipped and says so; `--device cpu` runs every part on the CPU alone (a
dry run: the script is tested that way, tiny shapes and a tiny model). Prints what it measured and how
to rerun it; writes benchmarks/results/gpu/<name>.json and .md.

    python -m benchmarks.gpu --parts layer kernels         # on a GPU machine: a few minutes
    python -m benchmarks.gpu --parts job                   # the SmolLM2 job on the GPU and on the CPU
    python -m benchmarks.gpu --device cpu --scale 32 --parts layer kernels --name dry-run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import DATA, describe, provenance, publish  # noqa: E402

LLAMA3_70B = {"hidden": 8192, "ffn": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128}
PARTS = ("job", "layer", "kernels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the device compared with the CPU (cpu: a dry run on the CPU alone)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--model", default="smollm2-135m", help="the job's model.source")
    parser.add_argument("--calib-data", type=Path, default=DATA / "calibration" / "enwiki_excerpt.txt")
    parser.add_argument("--eval-data", type=Path, default=DATA / "wikitext2" / "wiki.test.raw")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16 * 2048)
    parser.add_argument("--scale", type=int, default=1, help="divide the 70B layer's widths (4: hidden 2048)")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens through the layer")
    parser.add_argument("--layer-seq-len", type=int, default=2048)
    parser.add_argument("--cpu-scale", type=int, default=4,
                        help="layer: the CPU side's width divisor (a full 70B-shaped layer takes ~30 min on 2 cores); "
                             "the GPU also runs this scale, and its factors are compared with the CPU's there; "
                             "0: no CPU side")
    parser.add_argument("--repeats", type=int, default=5, help="kernels: timed calls per median")
    parser.add_argument("--name", default="gpu", help="result file name under benchmarks/results/gpu")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default: benchmarks/results/gpu)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, *args):
    """(fn(*args), wall seconds with the device's queue drained)."""
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - start


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def devices(args: argparse.Namespace) -> list[torch.device]:
    """The devices each part runs on: the GPU (when asked for and present) and the CPU."""
    if args.device == "cpu":
        return [torch.device("cpu")]
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU side is skipped (run on a GPU machine, or --device cpu for a dry "
              "run)", file=sys.stderr)
        return [torch.device("cpu")]
    return [torch.device("cuda", 0), torch.device("cpu")]


def job_part(args: argparse.Namespace, on: list[torch.device]) -> list[dict]:
    """The job in-process on each device: per-stage seconds, perplexity, ranks."""
    from rankfold.evaluation.report import metric_table
    from rankfold.execution.local import LocalExecutor
    from rankfold.jobs.spec import parse_spec
    from rankfold.orchestrator.job import run_job

    rows = []
    for device in on:
        _reset_peak(device)
        with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{device.type}-") as out:
            spec = parse_spec({
                "model": {"source": args.model},
                "method": {"name": "svd_llm"},
                "target": {"ratio": args.ratio,
                           "allocation": {"kind": "flra", "fisher_samples": min(32, args.calib_samples)}},
                "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.calib_samples,
                                "seq_len": args.seq_len},
                "evaluation": {"perplexity": [{"name": "wikitext2", "max_tokens": args.eval_tokens,
                                               "window": min(2048, args.eval_tokens),
                                               "data": {"path": str(args.eval_data), "lines_as_rows": True}}]},
                "output": {"dir": out},
                "execution": {"device": device.type},
            })
            started = time.perf_counter()
            report = run_job(spec, executor=LocalExecutor(device=device.type))
        perplexity = {f"{r['name']} {variant}": value for r in metric_table(report["rows"])
                      for variant, value in r.items() if variant in ("dense", "compressed")}
        row = {"device": device.type, "job_s": round(time.perf_counter() - started, 2),
               "stages_s": {r["stage"]: r["wall_s"] for r in report["stages"]},
               "perplexity": perplexity, "ranks": report["ranks"], "peak_device_gb": _peak_gb(device)}
        rows.append(row)
        print(f"job on {device.type}: {row['job_s']:.1f} s; " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                          row["stages_s"].items()), file=sys.stderr)
    if len(rows) == 2:
        rows[0]["ranks_equal_cpu"] = rows[0].pop("ranks") == rows[1]["ranks"]
        rows[1].pop("ranks")
    else:
        rows[0].pop("ranks")
    return rows


# One matrix of each distinct shape of a Llama layer: (input group, path inside the layer).
LAYER_MATRICES = (("attn_in", "self_attn.q_proj"), ("attn_in", "self_attn.k_proj"), ("mlp_in", "mlp.gate_proj"),
                  ("mlp_out", "mlp.down_proj"))


def layer_config(scale: int, seq_len: int):
    from transformers import LlamaConfig

    from rankfold.workers.layers import runtime_config

    shape = LLAMA3_70B
    return runtime_config(LlamaConfig(
        hidden_size=shape["hidden"] // scale, intermediate_size=shape["ffn"] // scale,
        num_attention_heads=max(1, shape["heads"] // scale), num_key_value_heads=max(1, shape["kv_heads"] // scale),
        head_dim=shape["head_dim"], num_hidden_layers=1, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
        vocab_size=128256))


def layer_state(config, arch) -> dict[str, torch.Tensor]:
    """Random bf16 weights (std 0.02, one seed per tensor in name order), norms of ones."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in arch.build_layer(config, 0).state_dict().items()}
    state = {}
    for seed, key in enumerate(sorted(shapes)):
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
        else:
            generator = torch.Generator().manual_seed(seed)
            state[key] = (0.02 * torch.randn(shapes[key], generator=generator)).to(torch.bfloat16)
    return state


def layer_part(args: argparse.Namespace, on: list[torch.device]) -> list[dict]:
    """One 70B-shaped layer's calibration and decomposition: the GPU at `--scale`, then both devices at
    `--cpu-scale`, where the GPU's factors are compared with the CPU's (‖B A − B′ A′‖ / ‖B′ A′‖)."""
    runs = [(device, args.scale) for device in on if device.type != "cpu"]
    if args.cpu_scale or len(on) == 1:
        scale = args.scale if len(on) == 1 else args.cpu_scale
        runs += [(device, scale) for device in on if device.type != "cpu" and scale != args.scale]
        runs += [(device, scale) for device in on if device.type == "cpu"]
    products: dict = {}
    return [_layer_run(args, device, scale, products) for device, scale in runs]


@torch.no_grad()  # as the job's shards: no autograd graph held by the factorisations (peak memory)
def _layer_run(args: argparse.Namespace, device: torch.device, scale: int, products: dict) -> dict:
    """One device, one scale: the forward with every group's Gram, then `_decompositions`."""
    from rankfold.models.architecture import architecture_for
    from rankfold.workers.activations import Activations, device_pool
    from rankfold.workers.layer_statistics import propagate_layer
    from rankfold.workers.layers import LayerRunner, materialize_layer

    config = layer_config(scale, args.layer_seq_len)
    arch = architecture_for(config)
    sequences = max(1, args.tokens // args.layer_seq_len)
    generator = torch.Generator().manual_seed(1)
    _warm_up(device)
    _reset_peak(device)
    layer = materialize_layer(arch, config, 0, layer_state(config, arch), torch.bfloat16, device=device)
    chunks = Activations(1 << 62, device=device, pool=device_pool(device, None))  # the job's GPU pool, then host
    for _ in range(sequences):
        chunks.append(torch.randn(1, args.layer_seq_len, config.hidden_size, generator=generator).to(torch.bfloat16))
    gram_s: dict[str, float] = {}
    stats, forward_s = _timed(device, propagate_layer, layer, LayerRunner(arch, config), chunks, None,
                              arch.groups, torch.float32, "layer", gram_s)
    row = {"device": device.type, "scale": scale, "tokens": sequences * args.layer_seq_len,
           "hidden": config.hidden_size, "forward_and_gram_s": round(forward_s, 3),
           "gram_s": {k: round(v, 3) for k, v in gram_s.items()}}
    row |= _decompositions(args, layer, stats, device, scale, products)
    row["peak_device_gb"] = _peak_gb(device)
    print(f"layer on {device.type} (scale {scale}): forward + Gram {forward_s:.2f} s, Cholesky "
          f"{sum(row['cholesky_s'].values()):.2f} s, SVD-LLM {sum(row['svd_llm_s'].values()):.2f} s", file=sys.stderr)
    return row


def _decompositions(args: argparse.Namespace, layer, stats: dict, device: torch.device, scale: int,
                    products: dict) -> dict:
    """Cholesky of each group's Gram and SVD-LLM of one matrix per shape, timed; a GPU run leaves its
    B·A in `products`, a CPU run at the same scale measures its difference to them."""
    from rankfold.methods.structure import rank_for_ratio
    from rankfold.methods.svd_llm import svd_llm_factors
    from rankfold.methods.whitening import whitening_factor

    factors, cholesky_s, svd_s, difference = {}, {}, {}, {}
    for group, path in LAYER_MATRICES:
        if group not in factors:
            factors[group], cholesky_s[group] = _timed(device, whitening_factor, stats[group].symmetric_gram())
        weight = layer.get_submodule(path).weight
        (b, a), svd_s[path] = _timed(device, svd_llm_factors, weight, factors[group],
                                     rank_for_ratio(*weight.shape, args.ratio))
        product = (b @ a).cpu()
        if device.type != "cpu":
            products[scale, path] = product
        elif (scale, path) in products:
            difference[path] = float((products[scale, path] - product).norm() / product.norm())
    out = {"cholesky_s": {k: round(v, 3) for k, v in cholesky_s.items()},
           "svd_llm_s": {k: round(v, 3) for k, v in svd_s.items()}}
    return out | ({"gpu_relative_difference": difference} if difference else {})


def _warm_up(device: torch.device) -> None:
    """The first cuBLAS / cuSOLVER / SDPA calls set up handles and kernels: not what is timed."""
    from rankfold.methods.linalg import reduced_svd

    x = torch.randn(256, 256, dtype=torch.float64, device=device)
    torch.linalg.cholesky(x @ x.T + 256 * torch.eye(256, dtype=torch.float64, device=device))
    reduced_svd(x)
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16, device=device)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    _sync(device)


def kernels_part(args: argparse.Namespace, on: list[torch.device]) -> list[dict]:
    """benchmarks/speed.py's layer timings on the first device (the GPU when there is one), bf16 —
    fp32 on the CPU, whose bf16 GEMM is not what a GPU is compared with."""
    from benchmarks.speed import time_layers
    from rankfold.kernels import triton_installed

    device = on[0]
    cuda = device.type == "cuda"
    backends = ["torch", "triton"] if cuda and triton_installed() else ["torch"]
    shapes = ["smollm2", "llama3-8b"] if args.scale == 1 else ["smollm2"]
    settings = argparse.Namespace(shapes=shapes, dtypes=["bfloat16" if cuda else "float32"], ratio=args.ratio,
                                  prefill=512 if args.scale == 1 else 64, repeats=args.repeats)
    return [{"device": device.type, **row} for row in time_layers(settings, device, backends)]


def to_markdown(result: dict) -> str:
    lines = [f"# GPU benchmark ({result['compared']})", "", f"Rerun: `{result['command']}`",
             f"Machine: {describe(result['machine'])}", ""]
    for part in PARTS:
        for row in result.get(part, []):
            flat = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items() if not isinstance(v, dict)}
            nested = {k: v for k, v in row.items() if isinstance(v, dict)}
            lines.append(f"- {part}: " + ", ".join(f"{k} {v}" for k, v in flat.items()))
            lines += [f"  - {k}: " + ", ".join(f"{n} {x:.4g}" if isinstance(x, float) else f"{n} {x}"
                                              for n, x in v.items()) for k, v in nested.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on = devices(args)
    result = {**provenance("gpu", argv), "compared": " vs ".join(d.type for d in on),
              "cuda_device": torch.cuda.get_device_name(0) if on[0].type == "cuda" else None}
    for part, run in (("job", job_part), ("layer", layer_part), ("kernels", kernels_part)):
        if part in args.parts:
            result[part] = run(args, on)
    publish(args.name, result, to_markdown(result), folder=args.out)
    return result


if __name__ == "__main__":
    main()
