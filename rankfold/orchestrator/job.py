"""`run_job(spec)`: the whole compression job in this process, ending in a report.json."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from rankfold.data.text import load_text, tokenize
from rankfold.evaluation.report import format_report, model_parameter_total, parameter_counts
from rankfold.jobs.spec import JobSpec
from rankfold.models.sources import SafetensorsSource
from rankfold.orchestrator.executor import LocalExecutor
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.pipeline import (RATIO_DEFINITION, assemble, calibrate, decompose, matrix_shapes,
                                            perplexity, plan_layout, prepare_output, preflight)
from rankfold.orchestrator.store import LocalStore
from rankfold.workers.evaluate import make_windows


def run_job(spec: JobSpec, stream: TextIO | None = sys.stderr) -> dict:
    """Compress, evaluate and report. Inputs are checked before anything is written."""
    started = time.perf_counter()
    source = preflight(spec)
    out = prepare_output(spec)
    store, scratch, checkpoint = LocalStore(out / "artifacts"), out / "scratch", out / "model"
    meter, executor = StageMeter(), LocalExecutor(stream)
    dtype = getattr(torch, spec.model.dtype)

    with meter.stage("calibrate"):
        calibration_tokens = calibrate(spec, source, store, executor, scratch)
    with meter.stage("allocate"):
        shapes = matrix_shapes(source, spec)
        layout = plan_layout(spec, source.architecture, shapes)
    with meter.stage("decompose"):
        diagnostics = decompose(spec, source, layout, store, executor)
    with meter.stage("assemble"):
        assemble(spec, source, layout, store, executor, checkpoint)

    compressed = SafetensorsSource(checkpoint)  # evaluate the artifact as written, not an in-memory copy
    rows = []
    for ppl in spec.evaluation.perplexity:
        windows = make_windows(tokenize(load_text(ppl.data), source.tokenizer()), ppl.window, ppl.max_tokens)
        row = {"name": ppl.name, "window": ppl.window, "tokens": windows.numel(), "windows": windows.shape[0]}
        if spec.evaluation.dense:
            with meter.stage("evaluate dense"):
                row["dense"] = perplexity(source, windows, dtype, ppl.batch_size, executor,
                                          f"perplexity {ppl.name} dense", None, scratch)
        with meter.stage("evaluate compressed"):
            row["compressed"] = perplexity(compressed, windows, dtype, ppl.batch_size, executor,
                                           f"perplexity {ppl.name} compressed", layout, scratch)
        rows.append(row)
    shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "spec": spec.model_dump(mode="json"),
        "method": spec.method.model_dump(mode="json"),
        "target": spec.target.model_dump(mode="json"),
        "ratio_definition": RATIO_DEFINITION,
        "parameters": parameter_counts(shapes, layout.by_layer,
                                       model_parameter_total([source.shape(k) for k in source.keys()])),
        "ranks": layout.ranks(source.architecture),
        "layout": layout.flat(source.architecture),
        "diagnostics": _summarise(diagnostics),
        "calibration_tokens": calibration_tokens,
        "checkpoint": str(checkpoint),
        "perplexity": rows,
        "stages": meter.as_rows(),
        "total_wall_s": round(time.perf_counter() - started, 2),
    }
    LocalStore(out).put_json("report.json", report)
    if stream is not None:
        print(format_report(report), file=stream)
    return report


def _summarise(diagnostics: dict[str, float]) -> dict:
    """Worst skip-block condition number (cond(A₁)) and where it is, if the method skips."""
    conditions = {k.rsplit(".", 1)[0]: v for k, v in diagnostics.items() if k.endswith(".condition")}
    if not conditions:
        return {}
    worst = max(conditions, key=conditions.get)
    return {"max_skip_condition": conditions[worst], "max_skip_condition_at": worst, "skip_blocks": len(conditions)}
