"""Speed benchmark: latency of compressed linears and models at equal parameter count.

Layers — each input group of a Llama layer (q/k/v, o, gate/up, down) at one compression ratio:
    dense      the original linears
    lowrank    each matrix B·A alone (SVD / SVD-LLM structure), rank ⌊p·m·n/(m+n)⌋
    skip       each matrix alone with its identity block skipped, rank from r(n+m−r) ≤ p·m·n
    cat        one shared A for the group, one B per member
    skipcat    shared A′ with the identity block skipped
  prefill (`--prefill` tokens) and decode (one token), torch path; with CUDA also the Triton kernel.
Model — SmolLM2-135M dense vs SVD-LLM-structured vs SkipCat-structured at the same ratio: prefill of
  `--prefill` tokens and mean decode latency per token with a KV cache (CPU, torch path).

Factor values are random (timing does not depend on them; permutations are real permutations), so
no calibration is needed. Median of `--repeats` timed calls after warm-up; threads: torch's default.

    python benchmarks/speed.py                               # SmolLM2 + Llama-2-7B shapes, fp32 and bf16
    python benchmarks/speed.py --shapes smollm2 --dtypes float32 --repeats 5
    python -m benchmarks.speed --shapes llama3-8b qwen2.5-7b gemma2-9b mixtral-8x7b qwen3-30b-a3b \
        --dtypes float32 --repeats 3 --prefill 128 --skip-model --name families
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import REPO, describe, provenance, publish  # noqa: E402
from rankfold.kernels import shared_lowrank, triton_installed  # noqa: E402
from rankfold.methods.structure import rank_for_ratio  # noqa: E402

# (hidden, intermediate, q rows, kv rows) of the shapes we time layer by layer.
SHAPES = {
    "smollm2": (576, 1536, 576, 192),      # SmolLM2-135M: 9 heads, 3 KV heads of 64
    "llama2-7b": (4096, 11008, 4096, 4096),
    "llama3-8b": (4096, 14336, 4096, 1024),        # 32 heads, 8 KV heads of 128
    "qwen2.5-7b": (3584, 18944, 3584, 512),        # 28 heads, 4 KV heads of 128 (q/k/v biases: not timed)
    "gemma2-9b": (3584, 14336, 4096, 2048),        # 16 heads, 8 KV heads of 256
    # mixtures of experts: the attention and ONE expert's MLP (a token runs top-k of them)
    "mixtral-8x7b": (4096, 14336, 4096, 1024),     # 8 experts, 2 per token
    "qwen3-30b-a3b": (2048, 768, 4096, 512),       # 128 experts of ffn 768, 8 per token; 32 heads, 4 KV of 128
}
LAYER_VARIANTS = ("dense", "lowrank", "skip", "cat", "skipcat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2", "llama2-7b"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-model", action="store_true", help="time the layers only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed")
    parser.add_argument("--name", default="speed", help="result file name under --out (default: speed)")
    return parser.parse_args(argv)


def groups_of(shape: tuple[int, int, int, int]) -> dict[str, tuple[int, list[int]]]:
    """group -> (input width n, output rows of each member)."""
    hidden, ffn, q_rows, kv_rows = shape
    return {"q/k/v": (hidden, [q_rows, kv_rows, kv_rows]), "o": (q_rows, [hidden]),
            "gate/up": (hidden, [ffn, ffn]), "down": (ffn, [hidden])}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: allocator, JIT compilation, caches
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rand(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def layer_variant(variant: str, n: int, rows: list[int], ratio: float, device: torch.device, dtype: torch.dtype,
                  backend: str) -> tuple[int, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """(stored parameters, forward) of one structure for one input group."""
    perm = lambda: torch.randperm(n, device=device)  # noqa: E731
    if variant == "dense":
        weights = [_rand(m, n, device=device, dtype=dtype) for m in rows]
        return sum(w.numel() for w in weights), lambda x: [F.linear(x, w) for w in weights]
    if variant in ("lowrank", "skip") or len(rows) == 1 and variant in ("cat", "skipcat"):
        skip = variant in ("skip", "skipcat")
        parts = []
        for m in rows:
            rank = rank_for_ratio(m, n, ratio, skip)
            parts.append((_rand(rank, n - rank if skip else n, device=device, dtype=dtype),
                          _rand(m, rank, device=device, dtype=dtype), perm() if skip else None))
        params = sum(a.numel() + b.numel() for a, b, _ in parts)
        return params, lambda x: [shared_lowrank(x, a, [b], p, backend=backend)[0] for a, b, p in parts]
    skip = variant == "skipcat"
    rank = rank_for_ratio(sum(rows), n, ratio, skip)
    a = _rand(rank, n - rank if skip else n, device=device, dtype=dtype)
    bs = [_rand(m, rank, device=device, dtype=dtype) for m in rows]
    permutation = perm() if skip else None
    return a.numel() + sum(b.numel() for b in bs), lambda x: shared_lowrank(x, a, bs, permutation, backend=backend)


def time_layers(args: argparse.Namespace, device: torch.device, backends: list[str]) -> list[dict]:
    rows_out = []
    for shape_name in args.shapes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for group, (n, rows) in groups_of(SHAPES[shape_name]).items():
                inputs = {"prefill": _rand(args.prefill, n, device=device, dtype=dtype, scale=1.0),
                          "decode": _rand(1, n, device=device, dtype=dtype, scale=1.0)}
                for variant in LAYER_VARIANTS:
                    for backend in (["torch"] if variant == "dense" else backends):
                        params, forward = layer_variant(variant, n, rows, args.ratio, device, dtype, backend)
                        row = {"shapes": shape_name, "dtype": dtype_name, "group": group, "variant": variant,
                               "backend": backend, "params": params}
                        with torch.inference_mode():
                            for phase, x in inputs.items():
                                row[f"{phase}_ms"] = 1e3 * median_seconds(lambda: forward(x), device, args.repeats)  # noqa: B023 (called at once)
                        rows_out.append(row)
                        print(f"{shape_name:9s} {dtype_name:8s} {group:7s} {variant:8s} {backend:6s} "
                              f"params {params / 1e6:7.2f}M  prefill {row['prefill_ms']:8.3f} ms  "
                              f"decode {row['decode_ms']:7.3f} ms", file=sys.stderr)
    return rows_out


def _structured_model(config, method: str, ratio: float, dtype: torch.dtype):
    """SmolLM2 with every decoder layer restructured as `method` would at `ratio`; random values."""
    from transformers import LlamaForCausalLM

    from rankfold.methods.registry import METHODS
    from rankfold.methods.structure import plan_layer
    from rankfold.models.architecture import architecture_for
    from rankfold.modules.layout import apply_layout

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    if method == "dense":
        return model
    arch = architecture_for(config)
    groups = [(g.name, g.members) for g in arch.groups]
    for layer in model.model.layers:
        shapes = {m: tuple(layer.get_submodule(m).weight.shape) for _, members in groups for m in members}
        apply_layout(layer, plan_layer(METHODS.get(method).structure, groups, shapes, ratio), dtype=dtype)
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if name.endswith((".A", ".B", ".A_prime")):
                    param.normal_(0.0, 0.02)
            for name, buffer in layer.named_buffers():
                if name.endswith("permutation"):
                    buffer.copy_(torch.randperm(buffer.numel()))
    return model


def time_model(args: argparse.Namespace) -> list[dict]:
    from transformers import DynamicCache

    from rankfold.models.sources import open_source

    config = open_source("smollm2-135m").config
    config._attn_implementation = "sdpa"
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for method in ("dense", "svd_llm", "skipcat"):
            model = _structured_model(config, method, args.ratio, dtype)
            layers_params = sum(p.numel() for p in model.model.layers.parameters())
            prompt = torch.randint(0, config.vocab_size, (1, args.prefill))
            with torch.inference_mode():
                prefill = median_seconds(lambda: model(prompt, use_cache=False), torch.device("cpu"), args.repeats)  # noqa: B023 (called at once)
                decode = _decode_seconds(model, prompt[:, :128], args.decode_steps, DynamicCache, config)
            rows.append({"dtype": dtype_name, "method": method, "layer_params": layers_params,
                         "prefill_ms": 1e3 * prefill, "decode_ms_per_token": 1e3 * decode})
            print(f"model {dtype_name:8s} {method:8s} layer params {layers_params / 1e6:6.2f}M  "
                  f"prefill {1e3 * prefill:8.1f} ms  decode {1e3 * decode:6.2f} ms/token", file=sys.stderr)
    return rows


def _decode_seconds(model, prompt: torch.Tensor, steps: int, cache_class, config) -> float:
    """Mean latency of one decode step with a KV cache, after a prompt; median of three runs."""
    runs = []
    for _ in range(3):
        cache = cache_class(config=config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def to_markdown(result: dict) -> str:
    lines = [f"# Speed: compressed vs dense at {result['ratio']:.0%} compression", "",
             f"`{result['command']}` — {describe(result['machine'])}", "",
             "## Layers (median ms; prefill of {0} tokens, decode of 1)".format(result["prefill"]), "",
             "| shapes | dtype | group | variant | backend | params | prefill ms | × dense | decode ms | × dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(r["shapes"], r["dtype"], r["group"]): r for r in result["layers"] if r["variant"] == "dense"}
    for r in result["layers"]:
        d = dense[(r["shapes"], r["dtype"], r["group"])]
        lines.append(f"| {r['shapes']} | {r['dtype']} | {r['group']} | {r['variant']} | {r['backend']} | "
                     f"{r['params'] / 1e6:.2f}M | {r['prefill_ms']:.3f} | {d['prefill_ms'] / r['prefill_ms']:.2f} | "
                     f"{r['decode_ms']:.4f} | {d['decode_ms'] / r['decode_ms']:.2f} |")
    if result.get("model"):
        lines += ["", f"## SmolLM2-135M model (CPU; prefill {result['prefill']} tokens, decode after 128 "
                      f"with a KV cache, {result['decode_steps']} steps)", "",
                  "| dtype | structure | decoder params | prefill ms | decode ms/token |", "|---|---|---|---|---|"]
        for r in result["model"]:
            lines.append(f"| {r['dtype']} | {r['method']} | {r['layer_params'] / 1e6:.2f}M | {r['prefill_ms']:.1f} | "
                         f"{r['decode_ms_per_token']:.2f} |")
    lines += ["", "× dense: dense time / variant time (above 1 is faster than dense). Speed-ups are of the "
              "compressed matrices only; random factor values, real shapes and permutations."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backends = ["torch", "triton"] if cuda and triton_installed() else ["torch"]
    if not cuda:
        print("no CUDA device: layers timed on CPU with the torch path (Triton needs a GPU)", file=sys.stderr)
    result = {**provenance("speed", argv), "device": device.type, "ratio": args.ratio, "prefill": args.prefill,
              "decode_steps": args.decode_steps, "repeats": args.repeats,
              "layers": time_layers(args, device, backends)}
    result["model"] = [] if args.skip_model else time_model(args)
    publish(args.name, result, to_markdown(result), folder=args.out)
    return result


if __name__ == "__main__":
    main()
