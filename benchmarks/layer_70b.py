"""Layer benchmark: the cost of one Llama-3-70B-shaped layer, and a model of 80 layers on N GPU workers.

One decoder layer of Llama-3-70B shape (hidden 8192, ffn 28672, 64 heads, 8 KV heads; bf16 weights,
std 0.02) built with the job's own code: its calibration (`propagate_layer`, per-group InputStats,
each group's statistics updates timed by `gram_seconds`) over `--tokens` random hidden states, then
per input group the whitening factor and, once per distinct matrix shape, SVD-LLM at the 20 % rank
(W·S GEMM, SVD and triangular solve timed apart, checked against `svd_llm_factors`). From these, a
model of the time for 80 layers on N GPU workers.

    python -m benchmarks.layer_70b              # ~30 min on 2 cores; peak RSS ~18 GB
    python -m benchmarks.layer_70b --scale 4    # smoke run: hidden 2048, ffn 7168 (~1 min)
"""

from __future__ import annotations

import argparse
import heapq
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# libgomp's threads spin while they wait; on a small machine shared with other work that makes
# MKL's SVD ~60× slower with 2 threads (1024² fp64: 24 s instead of 0.4 s, measured here while
# another job ran). Passive waiting costs nothing when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import RESULTS, provenance, publish  # noqa: E402
from benchmarks.process_memory import (  # noqa: E402
    GB,
    SyntheticLlama,
    TreeSampler,
    _gb,
    _random,
    add_run_arguments,
    provenance_lines,
)
from rankfold.execution.streaming import REDUCE_FAN_IN  # noqa: E402
from rankfold.methods.structure import rank_for_ratio  # noqa: E402
from rankfold.methods.svd import split_singular  # noqa: E402
from rankfold.methods.svd_llm import svd_llm_factors  # noqa: E402
from rankfold.methods.whitening import apply_inverse_right, whitening_factor  # noqa: E402
from rankfold.workers.activations import Activations  # noqa: E402
from rankfold.workers.layer_statistics import InputStats, propagate_layer  # noqa: E402

LLAMA3_70B = {"hidden": 8192, "ffn": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128}


# Distinct matrix shapes -> the (input group, matrix) pairs of that shape. The SVD-LLM of a shape is
# timed once, with the whitening factor of its first group, and counted for each of its matrices.
SHAPES = {"q": (("attn_in", "self_attn.q_proj"), ("attn_out", "self_attn.o_proj")),
          "kv": (("attn_in", "self_attn.k_proj"), ("attn_in", "self_attn.v_proj")),
          "gate": (("mlp_in", "mlp.gate_proj"), ("mlp_in", "mlp.up_proj")),
          "down": (("mlp_out", "mlp.down_proj"),)}


def gemm_rates(n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n×n (bf16: 2n×2n) matmul on this machine, median of 3, per dtype."""
    rates = {}
    for name, size in (("float64", n), ("float32", n), ("bfloat16", 2 * n)):
        a, b = (torch.randn(size, size).to(getattr(torch, name)) for _ in range(2))
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates[name] = 2 * size ** 3 / statistics.median(times) / 1e9
    return rates


class Pieces:
    """Wall time and peak RSS (a TreeSampler on this process) of named steps."""

    def __init__(self, interval_s: float, quiet: bool = False):
        self.sampler = TreeSampler(os.getpid(), interval_s, pss_every=1 << 30)  # RSS only
        self.sampler.start()
        self.rows: dict[str, dict] = {}
        self.quiet = quiet

    def run(self, name: str, fn, *args):
        start, wall = time.monotonic(), time.perf_counter()
        out = fn(*args)
        wall, stop = time.perf_counter() - wall, time.monotonic()
        self.sampler.sample(with_pss=False)
        self.rows[name] = {"wall_s": round(wall, 2), "peak_rss": self.sampler.peak(start, stop + 1e-3)["rss"]}
        if not self.quiet:
            print(f"  {name:44s} {wall:8.1f} s   peak RSS {_gb(self.rows[name]['peak_rss'])}", file=sys.stderr)
        return out


def layer_weights(config, dtype: torch.dtype, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Random bf16 weights (std 0.02), each from its own seed, so any one can be made again alone."""
    shapes = SyntheticLlama(1, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                            config.num_key_value_heads, 0, "", 1).layer_shapes()
    return {key: _random(shapes[key], torch.Generator().manual_seed(sorted(shapes).index(key)), dtype)
            for key in (names or shapes)}


def calibrate_layer(layer, runner, groups, chunks: list[torch.Tensor], product_dtype: torch.dtype,
                    pieces: Pieces) -> dict[str, InputStats]:
    """The calibration stage's work on one layer: workers/layer_statistics.py `propagate_layer` (a pre-hook on
    each group's first member adds its input to the group's InputStats) over `chunks`, keeping the
    outputs as the next layer's input, as a shard does. Each group's statistics updates are timed apart
    (propagate_layer's `gram_seconds`)."""
    inputs, outputs = Activations(1 << 62), Activations(1 << 62)  # resident (a shard spills past its budget)
    for chunk in chunks:
        inputs.append(chunk)
    gram_s: dict[str, float] = {}
    stats = pieces.run("forward + Gram accumulation", propagate_layer, layer, runner, inputs, outputs, groups,
                       product_dtype, "layer", gram_s)
    inputs.release()
    outputs.release()
    row = pieces.rows.pop("forward + Gram accumulation")
    pieces.rows["forward"] = {"wall_s": round(row["wall_s"] - sum(gram_s.values()), 2), "peak_rss": row["peak_rss"]}
    for name in stats:
        pieces.rows[f"gram {name}"] = {"wall_s": round(gram_s.get(name, 0.0), 2), "peak_rss": row["peak_rss"]}
    return stats


def svd_llm_steps(weight: torch.Tensor, holder: dict, rank: int, park: Path | None, pieces: Pieces, label: str):
    """svd_llm_factors(weight, S, rank) as its three steps — same functions, same order (checked
    against it in `check_steps`) — timed apart. With `park`, S (in `holder`) waits on disk during
    the SVD: a 28672² factor is 6.6 GB."""
    from safetensors.torch import load_file, save_file

    ws = pieces.run(f"{label}: W·S (fp64 GEMM)", lambda: weight.to(torch.float64) @ holder["factor"])
    if park is not None:  # LAPACK returns S column-major: Sᵀ is the contiguous tensor to save
        save_file({"factor_t": holder.pop("factor").mT}, park)
    u, s, vh = pieces.run(f"{label}: SVD {tuple(ws.shape)}", lambda: torch.linalg.svd(ws, full_matrices=False))  # noqa: F821 (called at once)
    del ws
    b, a_white = split_singular(u, s, vh, rank)
    del u, s, vh
    if park is not None:
        holder["factor"] = load_file(park)["factor_t"].mT  # the same column-major layout as before
        park.unlink()
    a = pieces.run(f"{label}: A·S⁻¹ (triangular solve)", apply_inverse_right, a_white, holder["factor"])
    return b, a


def check_steps() -> None:
    """The stepwise path gives svd_llm_factors' result exactly (a small random case)."""
    x, weight = torch.randn(512, 96, dtype=torch.float64), torch.randn(64, 96).to(torch.bfloat16)
    factor = torch.linalg.cholesky(x.T @ x)
    expected = svd_llm_factors(weight, factor, 20)
    pieces = Pieces(1.0, quiet=True)
    pieces.sampler.finish()
    got = svd_llm_steps(weight, {"factor": factor}, 20, None, pieces, "check")
    if not all(torch.equal(e, g) for e, g in zip(expected, got)):
        raise SystemExit("svd_llm_steps no longer matches rankfold.methods.svd_llm.svd_llm_factors")


def layer_main(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    from rankfold.models.architecture import architecture_for
    from rankfold.workers.layers import LayerRunner, materialize_layer, runtime_config

    check_steps()
    s = args.scale
    dims = {"hidden": LLAMA3_70B["hidden"] // s, "ffn": LLAMA3_70B["ffn"] // s, "heads": LLAMA3_70B["heads"] // s,
            "kv_heads": max(1, LLAMA3_70B["kv_heads"] // s), "head_dim": LLAMA3_70B["head_dim"]}
    tokens = args.tokens or LLAMA3_70B["hidden"] * 4 // s
    config = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["ffn"], num_attention_heads=dims["heads"],
                         num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"], num_hidden_layers=1,
                         max_position_embeddings=args.seq_len, rms_norm_eps=1e-5, vocab_size=128256)
    arch, dtype = architecture_for(config), getattr(torch, args.dtype)
    product_dtype = getattr(torch, args.gram_product_dtype)
    work = args.work / f"layer-{s}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"layer: {dims}, {tokens} tokens in sequences of {args.seq_len}, forward {args.dtype}, "
          f"Gram products {args.gram_product_dtype}; {torch.get_num_threads()} threads", file=sys.stderr)
    rates_before = gemm_rates()
    print("  GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates_before.items()), file=sys.stderr)

    pieces = Pieces(args.interval)
    weights = layer_weights(config, torch.bfloat16)
    layer_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    config = runtime_config(config)
    layer = materialize_layer(arch, config, 0, weights, dtype)
    del weights
    generator = torch.Generator().manual_seed(1)
    sequences = tokens // args.seq_len
    chunks = [torch.randn(min(args.batch, sequences - i), args.seq_len, dims["hidden"], generator=generator).to(dtype)
              for i in range(0, sequences, args.batch)]
    stats = calibrate_layer(layer, LayerRunner(arch, config), arch.groups, chunks, product_dtype, pieces)
    del layer, chunks
    # Statistics to disk, as the job stores them; each group's comes back alone (peak memory).
    stats_bytes = sum(8 * (st.upper.numel() + st.abs_sum.numel() + 1) for st in stats.values())  # packed Grams
    for name in list(stats):
        path = work / f"stats-{name}.safetensors"
        pieces.run(f"store {name}", lambda: save_file(stats[name].to_tensors(name), path))  # noqa: B023 (called at once)
        del stats[name]

    ranks = {}
    for group in arch.groups:  # one decompose task of the job each
        if not any(g == group.name for shape in args.shapes for g, _ in SHAPES[shape]):
            continue
        path = work / f"stats-{group.name}.safetensors"
        gram = InputStats.from_tensors(load_file(path), group.name).gram
        path.unlink()
        holder = {"factor": pieces.run(f"cholesky {group.name} {gram.shape[0]}²", whitening_factor, gram)}
        del gram
        park = work / "factor.safetensors" if holder["factor"].numel() * 8 > args.park_factor_mb << 20 else None
        for shape in [k for k in args.shapes if SHAPES[k][0][0] == group.name]:
            key = f"{SHAPES[shape][0][1]}.weight"
            weight = layer_weights(config, torch.bfloat16, [key])[key]  # bf16, as the task reads it
            ranks[shape] = rank_for_ratio(*weight.shape, args.ratio)
            svd_llm_steps(weight, holder, ranks[shape], park, pieces, f"{shape} {tuple(weight.shape)} r={ranks[shape]}")
        del holder
    for path in work.glob("stats-*.safetensors"):
        path.unlink()
    pieces.sampler.finish()
    # The machine may be shared: the rates before and after the run, and their mean, which the model uses.
    rates_after = gemm_rates()
    rates = {k: (rates_before[k] + rates_after[k]) / 2 for k in rates_before}

    result = {
        **provenance("layer_70b", args.argv), "dims": dims, "scale": s, "tokens": tokens,
        "seq_len": args.seq_len, "dtype": args.dtype,
        "gram_product_dtype": args.gram_product_dtype, "ratio": args.ratio, "ranks": ranks, "shapes": args.shapes,
        "gemm_gflops": rates, "gemm_gflops_before_after": [rates_before, rates_after], "pieces": pieces.rows,
        "layer_bytes_bf16": layer_bytes, "stats_bytes": stats_bytes,
        "activation_bytes": tokens * dims["hidden"] * dtype.itemsize,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10,
        "park_factor_mb": args.park_factor_mb,
    }
    result["prediction"] = predict(result, args)
    publish(f"layer-{s}" if s != 1 else "layer", result, layer_markdown(result), folder=args.out)
    return result


def per_layer_seconds(r: dict) -> dict:
    """This CPU's seconds for one layer: forward, Gram, and per decompose task (one per input group)
    [Cholesky + W·S + triangular solves, SVDs] — each shape's steps counted once per matrix of it."""
    rows = r["pieces"]
    tasks = {key.split()[1]: [row["wall_s"], 0.0] for key, row in rows.items() if key.startswith("cholesky ")}
    for shape in r["shapes"]:
        for group, _ in SHAPES[shape]:
            for key, row in rows.items():
                if key.startswith(f"{shape} "):
                    tasks[group][1 if ": SVD" in key else 0] += row["wall_s"]
    gram = sum(row["wall_s"] for key, row in rows.items() if key.startswith("gram "))
    return {"forward": rows["forward"]["wall_s"], "gram": gram, "tasks": tasks}


def lpt_makespan(durations: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of independent tasks on `workers`: its makespan."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def critical_fetches(shards: int, fan_in: int) -> int:
    """Partials fetched one after another on the critical path of the shards' reduction tree
    (execution/streaming.py): fan_in − 1 a round (the group's first is local) until ≤ fan_in are left,
    then all of those by the reducing shard — 2 shards: 2, 8: 3 + 2, 64: 3 + 3 + 4."""
    fetched, left = 0, shards
    while left > fan_in:
        fetched, left = fetched + fan_in - 1, -(-left // fan_in)
    return fetched + left


def predict(r: dict, args: argparse.Namespace) -> dict:
    """A model, not a measurement: 80 layers on N GPU workers from this CPU's per-layer seconds.

    - calibration is sequential over layers and data-parallel over whole sequences: per layer each
      of min(N, sequences) shards runs its share of the tokens (forward at the forward dtype's rate,
      Gram at the product dtype's rate), reads the layer's weights, and the shards sum their packed
      float64 statistics among themselves in a tree of REDUCE_FAN_IN (the partials on its critical path
      fetched one after another at reduce_gbps: `critical_fetches`);
    - decomposition is one task per (layer, input group), all independent: LPT-scheduled on N workers;
      each task reads its Gram; Cholesky, W·S and the triangular solve scale with fp64 GEMM rates,
      the SVD by its own (smaller) factor;
    - GPU rates are achievable dense rates (arguments), divided by this CPU's measured GEMM rates;
      assembly and evaluation are not counted."""
    seconds, rates = per_layer_seconds(r), r["gemm_gflops"]
    speed = {"forward": args.gpu_tflops[r["dtype"]] * 1e3 / rates[r["dtype"]],
             "gram": args.gpu_tflops[r["gram_product_dtype"]] * 1e3 / rates[r["gram_product_dtype"]],
             "fp64": args.gpu_tflops["float64"] * 1e3 / rates["float64"], "svd": args.gpu_svd_speedup}
    gram_bytes = {name: size for name, size in (("attn_in", r["dims"]["hidden"]), ("attn_out", r["dims"]["hidden"]),
                                                ("mlp_in", r["dims"]["hidden"]), ("mlp_out", r["dims"]["ffn"]))}
    task_gpu = [t[0] / speed["fp64"] + t[1] / speed["svd"] + gram_bytes[g] ** 2 * 8 / (args.read_gbps * GB)
                for g, t in seconds["tasks"].items()]
    rows = []
    for n in args.workers:
        shards = min(n, r["tokens"] // r["seq_len"])  # the job splits whole sequences over its shards
        compute = (seconds["forward"] / speed["forward"] + seconds["gram"] / speed["gram"]) / shards
        read = r["layer_bytes_bf16"] / (args.read_gbps * GB)
        reduce = critical_fetches(shards, REDUCE_FAN_IN) * r["stats_bytes"] / (args.reduce_gbps * GB)
        decompose = lpt_makespan(task_gpu * args.layers, n)
        rows.append({"workers": n, "calibration_shards": shards, "calibrate_compute_s": compute * args.layers,
                     "weight_reads_s": read * args.layers,
                     "stats_reduce_s": reduce * args.layers, "decompose_s": decompose,
                     "total_s": (compute + read + reduce) * args.layers + decompose})
    cpu_layer = seconds["forward"] + seconds["gram"] + sum(sum(t) for t in seconds["tasks"].values())
    return {"layers": args.layers, "speedups": speed, "per_layer_cpu_s": seconds, "rows": rows,
            "this_cpu_one_worker_s": cpu_layer * args.layers, "complete": sorted(r["shapes"]) == sorted(SHAPES),
            "assumptions": {"gpu_tflops": args.gpu_tflops, "gpu_svd_speedup": args.gpu_svd_speedup,
                            "read_gbps": args.read_gbps, "reduce_gbps": args.reduce_gbps}}


def _hms(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def task_memory_note(r: dict) -> list[str]:
    """The job's decompose task keeps S resident through the SVD (its Gram is dropped once factorised,
    as here); this benchmark parks an S above --park-factor-mb on disk meanwhile."""
    notes = []
    for shape in r["shapes"]:
        n = r["dims"]["ffn" if shape == "down" else "hidden"]
        svd = next((row for key, row in r["pieces"].items() if key.startswith(f"{shape} ") and ": SVD" in key), None)
        if svd is not None and 8 * n * n > r["park_factor_mb"] << 20:
            notes.append(f"{shape}: SVD step {_gb(svd['peak_rss'])} + S {_gb(8 * n * n)}")
    return [f"The job's decompose task also holds S (parked on disk here) during the SVD: ≈ {'; '.join(notes)}."
            ] if notes else []


def ws_gflops(r: dict) -> float:
    """The fp64 GEMM rate of the largest W·S product as it ran (0 when the down shape was skipped)."""
    row = next((row for key, row in r["pieces"].items() if key.startswith("down ") and "W·S" in key), None)
    return 2 * r["dims"]["hidden"] * r["dims"]["ffn"] ** 2 / row["wall_s"] / 1e9 if row else 0.0


def layer_markdown(r: dict) -> str:
    d, p = r["dims"], r["prediction"]
    before, after = r["gemm_gflops_before_after"]
    scaled = "" if r["scale"] == 1 else f" ÷ {r['scale']}"
    lines = [f"### Scale: one decoder layer of Llama-3-70B shape{scaled}", "",
             f"hidden {d['hidden']}, ffn {d['ffn']}, {d['heads']} heads / {d['kv_heads']} KV heads; "
             "random bf16 weights; "
             f"{r['tokens']} tokens (sequences of {r['seq_len']}), forward {r['dtype']}, Gram products "
             f"{r['gram_product_dtype']} into float64 sums; SVD-LLM at {r['ratio']:.0%} (ranks {r['ranks']}). "
             "GEMM on this machine (mean of before / after the run): "
             + ", ".join(f"{k} {v:.0f} ({before[k]:.0f} / {after[k]:.0f}) GFLOP/s" for k, v in r["gemm_gflops"].items())
             + f". In situ, W·S of down ran at {ws_gflops(r):.0f} GFLOP/s (fp64).", "",
             "| step | wall s | peak RSS of the process |", "|---|---|---|"]
    lines += [f"| {name} | {row['wall_s']:.1f} | {_gb(row['peak_rss'])} |" for name, row in r["pieces"].items()]
    lines += ["", f"Peak RSS (ru_maxrss): {_gb(r['peak_rss'])}. One shape's SVD-LLM is timed once and counted for "
              "every matrix of that shape (q/o, k/v, gate/up, down). Layer weights bf16 "
              f"{_gb(r['layer_bytes_bf16'])}; float64 statistics (packed) {_gb(r['stats_bytes'])}; activations "
              f"{_gb(r['activation_bytes'])} per copy.", *task_memory_note(r), "",
              f"**Model, not measurement: {p['layers']} layers on N GPU workers**"
              + ("" if p["complete"] else " (PARTIAL: some shapes skipped)") + "", "",
              "| N | calibration shards | calibrate compute | weight reads | statistics reduced | decompose | total |",
              "|---|---|---|---|---|---|---|"]
    for row in p["rows"]:
        cells = [_hms(row[k]) for k in ("calibrate_compute_s", "weight_reads_s", "stats_reduce_s", "decompose_s")]
        lines.append(f"| {row['workers']} | {row['calibration_shards']} | {' | '.join(cells)} | "
                     f"**{_hms(row['total_s'])}** |")
    a = p["assumptions"]
    rates, speed = ", ".join(f"{k} {v:g} TFLOP/s" for k, v in a["gpu_tflops"].items()), p["speedups"]
    lines += ["", f"This CPU as the only worker: {_hms(p['this_cpu_one_worker_s'])} (measured per layer × "
              f"{p['layers']}).",
              f"Assumptions (arguments): GPU rates {rates} → speed-ups over this CPU: "
              f"forward ×{speed['forward']:.0f}, Gram ×{speed['gram']:.0f}, Cholesky/GEMM/solve "
              f"×{speed['fp64']:.0f}, SVD ×{speed['svd']:g}; each worker reads weights and Grams at "
              f"{a['read_gbps']:g} GB/s; the shards sum their statistics in a tree of {REDUCE_FAN_IN}, each "
              f"partial ({_gb(r['stats_bytes'])} a layer, packed) on its critical path fetched at "
              f"{a['reduce_gbps']:g} GB/s. "
              f"Calibration is sequential over layers and split over whole sequences ({r['tokens'] // r['seq_len']} "
              "here); decomposition is one independent task per (layer, group), LPT-scheduled; assembly and "
              "evaluation are not counted.", "", *provenance_lines(r)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, RESULTS / "layer_70b")
    parser.add_argument("--scale", type=int, default=1, help="divide hidden, ffn and heads by this (smoke runs)")
    parser.add_argument("--tokens", type=int, help="calibration tokens (default 32768 / scale: more than ffn, "
                       "so the down_proj Gram is not singular)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="sequences per forward chunk")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="forward dtype")
    parser.add_argument("--gram-product-dtype", choices=["float32", "float64"], default="float32",
                       help="as the job's calibration.gram_product_dtype (its default: float32)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--skip-shapes", nargs="+", choices=list(SHAPES), default=[])
    parser.add_argument("--park-factor-mb", type=int, default=4096,
                       help="a whitening factor larger than this waits on disk during its SVD")
    parser.add_argument("--layers", type=int, default=80, help="layers of the predicted model")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64], help="N of the prediction table")
    # H100 SXM dense peaks: bf16 989, fp32 (no TF32) 67, fp64 tensor core 67 TFLOP/s; ~60-75 % of them
    # is what large GEMMs reach. SVD: bidiagonalisation is half memory-bound BLAS-2, so GPUs gain far
    # less than on GEMM (cuSOLVER/MAGMA gesvd: ~5-15× over a multi-core CPU socket); 20× over this
    # 2-core box is deliberately conservative.
    parser.add_argument("--gpu-bf16-tflops", type=float, default=600.0)
    parser.add_argument("--gpu-fp32-tflops", type=float, default=45.0)
    parser.add_argument("--gpu-fp64-tflops", type=float, default=45.0)
    parser.add_argument("--gpu-svd-speedup", type=float, default=20.0, help="GPU SVD speed-up over this CPU's SVD")
    parser.add_argument("--read-gbps", type=float, default=2.0, help="per-worker read of weights and Grams, GB/s")
    parser.add_argument("--reduce-gbps", type=float, default=5.0, help="a shard's fetch + add of another's statistics, GB/s")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.shapes = [s for s in args.shapes if s not in args.skip_shapes]
    args.gpu_tflops = {"bfloat16": args.gpu_bf16_tflops, "float32": args.gpu_fp32_tflops,
                       "float64": args.gpu_fp64_tflops}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    return layer_main(args)


if __name__ == "__main__":
    main()
