"""Quality benchmark: WikiText-2 perplexity of dense vs SVD / ASVD / SVD-LLM and the SkipCat
ablation (cat, skip, skipcat) at several ratios.

One calibration pass serves every (method, ratio): statistics do not depend on either. Then, per
variant: rank plan, decomposition, checkpoint assembly, streamed evaluation of the written checkpoint.
Prints and writes (markdown + JSON) the table with wall time and peak RSS of every stage.

    python benchmarks/quality.py                       # defaults: ~10 min on 2 cores
    python benchmarks/quality.py --calib-samples 32 --eval-tokens 8192 --ratios 0.2
    python benchmarks/quality.py --methods svd_llm skipcat --allocations uniform fisher   # FLRA vs uniform

With `--allocations fisher`, one Fisher pass (streamed backward over the first --fisher-samples
calibration sequences) serves every variant; each method's whitened spectra are computed once and
every ratio's global allocation is solved from them.
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

from rankfold.data.text import load_text, tokenize  # noqa: E402
from rankfold.evaluation.report import parameter_counts  # noqa: E402
from rankfold.jobs.spec import WHITENED_METHODS, JobSpec, parse_spec  # noqa: E402
from rankfold.models.sources import SafetensorsSource  # noqa: E402
from rankfold.orchestrator.executor import LocalExecutor  # noqa: E402
from rankfold.orchestrator.metering import StageMeter  # noqa: E402
from rankfold.orchestrator.pipeline import (assemble, calibrate, decompose, fisher, fisher_ranks,  # noqa: E402
                                            matrix_shapes, perplexity, plan_layout, preflight, spectra)
from rankfold.orchestrator.store import LocalStore  # noqa: E402
from rankfold.workers.evaluate import make_windows  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm", "cat", "skip", "skipcat"])
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
        "target": {"ratio": ratio, "allocation": {"kind": allocation, "fisher_samples": args.fisher_samples}},
        "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.calib_samples,
                        "seq_len": args.seq_len},
        "evaluation": {"perplexity": [{"name": "wikitext2", "window": args.window, "max_tokens": args.eval_tokens,
                                       "data": {"path": str(args.eval_data), "lines_as_rows": True}}]},
        "output": {"dir": str(out)},
    })


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    first = variant_spec(args, args.methods[0], args.ratios[0], args.out)
    source = preflight(first)
    executor = LocalExecutor(sys.stderr)
    shared_store, scratch = LocalStore(args.out / "calibration"), args.out / "scratch"
    ppl_spec = first.evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl_spec.data), source.tokenizer()), ppl_spec.window, ppl_spec.max_tokens)

    shared_meter = StageMeter()
    with shared_meter.stage("calibrate"):
        tokens, _ = calibrate(first, source, shared_store, executor, scratch)
    with shared_meter.stage("evaluate dense"):
        dense_ppl = perplexity(source, windows, args.dtype, 1, executor, "dense", None, scratch)

    if "fisher" in args.allocations:
        with shared_meter.stage("fisher"):
            fisher_result, _ = fisher(variant_spec(args, "svd_llm", args.ratios[0], args.out, "fisher"), source,
                                      shared_store, executor, scratch)

    rows = [{"method": "dense", "ratio": 0.0, "achieved": 0.0, "ppl": dense_ppl, "stages": shared_meter.as_rows()}]
    shapes = matrix_shapes(source, first)
    spectra_done: set[str] = set()
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                if allocation == "fisher" and method not in WHITENED_METHODS:
                    continue
                name = method if allocation == "uniform" else f"{method}+fisher"
                spec = variant_spec(args, method, ratio, args.out / f"{name}-{ratio:g}", allocation)
                meter, factor_store = StageMeter(), LocalStore(args.out / f"{name}-{ratio:g}" / "artifacts")
                layout = plan_layout(spec, source.architecture, shapes)
                if allocation == "fisher":
                    with meter.stage("spectra + allocate"):
                        if method not in spectra_done:  # the spectra depend on the method's structure only
                            spectra(source, layout, shared_store, executor, "stats", f"spectra/{method}")
                            spectra_done.add(method)
                        ranks = fisher_ranks(spec, source, layout, shapes, shared_store, "fisher", f"spectra/{method}")
                    layout = plan_layout(spec, source.architecture, shapes, ranks=ranks)
                with meter.stage("decompose"):
                    decompose(spec, source, layout, shared_store, executor, factor_store)
                with meter.stage("assemble"):
                    assemble(spec, source, layout, factor_store, executor, args.out / f"{name}-{ratio:g}" / "model")
                with meter.stage("evaluate"):
                    ppl = perplexity(SafetensorsSource(args.out / f"{name}-{ratio:g}" / "model"), windows, args.dtype,
                                     1, executor, f"{name} {ratio:g}", layout, scratch)
                counts = parameter_counts(shapes, layout.by_layer, model_total=0)
                rows.append({"method": name, "ratio": ratio, "achieved": counts["achieved_compression"], "ppl": ppl,
                             "stages": meter.as_rows()})
                print(f"{name} @ {ratio:.0%}: ppl {ppl:.3f}", file=sys.stderr)

    result = {
        "model": args.model, "dtype": args.dtype, "calibration": {"data": str(args.calib_data),
        "samples": args.calib_samples, "seq_len": args.seq_len, "tokens": tokens},
        "evaluation": {"data": str(args.eval_data), "window": args.window, "tokens": windows.numel(),
                       "windows": windows.shape[0]},
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
