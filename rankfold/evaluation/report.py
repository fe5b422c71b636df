"""The job report: parameter accounting (with the ratio's definition), perplexities, stage costs."""

from __future__ import annotations

import math

from rankfold.modules.layout import CompressedModule


def parameter_counts(shapes: dict[int, dict[str, tuple[int, int]]], layout: dict[int, list[CompressedModule]],
                     model_total: int) -> dict:
    """Counted matrices before/after and the whole model before/after (embeddings included there).
    A skip block's identity and its permutation (an index, not a weight) are not parameters."""
    dense = sum(m * n for layer in shapes.values() for (m, n) in layer.values())
    compressed = sum(module.parameters(shapes[i]) for i, modules in layout.items() for module in modules)
    return {
        "counted_dense": dense,
        "counted_compressed": compressed,
        "achieved_compression": 1.0 - compressed / dense,
        "model_dense": model_total,
        "model_compressed": model_total - dense + compressed,
    }


def model_parameter_total(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_report(report: dict) -> str:
    params, target = report["parameters"], report["target"]
    lines = [
        f"rankfold · {report['method']['name']} · target compression {target['ratio']:.1%} of {', '.join(target['matrices'])}",
        f"  ratio: {report['ratio_definition']}",
        f"  compressed matrices: {_millions(params['counted_dense'])} -> {_millions(params['counted_compressed'])} "
        f"(achieved compression {params['achieved_compression']:.2%})",
        f"  whole model:         {_millions(params['model_dense'])} -> {_millions(params['model_compressed'])}",
        f"  calibration: {report['calibration_tokens']} tokens; checkpoint: {report['checkpoint']}",
    ]
    if report["perplexity"]:
        lines.append("")
        lines.append(f"  {'dataset':<14}{'window':>8}{'tokens':>9}{'dense ppl':>12}{'compressed ppl':>16}")
        for row in report["perplexity"]:
            dense = f"{row['dense']:.3f}" if row.get("dense") is not None else "-"
            lines.append(f"  {row['name']:<14}{row['window']:>8}{row['tokens']:>9}{dense:>12}{row['compressed']:>16.3f}")
    lines.append("")
    workers = any("worker_peak_rss_mb" in row for row in report["stages"])
    lines.append(f"  {'stage':<22}{'wall s':>9}{'peak RSS MiB':>14}" + (f"{'worker peak MiB':>17}" if workers else ""))
    for row in report["stages"]:
        worker = f"{row['worker_peak_rss_mb']:>17.0f}" if "worker_peak_rss_mb" in row else ""
        lines.append(f"  {row['stage']:<22}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>14.0f}{worker}")
    lines.append(f"  {'total':<22}{report['total_wall_s']:>9.1f}")
    return "\n".join(lines)
