"""Generation benchmark: XSum ROUGE of static low-rank models vs FLRC's progressive low-rank decoding
(PLRD) at equal average decode cost, and the per-token decode latency of the active rank.

    python benchmarks/generation.py                                   # everything below, ~1.5 h on 2 cores
    python benchmarks/generation.py --xsum-limit 50 --skip-latency    # a quicker look
    python benchmarks/generation.py --latency-only                    # decode time per token only

Rows (every one a job through the same plan as `rankfold run`, all on one artifact store, so the
calibration, the Fisher pass and the dense XSum run once; --store shares another benchmark's):
  dense; static SVD-LLM and FLRA (+ SVD-LLM) at each --static ratio;
  PLRD: a model stored at ratio a decoding with a schedule whose average decode cost equals the
  static ratio-b model's (--pairs a:b), for uniform and FLRA ranks; FLRA-ranked models decode
  with both orders (every module the same fraction; FLRA's loss model: low-Fisher modules first);
  ablation: the uniform model decoding at one constant rank after the same full-rank prefill.
Decode cost = parameters of the compressed matrices touched per generated token / their dense count.

Latency: SmolLM2 stored at --latency-ratio, batch 1, a --latency-prompt-token prompt, greedy decode of
--latency-tokens tokens with every module at r′/r ∈ {1, 0.75, 0.5} (torch path, this machine's
threads); median per-token time, and the share of it spent inside the compressed matrices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import DATA, REPO, describe, provenance, write_result  # noqa: E402
from rankfold.cli import logging_to_stderr  # noqa: E402
from rankfold.jobs.spec import parse_spec  # noqa: E402
from rankfold.orchestrator.job import run_job  # noqa: E402
from rankfold.storage.store import LocalStore  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--static", nargs="+", type=float, default=[0.2, 0.3])
    parser.add_argument("--pairs", nargs="+", default=["0.1:0.2", "0.2:0.3"], help="stored:target ratio pairs")
    parser.add_argument("--shape", default="exponential", choices=["linear", "step", "exponential", "constant"])
    parser.add_argument("--decay-tokens", type=float, default=8.0)
    parser.add_argument("--step-at", type=int, default=8)
    parser.add_argument("--xsum-limit", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16", help="forward dtype of generation")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--latency-ratio", type=float, default=0.2)
    parser.add_argument("--latency-prompt-tokens", type=int, default=512)
    parser.add_argument("--latency-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generation")
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: OUT/artifacts)")
    return parser.parse_args(argv)


def xsum(args: argparse.Namespace, name: str = "xsum", progressive: dict | None = None) -> dict:
    entry = {"name": name, "data": str(DATA / "xsum" / "test_1000.jsonl"), "limit": args.xsum_limit, "dtype": args.dtype}
    return entry | ({"progressive": progressive} if progressive else {})


def job_spec(args: argparse.Namespace, ratio: float, allocation: str, generation: list[dict], out: Path) -> dict:
    return {
        "model": {"source": args.model, "dtype": "float32"},
        "method": {"name": "svd_llm"},
        "target": {"ratio": ratio, "allocation": {"kind": allocation} | (
            {"fisher_samples": args.fisher_samples} if allocation == "flra" else {})},
        "calibration": {"data": {"path": str(DATA / "calibration" / "enwiki_excerpt.txt")},
                        "num_samples": args.calib_samples, "seq_len": args.seq_len},
        "evaluation": {"generation": generation},
        "output": {"dir": str(out)},
    }


def schedule(args: argparse.Namespace, target: float, order: str) -> dict:
    return {"shape": args.shape, "decay_tokens": args.decay_tokens, "step_at": args.step_at,
            "target_ratio": target, "order": order}


def variants(args: argparse.Namespace) -> list[tuple[str, float, str, list[dict]]]:
    """(label, stored ratio, allocation, generation entries) of every job."""
    out = []
    for ratio in args.static:
        out += [(f"svd_llm-{ratio:g}", ratio, "uniform", [xsum(args)]),
                (f"flra-{ratio:g}", ratio, "flra", [xsum(args)])]
    for pair in args.pairs:
        stored, target = (float(x) for x in pair.split(":"))
        out.append((f"svd_llm-{stored:g}-plrd", stored, "uniform",  # its own folder: the static job's differs
                    [xsum(args, f"plrd-{target:g}-uniform", schedule(args, target, "uniform"))]))
        # Ablation: the same prefill at the stored rank, then one constant decode rank at the same cost —
        # what the front-loaded schedule adds beyond a better prefill.
        out.append((f"svd_llm-{stored:g}-constant", stored, "uniform",
                    [xsum(args, f"constant-{target:g}", schedule(args, target, "uniform") | {"shape": "constant"})]))
        out.append((f"flra-{stored:g}-plrd", stored, "flra",
                    [xsum(args, f"plrd-{target:g}-{order}", schedule(args, target, order))
                     for order in ("uniform", "fisher")]))
    return out


def run_rows(args: argparse.Namespace, store: LocalStore, write) -> list[dict]:
    rows: list[dict] = []
    for k, (label, ratio, allocation, generation) in enumerate(variants(args)):
        spec = job_spec(args, ratio, allocation, generation, args.out / label)
        spec["evaluation"]["dense"] = k == 0  # the dense XSum once (a progressive entry decodes dense as it is)
        report = run_job(parse_spec(spec), store=store)
        achieved = report["parameters"]["achieved_compression"]
        for row in report["rows"]:
            if row["evaluator"] != "generation" or row["metric"] != "rougeL":
                continue
            if row["variant"] == "dense":
                if not any(r["model"] == "dense" for r in rows):
                    rows.append({"model": "dense", "decoding": "static", "stored": 0.0, "decode_cost": 1.0,
                                 **_rouge(report, "dense", row["name"])})
                continue
            progressive = "decode_cost" in row
            rows.append({"model": label, "stored": achieved, "decoding": row["name"] if progressive else "static",
                         "decode_cost": row["decode_cost"] if progressive else 1 - achieved,
                         "schedule": row.get("schedule"), **_rouge(report, "compressed", row["name"])})
            print(f"{label} {rows[-1]['decoding']}: ROUGE-L {row['value']:.4f} at decode cost "
                  f"{rows[-1]['decode_cost']:.4f}", file=sys.stderr)
        write(rows)
    return rows


def _rouge(report: dict, variant: str, name: str) -> dict:
    values = {r["metric"]: r["value"] for r in report["rows"]
              if r["evaluator"] == "generation" and r["variant"] == variant and r["name"] == name}
    stage = next((s for s in report["stages"] if s["stage"] == f"evaluate generation {variant} {name}"), None)
    return {"rouge1": values["rouge1"], "rouge2": values["rouge2"], "rougeL": values["rougeL"],
            "wall_s": stage["wall_s"] if stage else None}


def _cache_arg() -> str:
    """transformers 5.x names the forward's KV cache `cache` (4.x: `past_key_values`)."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARG = _cache_arg()


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def decode_latency(args: argparse.Namespace, checkpoint: Path) -> dict:
    """Median per-token decode time at r′/r ∈ {1, 0.75, 0.5}, and the compressed matrices' share of it."""
    import rankfold
    from rankfold.modules.progressive import rank_modules

    model = rankfold.load(checkpoint, dtype=torch.float32)
    modules = rank_modules(model)
    prompt = torch.randint(100, 10000, (1, args.latency_prompt_tokens), generator=torch.Generator().manual_seed(0))
    inside = [0.0]
    starts: dict[int, float] = {}

    def enter(module, _):
        starts[id(module)] = time.perf_counter()

    def leave(module, _, __):
        inside[0] += time.perf_counter() - starts.pop(id(module))

    out = {"ratio": args.latency_ratio, "prompt_tokens": args.latency_prompt_tokens, "tokens": args.latency_tokens,
           "threads": torch.get_num_threads(), "fractions": {}}
    for fraction in (1.0, 0.75, 0.5):
        for module in modules.values():
            module.set_active_rank(max(1, round(module.rank * fraction)))
        per_token = []
        timed = [m for name, m in model.named_modules() if type(m).__name__ in ("LowRankLinear", "SharedProjection")]
        for repeat in range(4):  # the first is a warm-up
            with torch.no_grad():
                cache = _cache_of(model(prompt, use_cache=True))
                token = prompt[:, -1:]
                handles = [h for m in timed for h in (m.register_forward_pre_hook(enter),
                                                      m.register_forward_hook(leave))] if repeat == 3 else []
                inside[0], begin = 0.0, time.perf_counter()
                for _ in range(args.latency_tokens):
                    logits = model(token, use_cache=True, **{CACHE_ARG: cache}).logits
                    token = logits[:, -1:].argmax(-1)
                elapsed = time.perf_counter() - begin
                for h in handles:
                    h.remove()
            if repeat in (1, 2):
                per_token.append(elapsed / args.latency_tokens)
            if repeat == 3:
                share = inside[0] / elapsed
        out["fractions"][str(fraction)] = {"ms_per_token": 1000 * statistics.median(per_token),
                                           "compressed_share": share}
        print(f"r'/r = {fraction}: {out['fractions'][str(fraction)]}", file=sys.stderr)
    return out


def to_markdown(result: dict) -> str:
    lines = [f"### Generation: {result['model']}, XSum first {result['xsum_limit']} documents ({result['dtype']})", "",
             "Decode cost: parameters of the compressed matrices touched per generated token / their dense "
             "parameters (static models: 1 − compression).", "",
             "| model (stored) | decoding | decode cost | ROUGE-1 | ROUGE-2 | ROUGE-L | floor | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        floor = f"{r['schedule']['floor']:.3f}" if r.get("schedule") else "—"
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "—"
        lines.append(f"| {r['model']} ({r['stored']:.1%}) | {r['decoding']} | {r['decode_cost']:.3f} | "
                     f"{100 * r['rouge1']:.2f} | {100 * r['rouge2']:.2f} | {100 * r['rougeL']:.2f} | {floor} | {wall} |")
    if result.get("latency"):
        lat = result["latency"]
        lines += ["", f"Decode latency, SVD-LLM {lat['ratio']:.0%}, batch 1, {lat['prompt_tokens']}-token prompt, "
                      f"{lat['tokens']} tokens, float32 torch path, {lat['threads']} threads:", "",
                  "| r′/r | ms / token | share in compressed matrices |", "|---|---|---|"]
        lines += [f"| {f} | {v['ms_per_token']:.2f} | {100 * v['compressed_share']:.0f} % |"
                  for f, v in lat["fractions"].items()]
    lines += ["", f"Total {result['total_wall_s']:.0f} s on {describe(result['machine'])}.", f"Rerun: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    store, started = LocalStore(args.store or args.out / "artifacts"), time.perf_counter()
    result = {**provenance("generation", argv), "model": args.model, "xsum_limit": args.xsum_limit,
              "dtype": args.dtype, "rows": [], "latency": None}

    def write(rows: list[dict]) -> None:
        result["rows"], result["total_wall_s"] = rows, round(time.perf_counter() - started, 1)
        write_result("generation", result, folder=args.out, markdown=to_markdown(result))

    if not args.latency_only:
        run_rows(args, store, write)
    if not args.skip_latency:
        spec = job_spec(args, args.latency_ratio, "uniform", [], args.out / f"latency-svd_llm-{args.latency_ratio:g}")
        checkpoint = run_job(parse_spec(spec), store=store)["checkpoint"]
        result["latency"] = decode_latency(args, Path(checkpoint))
    write(result["rows"])
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    with logging_to_stderr():  # the jobs' progress and reports
        main()
