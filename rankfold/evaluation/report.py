"""The job report: parameter accounting (with the ratio's definition), evaluation rows, stage costs."""

from __future__ import annotations

import math

from rankfold.methods.structure import dense_params, entry_cost, module_params
from rankfold.modules.layout import CompressedModule

RATIO_DEFINITION = ("compression = 1 - (parameters of the compressed matrices after / before), counted over the "
                    "target's projections in every decoder layer; embeddings, lm_head and norms not counted")
ROW_KEYS = ("evaluator", "name", "variant", "metric", "value")
# Measured beside the value (they differ between variants), not settings of the measurement.
MEASURED_KEYS = ("stderr", "samples", "wall_s", "schedule", "decode_cost", "stored_cost")


def parameter_counts(shapes: dict[int, dict[str, tuple[int, int]]], layout: dict[int, list[CompressedModule]],
                     model_total: int) -> dict:
    """Counted matrices before/after and the whole model before/after (embeddings included there).
    A skip block's identity and its permutation (an index, not a weight) are not parameters."""
    dense = dense_params(shapes)
    compressed = sum(module_params(module, shapes[i]) for i, modules in layout.items() for module in modules)
    counts = {
        "counted_dense": dense,
        "counted_compressed": compressed,
        "achieved_compression": 1.0 - compressed / dense if dense else 0.0,  # 0: a cache-only job
        "model_dense": model_total,
        "model_compressed": model_total - dense + compressed,
    }
    sparse = [m for modules in layout.values() for m in modules if "nnz" in (m.options or {})]
    if sparse:  # both conventions: a sparse entry as value + index, and as the papers' one parameter
        kept = lambda cost: sum(module_params(m, shapes[i], cost) for i, ms in layout.items() for m in ms)  # noqa: E731
        counts.update({"sparse_entries": sum(int(m.options["nnz"]) for m in sparse),
                       "entry_cost": int(sparse[0].options["entry_cost"]),
                       "compression_indices_counted": 1.0 - kept(entry_cost(True)) / dense,
                       "compression_values_only": 1.0 - kept(entry_cost(False)) / dense})
    return counts


def model_parameter_total(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def evaluation_table(rows: list[dict]) -> list[str]:
    """One line per (evaluator, name, metric, settings): the dense and compressed values side by side."""
    lines = [f"  {'evaluation':<26}{'metric':<24}{'dense':>16}{'compressed':>16}  settings"]
    for (evaluator, name, metric), settings, values in _merged(rows):
        dense, compressed = (_shown(values.get(variant), values.get(variant + " stderr"))
                             for variant in ("dense", "compressed"))
        shown = ", ".join(f"{k} {v}" for k, v in settings.items())
        lines.append(f"  {evaluator + ' ' + name:<26}{metric:<24}{dense:>16}{compressed:>16}  {shown}")
    return lines


def generated_samples(rows: list[dict], count: int = 2, width: int = 150) -> list[str]:
    """The first generated outputs of each generation entry and variant, beside their references."""
    lines = []
    for row in rows:
        for sample in row.get("samples", [])[:count]:
            lines += [f"  {row['name']} {row['variant']}: reference: {sample['reference'][:width]}",
                      f"  {' ' * len(row['name'] + row['variant'])}   output:    {sample['output'][:width]}"]
    return [""] + lines if lines else []


def _shown(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ±{stderr:.4f}" if stderr is not None and math.isfinite(stderr) else "")


def metric_table(rows: list[dict], metric: str = "perplexity") -> list[dict]:
    """Rows of one metric merged per (evaluator, name, settings): {name, ...settings, dense, compressed}."""
    return [{"name": name, **settings, **values} for (_, name, kind), settings, values in _merged(rows)
            if kind == metric]


def _merged(rows: list[dict]) -> list[tuple[tuple[str, str, str], dict, dict[str, float]]]:
    """Rows grouped by (evaluator, name, metric, settings): ((evaluator, name, metric), settings, {variant: value})."""
    table: dict[tuple, tuple[tuple[str, str, str], dict, dict[str, float]]] = {}
    for row in rows:
        settings = {k: v for k, v in row.items() if k not in ROW_KEYS + MEASURED_KEYS}
        label = (row["evaluator"], row["name"], row["metric"])
        entry = table.setdefault((label, tuple(sorted(settings.items()))), (label, settings, {}))
        entry[2][row["variant"]] = row["value"]
        if "stderr" in row:
            entry[2][row["variant"] + " stderr"] = row["stderr"]
    return list(table.values())


def kv_cache_line(kv: dict) -> str:
    """The latent KV cache in one line: kept hidden size, bits, bytes per token (all layers, k and v)."""
    dense = kv["dense_kv_numbers_per_token"]
    bits = "unquantised" if kv["bits"] == 16 else f"{kv['bits']}-bit, groups of {kv['quant_group']}"
    return (f"  KV cache ({kv['name']}, {kv['rank_search']} ranks, {kv['group_heads']} head(s) per group): keeps "
            f"{kv['kept_dims']}/{dense} numbers per token ({kv['kept_fraction']:.1%}), {bits}: "
            f"{kv['latent_bytes_per_token']:.0f} bytes/token vs {2 * dense} dense at 16 bits")


def format_report(report: dict) -> str:
    params, target = report["parameters"], report["target"]
    lines = [
        f"rankfold · {report['method']['name']} · target compression {target['ratio']:.1%} of "
        f"{', '.join(target['matrices']) or 'no matrices (cache only)'}",
        f"  ratio: {report['ratio_definition']}",
        f"  compressed matrices: {_millions(params['counted_dense'])} -> {_millions(params['counted_compressed'])} "
        f"(achieved compression {params['achieved_compression']:.2%})",
        f"  whole model:         {_millions(params['model_dense'])} -> {_millions(params['model_compressed'])}",
        f"  calibration: {report['calibration_tokens']} tokens; checkpoint: {report['checkpoint']}",
    ]
    if report.get("kv_cache"):
        lines.insert(4, kv_cache_line(report["kv_cache"]))
    if "sparse_entries" in params:
        lines.insert(3, f"  sparse entries: {params['sparse_entries']:,} (budget counted {params['entry_cost']} "
                        f"parameter(s) each); compression {params['compression_indices_counted']:.2%} counting "
                        f"value + int32 index, {params['compression_values_only']:.2%} counting values only "
                        "(the papers' convention)")
    few = report.get("few_calibration_tokens") or {}
    if few:
        shown = ", ".join(f"{group} ({count})" for group, count in list(few.items())[:6])
        lines.append(f"  {len(few)} input group(s) saw fewer calibration tokens than their width (whitened with a "
                     f"ridge; none: the identity): {shown}{', ...' if len(few) > 6 else ''}")
    if report["rows"]:
        lines += [""] + evaluation_table(report["rows"]) + generated_samples(report["rows"])
    lines.append("")
    workers = any("worker_peak_rss_mb" in row for row in report["stages"])
    lines.append(f"  {'stage':<38}{'wall s':>9}{'peak RSS MiB':>14}" + (f"{'worker peak MiB':>17}" if workers else ""))
    for row in report["stages"]:
        worker = f"{row['worker_peak_rss_mb']:>17.0f}" if "worker_peak_rss_mb" in row else ""
        lines.append(f"  {row['stage']:<38}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>14.0f}{worker}")
    lines.append(f"  {'total':<38}{report['total_wall_s']:>9.1f}")
    return "\n".join(lines)
