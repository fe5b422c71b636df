"""Quality benchmark: WikiText-2 perplexity of dense vs every registered method (SVD, ASVD, SVD-LLM
and the SkipCat ablation cat, skip, skipcat) at several ratios.

Every variant is a job through the same plan as `rankfold run`, on one shared artifact store, so
one calibration pass (and one Fisher pass, one dense evaluation) serves every (method, ratio).
Prints and writes (markdown + JSON) the table with wall time and peak RSS of every stage that ran.

    python benchmarks/quality.py                       # defaults: ~10 min on 2 cores
    python benchmarks/quality.py --calib-samples 32 --eval-tokens 8192 --ratios 0.2
    python benchmarks/quality.py --methods svd_llm skipcat --allocations uniform fisher   # FLRA vs uniform
    python benchmarks/quality.py --methods svd_llm skipcat --allocations uniform fisher --ratios 0.2 \
        --suite --suite-limit 500 --xsum-limit 200 --suite-dtype bfloat16       # + zero-shot suite, XSum

With `--suite`, every variant also runs lm-eval's seven zero-shot tasks (first --suite-limit
documents each, from ../shared/data) and XSum summaries (first --xsum-limit, ROUGE), and a PNG
beside the table plots perplexity and the zero-shot average against compression, one line per method.

CAP and its baselines at one budget (seed 001): `--methods svd_llm wanda cap --allocations uniform fisher
search search-uniform --ratios 0.2 0.4 0.5` — `search` is CAP's REINFORCE search over the robust PCA
units (`--search-*` settings), `search-start` its starting point (FLRA's loss model) with no step taken,
`search-uniform` the same units under the uniform keep rule; sparse
entries count value + index unless `--values-only` (the papers' convention; the table shows both).

With `--allocations fisher`, one Fisher pass (streamed backward over the first --fisher-samples
calibration sequences) serves every variant; each method structure's whitened spectra are computed
once and every ratio's global allocation is solved from them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import DATA, REPO, describe, provenance, write_result  # noqa: E402
from rankfold.cli import logging_to_stderr  # noqa: E402
from rankfold.evaluation.report import metric_table  # noqa: E402
from rankfold.jobs.spec import JobSpec, parse_spec  # noqa: E402
from rankfold.methods.registry import METHODS  # noqa: E402
from rankfold.orchestrator.job import run_job  # noqa: E402
from rankfold.storage.store import LocalStore  # noqa: E402


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
    parser.add_argument("--allocations", nargs="+", choices=list(ALLOCATION_NAMES), default=["uniform"])
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--search-steps", type=int, default=64, help="CAP: REINFORCE steps")
    parser.add_argument("--search-samples", type=int, default=32, help="CAP: calibration sequences searched on")
    parser.add_argument("--search-batch", type=int, default=4, help="CAP: sequences per step")
    parser.add_argument("--search-temperature", type=float, default=0.1, help="CAP: smoothing of the start")
    parser.add_argument("--search-estimator", choices=["score", "natural"], default="natural",
                        help="CAP: the paper's score-function step or its natural-gradient form")
    parser.add_argument("--search-window", type=int, default=1,
                        help="CAP: units in score order the search's gradient is averaged over (1: per unit)")
    parser.add_argument("--search-lr", type=float, default=0.05, help="CAP: learning rate of the search")
    parser.add_argument("--search-holdout", type=int, default=16,
                        help="CAP: held-out calibration sequences that choose among the top-Ks (0: the last)")
    parser.add_argument("--search-validate-every", type=int, default=16, help="CAP: steps between held-out scores")
    parser.add_argument("--rpca-iterations", type=int, default=3, help="CAP: robust PCA iterations")
    parser.add_argument("--rpca-triples", choices=["residual_svd", "rpca"], default="residual_svd",
                        help="CAP: triples from the SVD of W − S (default) or robust PCA's own L")
    parser.add_argument("--rpca-lam-scale", type=float, default=1.0, help="CAP: λ = scale/√max(m, n)")
    parser.add_argument("--no-whiten", action="store_true", help="CAP: robust PCA of W, not W·S (whitened)")
    parser.add_argument("--no-debias", action="store_true", help="CAP: keep SVT's shrunk singular values")
    parser.add_argument("--values-only", action="store_true",
                        help="sparse entries cost 1 parameter (the papers' convention), not value + index")
    parser.add_argument("--suite", action="store_true", help="also the zero-shot suite and XSum ROUGE")
    parser.add_argument("--suite-limit", type=int, default=500, help="documents per zero-shot task")
    parser.add_argument("--xsum-limit", type=int, default=200, help="XSum documents (0: no generation)")
    parser.add_argument("--suite-dtype", default=None, help="dtype of the suite (default: --dtype)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality")
    return parser.parse_args(argv)


# --allocations name -> (allocation kind, suffix of the row's name)
ALLOCATION_NAMES = {"uniform": ("uniform", ""), "fisher": ("flra", "+fisher"), "search": ("search", ""),
                    "search-uniform": ("search", "+uniform-keep"), "search-start": ("search", "+fisher-keep")}


def allocation_spec(args: argparse.Namespace, name: str) -> dict:
    if name == "fisher":
        return {"kind": "flra", "fisher_samples": args.fisher_samples}
    if name.startswith("search"):  # search-start: the search's starting point alone (no step taken)
        return {"kind": "search", "rule": "uniform" if name == "search-uniform" else "reinforce",
                "steps": 0 if name == "search-start" else args.search_steps, "samples": args.search_samples,
                "batch_size": args.search_batch, "temperature": args.search_temperature,
                "fisher_samples": args.fisher_samples, "estimator": args.search_estimator, "lr": args.search_lr,
                "gradient_window": args.search_window,
                "holdout": args.search_holdout, "validate_every": args.search_validate_every}
    return {"kind": "uniform"}


def applies(method: str, allocation: str) -> bool:
    """Whether a --methods × --allocations pair is a variant (FLRA needs a whitened method; CAP its search)."""
    kind, entry = ALLOCATION_NAMES[allocation][0], METHODS.get(method)
    if entry.allocations is not None:
        return kind in entry.allocations
    return kind != "search" and (kind != "flra" or entry.whitened)


def method_spec(args: argparse.Namespace, method: str) -> dict:
    options = {"name": method}
    if METHODS.get(method).structure.sparse:
        options["count_indices"] = not args.values_only
    if method == "cap":
        options.update({"iterations": args.rpca_iterations, "lam_scale": args.rpca_lam_scale,
                        "triples": args.rpca_triples, "whiten": not args.no_whiten,
                        "debias": not args.no_debias})
    return options


SUITE_FILES = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl",
               "arc_challenge": "arc/ARC-Challenge-Test.jsonl", "hellaswag": "hellaswag/hellaswag_val.llamacpp.jsonl",
               "winogrande": "winogrande/dev.jsonl", "boolq": "boolq/val.jsonl", "openbookqa": "openbookqa/test.jsonl"}


def suite_evaluations(args: argparse.Namespace) -> dict:
    if not args.suite:
        return {}
    tasks = {task: {"path": str(DATA / path), "limit": args.suite_limit} for task, path in SUITE_FILES.items()}
    out = {"zeroshot": [{"name": "suite", "tasks": tasks, "dtype": args.suite_dtype}]}
    if args.xsum_limit:
        out["generation"] = [{"name": "xsum", "data": str(DATA / "xsum" / "test_1000.jsonl"), "limit": args.xsum_limit,
                              "dtype": args.suite_dtype}]
    return out


def variant_spec(args: argparse.Namespace, method: str, ratio: float, out: Path, allocation: str = "uniform") -> JobSpec:
    return parse_spec({
        "model": {"source": args.model, "dtype": args.dtype},
        "method": method_spec(args, method),
        "target": {"ratio": ratio, "allocation": allocation_spec(args, allocation)},
        "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.calib_samples,
                        "seq_len": args.seq_len},
        "evaluation": {"perplexity": [{"name": "wikitext2", "window": args.window, "max_tokens": args.eval_tokens,
                                       "data": {"path": str(args.eval_data), "lines_as_rows": True}}]}
                      | suite_evaluations(args),
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
                if not applies(method, allocation):
                    continue
                name = method + ALLOCATION_NAMES[allocation][1]
                spec = variant_spec(args, method, ratio, args.out / f"{name}-{ratio:g}", allocation)
                report = run_job(spec, store=store)
                (ppl,) = metric_table(report["rows"])
                if not rows:
                    rows.append({"method": "dense", "ratio": 0.0, "achieved": 0.0, "ppl": ppl["dense"], "stages": [],
                                 "metrics": suite_metrics(report, "dense")})
                    windows = {"tokens": ppl["tokens"], "windows": ppl["windows"]}
                tokens = report["calibration_tokens"] or tokens
                params = report["parameters"]
                rows.append({"method": name, "ratio": ratio, "ppl": ppl["compressed"], "stages": report["stages"],
                             "achieved": params["achieved_compression"], "metrics": suite_metrics(report, "compressed"),
                             **{k: params[k] for k in ("compression_indices_counted", "compression_values_only")
                                if k in params}})
                print(f"{name} @ {ratio:.0%}: ppl {ppl['compressed']:.3f}", file=sys.stderr)
                result = write_results(args, argv, rows, tokens, windows, started)  # after every variant
    print(to_markdown(result))
    return result


def write_results(args: argparse.Namespace, argv: list[str] | None, rows: list[dict], tokens: int, windows: dict,
                  started: float) -> dict:
    """quality.json / .md (and the PNG with --suite) of the rows so far: a long run keeps what it measured."""
    result = {
        **provenance("quality", argv),
        "model": args.model, "dtype": args.dtype, "calibration": {"data": str(args.calib_data),
        "samples": args.calib_samples, "seq_len": args.seq_len, "tokens": tokens},
        "evaluation": {"data": str(args.eval_data), "window": args.window, **windows},
        "rows": rows, "total_wall_s": round(time.perf_counter() - started, 1),
    }
    write_result("quality", result, folder=args.out, markdown=to_markdown(result))
    if args.suite:
        plot_suite(result, args.out / "quality.png")
    return result


def suite_metrics(report: dict, variant: str) -> dict[str, float]:
    """Zero-shot and ROUGE values of one variant: {"piqa acc_norm": ..., "average": ..., "rougeL": ...}."""
    return {row["metric"]: row["value"] for row in report["rows"]
            if row["evaluator"] in ("zeroshot", "generation") and row["variant"] == variant}


def plot_suite(result: dict, path: Path) -> None:
    """Perplexity (log scale) and zero-shot average against achieved compression, one line per method
    (every line starts at the dense model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = result["rows"][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in result["rows"][1:]):
        points = [dense] + sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["achieved"])
        x = [100 * r["achieved"] for r in points]
        left.plot(x, [r["ppl"] for r in points], marker="o", label=method)
        right.plot(x, [100 * r["metrics"]["average"] for r in points], marker="o", label=method)
    left.set(yscale="log", xlabel="achieved compression (%)", ylabel="WikiText-2 perplexity",
             title=f"{result['model']}: perplexity")
    right.set(xlabel="achieved compression (%)", ylabel="zero-shot average accuracy (%)",
              title="zero-shot average (7 tasks)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        if "compression_values_only" in row:  # sparse entries: both conventions
            achieved += (f" ({row['compression_indices_counted']:.2%} value + index, "
                         f"{row['compression_values_only']:.2%} values only)")
        lines.append(f"| {row['method']} | {target} | {achieved} | {row['ppl']:.2f} | {stages} |")
    lines += suite_markdown(result["rows"])
    lines += ["", f"Total {result['total_wall_s']:.0f} s on {describe(result['machine'])}.",
              f"Rerun: `{result['command']}`", ""]
    return "\n".join(lines)


def suite_markdown(rows: list[dict]) -> list[str]:
    """The zero-shot tasks (the metric the average takes from each), the average and ROUGE per variant."""
    if not rows[0].get("metrics"):
        return []
    metrics = rows[0]["metrics"]
    tasks = [m for m in metrics if m.endswith(" acc_norm") or (m.endswith(" acc") and f"{m}_norm" not in metrics)]
    rouges = [m for m in metrics if m.startswith("rouge")]
    lines = ["", "| method | target | " + " | ".join(tasks + ["zero-shot average"] + rouges) + " |",
             "|---|---|" + "---|" * (len(tasks) + 1 + len(rouges))]
    for row in rows:
        target = "—" if row["method"] == "dense" else f"{row['ratio']:.0%}"
        values = " | ".join(f"{100 * row['metrics'][m]:.2f}" for m in tasks + ["average"] + rouges)
        lines.append(f"| {row['method']} | {target} | {values} |")
    return lines


if __name__ == "__main__":
    with logging_to_stderr():  # the jobs' progress and reports
        main()
