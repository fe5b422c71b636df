"""Quality benchmark: WikiText-2 perplexity of dense vs every registered method (SVD, ASVD, SVD-LLM
and the SkipCat ablation cat, skip, skipcat) at several ratios.

Every variant is a job through the same plan as `rankfold run`, on one shared artifact store, so
one calibration pass (and one Fisher pass, one dense evaluation) serves every (method, ratio).
Prints and writes (markdown + JSON) the table with wall time and peak RSS of every stage that ran.

    python benchmarks/quality.py                       # defaults: ~10 min on 2 cores
    python benchmarks/quality.py --calib-samples 32 --eval-tokens 8192 --ratios 0.2
    python benchmarks/quality.py --methods svd_llm skipcat --allocations uniform fisher   # FLRA vs uniform

With `--allocations fisher`, one Fisher pass (streamed backward over the first --fisher-samples
calibration sequences) serves every variant; each method structure's whitened spectra are computed
once and every ratio's global allocation is solved from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankfold.evaluation.report import metric_table  # noqa: E402
from rankfold.jobs.spec import JobSpec, parse_spec  # noqa: E402
from rankfold.methods.registry import METHODS  # noqa: E402
from rankfold.orchestrator.job import run_job  # noqa: E402
from rankfold.storage.store import LocalStore  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=METHODS.names(), choices=METHODS.names())
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--calib-data", type=Path, default=DATA / "calibration" / "enwiki_excerpt.txt")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-data", type=Path, default=DATA / "wikitext2" / "wiki.test.raw")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="token budget of every evaluation")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--allocations", nargs="+", choices=["uniform", "fisher"], default=["uniform"])
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality")
    return parser.parse_args(argv)


def variant_spec(args: argparse.Namespace, method: str, ratio: float, out: Path, allocation: str = "uniform") -> JobSpec:
    return parse_spec({
        "model": {"source": args.model, "dtype": args.dtype},
        "method": {"name": method},
        "target": {"ratio": ratio, "allocation": {"kind": allocation} | (
            {"fisher_samples": args.fisher_samples} if allocation == "fisher" else {})},
        "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.calib_samples,
                        "seq_len": args.seq_len},
        "evaluation": {"perplexity": [{"name": "wikitext2", "window": args.window, "max_tokens": args.eval_tokens,
                                       "data": {"path": str(args.eval_data), "lines_as_rows": True}}]},
        "output": {"dir": str(out)},
    })


def main(argv: list[str] | None = None) -> dict:
    """Every (ratio, method, allocation) is one job through the same plan as `rankfold run`, all on one
    artifact store: the calibration, the Fisher pass and the dense evaluation run once and are reused."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store, rows, tokens, windows = LocalStore(args.out / "artifacts"), [], 0, {}
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                if allocation == "fisher" and not METHODS.get(method).whitened:
                    continue
                name = method if allocation == "uniform" else f"{method}+fisher"
                spec = variant_spec(args, method, ratio, args.out / f"{name}-{ratio:g}", allocation)
                report = run_job(spec, stream=sys.stderr, store=store)
                (ppl,) = metric_table(report["rows"])
                if not rows:
                    rows.append({"method": "dense", "ratio": 0.0, "achieved": 0.0, "ppl": ppl["dense"], "stages": []})
                    windows = {"tokens": ppl["tokens"], "windows": ppl["windows"]}
                tokens = report["calibration_tokens"] or tokens
                rows.append({"method": name, "ratio": ratio, "ppl": ppl["compressed"], "stages": report["stages"],
                             "achieved": report["parameters"]["achieved_compression"]})
                print(f"{name} @ {ratio:.0%}: ppl {ppl['compressed']:.3f}", file=sys.stderr)
    result = {
        "model": args.model, "dtype": args.dtype, "calibration": {"data": str(args.calib_data),
        "samples": args.calib_samples, "seq_len": args.seq_len, "tokens": tokens},
        "evaluation": {"data": str(args.eval_data), "window": args.window, **windows},
        "rows": rows, "total_wall_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=2))
    (args.out / "quality.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    cal, ev = result["calibration"], result["evaluation"]
    lines = [
        f"### Quality: {result['model']} ({result['dtype']}), WikiText-2 perplexity",
        "",
        f"Calibration: {cal['samples']} × {cal['seq_len']} tokens from `{Path(cal['data']).name}`. "
        f"Evaluation: `{Path(ev['data']).name}` rows joined with \"\\n\\n\", {ev['windows']} non-overlapping windows of "
        f"{ev['window']} tokens ({ev['tokens']} tokens). Compression = 1 − params after / before over the seven "
        "projections of every layer (embeddings, lm_head, norms not counted).",
        "",
        "| method | target | achieved | WikiText-2 ppl | stages: wall s (peak RSS MiB) |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        stages = ", ".join(f"{s['stage']} {s['wall_s']:.1f} ({s['peak_rss_mb']:.0f})" for s in row["stages"])
        target = "—" if row["method"] == "dense" else f"{row['ratio']:.0%}"
        achieved = "—" if row["method"] == "dense" else f"{row['achieved']:.2%}"
        lines.append(f"| {row['method']} | {target} | {achieved} | {row['ppl']:.2f} | {stages} |")
    lines += ["", f"Total {result['total_wall_s']:.0f} s on {result['machine']}.", f"Rerun: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
