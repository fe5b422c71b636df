"""Anchored fitting benchmark: rankfold's whitened methods fitted plain (each layer to its dense
inputs), anchored (to the dense outputs from the compressed-so-far inputs, AA-SVD's objective),
mixed (the plain term's weight chosen per input group on held-out calibration sequences: on each
module's own anchored error, or with mixed-layer on the layer's output error), and any of them with the
output correction (down_proj's B refitted to the dense layer output from the compressed stream, kept
by held-out error; with attn, o_proj's too toward the dense residual after attention), on the quality benchmark's calibration windows and WikiText-2
evaluation, plus a second text (Tiny Shakespeare) to check that the ranking is not WikiText's.

    python -m benchmarks.anchored                                     # FLRA + SkipCat at 40 %, every variant
    python -m benchmarks.anchored --methods svd_llm skipcat --allocations uniform fisher --ratios 0.2 0.4 0.6
    python -m benchmarks.anchored --calib-samples 32 --eval-tokens 8192  # a quick look (~4 min a walk)
    python -m benchmarks.anchored --variants plain plain+correction --suite  # + the zero-shot suite, 200 docs a task

Every variant is a job through `rankfold run`'s plan on one shared artifact store (one calibration,
Fisher pass and dense evaluation serve every row). Prints and writes (markdown + JSON) perplexity
on both texts, the anchored walk's time against the plain job's calibrate + decompose, and which
weights the groups kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import DATA, REPO, describe, provenance, write_result  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    ALLOCATION_NAMES,
    allocation_spec,
    applies,
    method_spec,
    suite_evaluations,
    suite_metrics,
)
from rankfold.cli import logging_to_stderr  # noqa: E402
from rankfold.core.errors import DecompositionError  # noqa: E402
from rankfold.evaluation.report import metric_table  # noqa: E402
from rankfold.jobs.spec import parse_spec  # noqa: E402
from rankfold.orchestrator.job import run_job  # noqa: E402
from rankfold.storage.store import LocalStore  # noqa: E402

# --variants name -> the spec's fitting (None: the plain method); one that names no output_mix fits down_proj
# as the other groups (output_mix: null, as the rows it reproduces were measured), not at the spec's default
VARIANTS = {"plain": lambda args: None, "anchored": lambda args: {"mix": [0.0], "holdout": args.holdout},
            # the weight chosen on each module's own held-out anchored error (the default chooses on the layer's)
            "mixed": lambda args: {"mix": args.mix, "holdout": args.holdout, "choose_on": "module"},
            "anchored+correction": lambda args: {"mix": [0.0], "holdout": args.holdout, "output_correction": True},
            # the plain factors (w = 1) with the compressed stream tracked only for the output correction
            "plain+correction": lambda args: {"mix": [1.0], "holdout": args.holdout, "output_correction": True},
            # o_proj's B corrected too, toward the dense residual after attention
            "plain+attn+correction": lambda args: {"mix": [1.0], "holdout": args.holdout, "output_correction": True,
                                                   "attention_correction": True},
            "mixed+correction": lambda args: {"mix": args.mix, "holdout": args.holdout, "output_correction": True,
                                              "choose_on": "module"},
            # plain factors but down_proj's, fitted to the dense layer output at a weight chosen on held-out
            # layer-output error (fitting.output_mix), then the output correction
            "output-mixed+correction": lambda args: {"mix": [1.0], "output_mix": args.mix, "holdout": args.holdout,
                                                     "output_correction": True},
            # and o_proj fitted toward the dense residual after attention, its weight chosen on the held-out
            # layer output (fitting.attention_output_mix)
            "output-mixed-attn+correction": lambda args: {"mix": [1.0], "output_mix": args.mix, "holdout": args.holdout,
                                                          "output_correction": True, "attention_output_mix": True},
            # + fitting.refine: a few Adam steps on each layer's factors toward the dense layer output
            "plain+correction+refine": lambda args: {"mix": [1.0], "holdout": args.holdout, "output_correction": True,
                                                     "refine": refine(args)},
            "output-mixed+correction+refine": lambda args: {"mix": [1.0], "output_mix": args.mix, "holdout": args.holdout,
                                                            "output_correction": True, "refine": refine(args)},
            # the weight chosen on the held-out layer output (the default) instead of each module's own anchored error
            "mixed-layer+correction": lambda args: {"mix": args.mix, "holdout": args.holdout, "output_correction": True,
                                                    "choose_on": "layer"}}

# each fitted variant with fitting.token_weights relative: a token's error toward a residual over its mean square
VARIANTS.update({f"{name}+relative": (lambda args, fitting=fitting: {**fitting(args), "token_weights": "relative"})
                 for name, fitting in list(VARIANTS.items()) if name != "plain"})


def refine(args: argparse.Namespace) -> dict:
    return {"steps": args.refine_steps, "lr": args.refine_lr, "sequences": args.refine_sequences,
            "checks": args.refine_checks}


FITTED = ("anchored", "decompose", "calibrate")  # stages whose time is the fitting's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["skipcat"])
    parser.add_argument("--allocations", nargs="+", default=["fisher"], choices=list(ALLOCATION_NAMES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--mix", nargs="+", type=float, default=[0.0, 0.2, 0.5, 0.8, 1.0],
                        help="the mixed variant's candidate plain-term weights")
    parser.add_argument("--refine-steps", type=int, default=32, help="the refine variants' Adam steps per layer")
    parser.add_argument("--refine-lr", type=float, default=1e-5)
    parser.add_argument("--refine-sequences", type=int, default=4, help="calibration sequences per refinement step")
    parser.add_argument("--refine-checks", type=int, default=8, help="held-out scorings per layer's refinement")
    parser.add_argument("--holdout", type=int, default=16, help="calibration sequences held out to choose the weight")
    parser.add_argument("--calib-data", type=Path, default=DATA / "calibration" / "enwiki_excerpt.txt")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-data", type=Path, default=DATA / "wikitext2" / "wiki.test.raw")
    parser.add_argument("--second-eval", type=Path, default=DATA / "tinyshakespeare" / "input.txt")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--suite", action="store_true", help="also lm-eval's seven zero-shot tasks (their average)")
    parser.add_argument("--suite-limit", type=int, default=200, help="documents per zero-shot task")
    parser.add_argument("--suite-dtype", default=None, help="dtype of the suite (default: --dtype)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anchored")
    args = parser.parse_args(argv)
    args.xsum_limit = 0  # the suite without XSum's generation (quality.py runs it)
    return args


def job(args: argparse.Namespace, method: str, allocation: str, ratio: float, variant: str, out: Path):
    texts = {"wikitext2": {"path": str(args.eval_data), "lines_as_rows": True}, "second": {"path": str(args.second_eval)}}
    spec = {"model": {"source": args.model, "dtype": args.dtype}, "method": method_spec(args, method),
            "target": {"ratio": ratio, "allocation": allocation_spec(args, allocation)},
            "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.calib_samples,
                            "seq_len": args.seq_len},
            "evaluation": {"perplexity": [{"name": name, "data": data, "window": args.window,
                                           "max_tokens": args.eval_tokens} for name, data in texts.items()]}
                          | suite_evaluations(args),
            "output": {"dir": str(out)}}
    fitting = VARIANTS[variant](args)
    if fitting is not None:
        spec["fitting"] = {"output_mix": None, **fitting}
    return parse_spec(spec)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started, store, rows, dense, layers = time.perf_counter(), LocalStore(args.out / "artifacts"), [], {}, []
    dense_zeroshot: dict[str, float] = {}
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in (a for a in args.allocations if applies(method, a)):
                for variant in args.variants:
                    name = method + ALLOCATION_NAMES[allocation][1]
                    try:
                        report = run_job(job(args, method, allocation, ratio, variant,
                                             args.out / f"{name}-{ratio:g}-{variant}"), store=store)
                    except DecompositionError as error:  # e.g. a skip block too ill-conditioned at every weight
                        rows.append({"method": name, "ratio": ratio, "variant": variant, "refused": str(error)})
                        print(f"{name} {variant} @ {ratio:.0%}: refused: {error}", file=sys.stderr)
                    else:
                        rows.append(measured_row(report, rows, name, ratio, variant))
                        layers += by_layer(rows[-1], report["diagnostics"])
                        print(f"{name} {variant} @ {ratio:.0%}: {rows[-1]['ppl']}", file=sys.stderr)
                    row_dense = rows[-1].pop("dense", {})
                    dense = dense or row_dense
                    if not dense_zeroshot and "refused" not in rows[-1]:
                        dense_zeroshot = suite_metrics(report, "dense")
                    result = write_results(args, argv, rows, dense, dense_zeroshot, layers, started)
    print(to_markdown(result))
    return result


def measured_row(report: dict, rows: list[dict], name: str, ratio: float, variant: str) -> dict:
    """One job's row: perplexities, stage times, the fitting's summary (and, once, the dense figures)."""
    table = {row["name"]: row for row in metric_table(report["rows"])}
    stages = {row["stage"]: row["wall_s"] for row in report["stages"]
              if not row["stage"].startswith("evaluate perplexity dense")}
    return {"method": name, "ratio": ratio, "variant": variant, "stages": stages,
            "ppl": {text: row["compressed"] for text, row in table.items()},
            "dense": {text: row["dense"] for text, row in table.items()},
            "zeroshot": suite_metrics(report, "compressed"),
            "achieved": report["parameters"]["achieved_compression"],
            "fitting_s": sum(stages.get(stage, 0.0) for stage in FITTED),
            "job_s": job_seconds(rows, stages, name, ratio), **kept(report["diagnostics"])}


def job_seconds(rows: list[dict], stages: dict[str, float], method: str, ratio: float) -> float | None:
    """The whole job's time (dense evaluations aside): the stages it ran, and those it reused from this
    (method, ratio)'s plain job (calibration, Fisher pass, spectra) counted at the plain job's time.
    None when the plain job did not run them either (it reused them from an earlier run's store: their
    time is not known here — rerun with a fresh --work folder)."""
    plain = next((row["stages"] for row in rows if (row["method"], row["ratio"], row["variant"]) ==
                  (method, ratio, "plain")), {})
    if "calibrate" not in stages and "calibrate" not in plain:
        return None
    shared = {stage: wall for stage, wall in plain.items() if stage not in stages and stage != "decompose"}
    return round(sum(stages.values()) + sum(shared.values()), 1)


def _seconds(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.0f}"


def kept(diagnostics: dict) -> dict:
    """The fitting's summary: weights and correction blends kept, held-out error ratios to plain."""
    keys = ("anchored_weights_kept", "anchored_modules_with_refused_weights", "mean_heldout_error_ratio",
            "output_anchored_weights_kept", "mean_output_heldout_error_ratio",
            "output_correction_weights_kept", "mean_output_correction_ratio", "refined_layers", "refine_steps_kept",
            "mean_refine_heldout_ratio")
    return {key: diagnostics[key] for key in keys if key in diagnostics}


def by_layer(row: dict, diagnostics: dict) -> list[dict]:
    """Per layer, the held-out ‖W X − W′ X̂‖² of the anchored fit (w = 0) over the plain fit's (w = 1),
    summed over the layer's modules: where anchoring generalises to unseen sequences and where it does not."""
    errors = diagnostics.get("heldout_error_by_layer", {})
    if "0.0" not in errors or "1.0" not in errors:
        return []
    return [{"row": f"{row['method']} {row['ratio']:g} {row['variant']}", "layer": int(layer),
             "anchored_over_plain": errors["0.0"][layer] / errors["1.0"][layer] if errors["1.0"][layer] > 0 else 1.0,
             "best_weight": float(min(errors, key=lambda w: errors[w][layer]))}
            for layer in sorted(errors["1.0"], key=int)]


def write_results(args, argv, rows: list[dict], dense: dict, dense_zeroshot: dict, layers: list[dict],
                  started: float) -> dict:
    result = {**provenance("anchored", argv), "model": args.model, "dtype": args.dtype,
              "calibration": {"data": str(args.calib_data), "samples": args.calib_samples, "seq_len": args.seq_len},
              "evaluation": {"wikitext2": str(args.eval_data), "second": str(args.second_eval), "window": args.window,
                             "tokens": args.eval_tokens},
              "suite_limit": args.suite_limit if args.suite else 0, "mix": args.mix, "holdout": args.holdout,
              "dense": dense, "dense_zeroshot": dense_zeroshot, "rows": rows, "layers": layers,
              "total_wall_s": round(time.perf_counter() - started, 1)}
    write_result("anchored", result, folder=args.out, markdown=to_markdown(result))
    return result


def _average(metrics: dict[str, float]) -> str:
    """The zero-shot suite's average accuracy in %, or — when the suite did not run."""
    return f"{100 * metrics['average']:.2f}" if "average" in metrics else "—"


def _dense_average(result: dict) -> str:
    zeroshot = result.get("dense_zeroshot", {})
    if "average" not in zeroshot:
        return ""
    return f", zero-shot average {_average(zeroshot)} % ({result['suite_limit']} documents a task)"


def to_markdown(result: dict) -> str:
    dense = result["dense"]
    lines = [f"# Anchored fitting — {result['model']}", "",
             f"Calibration {result['calibration']['samples']} × {result['calibration']['seq_len']} tokens; "
             f"perplexity over {result['evaluation']['tokens']} tokens in windows of {result['evaluation']['window']} "
             f"(WikiText-2 and {Path(result['evaluation']['second']).parent.name}). Dense: "
             + ", ".join(f"{text} {value:.2f}" for text, value in dense.items()) + _dense_average(result) + ".", "",
             "| method | ratio | fitting | WikiText-2 | second text | zero-shot average | fitting s | job s | "
             "weights kept | correction blends kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "refused" in row:
            lines.append(f"| {row['method']} | {row['ratio']:.0%} | {row['variant']} | refused: {row['refused']} "
                         "| | | | | | |")
            continue
        weights, blends = row.get("anchored_weights_kept", {}), row.get("output_correction_weights_kept", {})
        weights = weights | {f"down {w}": n for w, n in row.get("output_anchored_weights_kept", {}).items()}
        lines.append(f"| {row['method']} | {row['ratio']:.0%} | {row['variant']} | {row['ppl']['wikitext2']:.2f} | "
                     f"{row['ppl']['second']:.2f} | {_average(row.get('zeroshot', {}))} | {row['fitting_s']:.0f} | "
                     f"{_seconds(row['job_s'])} | "
                     f"{', '.join(f'{w}: {n}' for w, n in weights.items()) or '—'} | "
                     f"{', '.join(f'{w}: {n}' for w, n in blends.items()) or '—'} |")
    lines += ["", f"Command: `{result['command']}`; machine: {describe(result['machine'])}; "
              f"total {result['total_wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with logging_to_stderr():  # the walk's per-layer progress (kept weights, refinement) as it goes
        main()
