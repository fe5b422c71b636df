"""Run history: every finished job appends a record to the artifact store; `rankfold history` reads
them back as a trend table and a PNG plot (matplotlib, Agg).

Records are one object per run (`history/<job id>/<UTC time>-<random>.json`): S3 has no append, and
separate objects never race. The random part keeps two runs finishing in the same microsecond (two
processes, two machines) from writing one key, where the second record would replace the first. A
record holds generic evaluator `rows` ({evaluator, name, variant, metric, value, ...settings});
records written before those existed hold only `perplexity` rows ({name, window, tokens, dense,
compressed}), which are read as rows of the metric "perplexity".
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rankfold.storage.store import ArtifactStore, StoreError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

VARIANTS = ("dense", "compressed")


def record_run(store: ArtifactStore, job_id: str, report: dict) -> str:
    """Store the run's record under a key of its own; returns the key. Raises StoreError when the store does."""
    now = time.time_ns()  # one reading: the key's second, its microseconds, and finished_at agree
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now // 1_000_000_000))
    key = f"history/{job_id}/{stamp}-{now // 1000 % 1_000_000:06d}-{secrets.token_hex(4)}.json"
    store.put_json(key, {
        "finished_at": now / 1e9,
        "rows": [dict(row) for row in report.get("rows", [])],
        "achieved_compression": report.get("parameters", {}).get("achieved_compression"),
        "method": report.get("method", {}).get("name"),  # none for `rankfold eval` runs
        "total_wall_s": report["total_wall_s"],
        "reused_stages": report["reused_stages"],
        "executor": report.get("executor", ""),
    })
    return key


def load_history(store: ArtifactStore, job_id: str) -> list[dict]:
    """Every finished run's record, oldest first (by finish time). A record still being written is left
    out; a damaged one is a StoreError naming it."""
    records = [record for key in store.list_keys(f"history/{job_id}/") if (record := _read(store, key)) is not None]
    return sorted(records, key=lambda record: record["finished_at"])


def _read(store: ArtifactStore, key: str) -> dict | None:
    try:
        return store.get_json(key)
    except StoreError:
        if store.exists(key):  # there, with a checksum, and unreadable: damaged
            raise
        return None  # no checksum yet: another process is writing it (or crashed while writing)


def record_rows(record: dict) -> list[dict]:
    """A record's generic rows; its legacy `perplexity` rows are turned into rows unless `rows`
    already carries the same (name, variant, metric)."""
    rows = list(record.get("rows") or [])
    known = {(row["name"], row["variant"], row["metric"]) for row in rows}
    legacy = [{"evaluator": "perplexity", "name": row["name"], "variant": variant, "metric": "perplexity",
               "value": row[variant], "window": row.get("window"), "tokens": row.get("tokens")}
              for row in record.get("perplexity") or [] for variant in VARIANTS
              if row.get(variant) is not None and (row["name"], variant, "perplexity") not in known]
    return legacy + rows


def format_history(records: list[dict]) -> str:
    """One line per run and (name, metric), dense and compressed side by side."""
    lines = [f"{'finished (UTC)':20s} {'name':10s} {'metric':22s} {'dense':>10s} {'compressed':>11s} "
             f"{'wall s':>8s}  reused"]
    for record in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["finished_at"]))
        values: dict[tuple[str, str], dict[str, float]] = {}
        for row in record_rows(record):
            values.setdefault((row["name"], row["metric"]), {})[row["variant"]] = row["value"]
        for (name, metric), by_variant in values.items() or [(("-", "-"), {})]:
            dense, compressed = (f"{by_variant[v]:.3f}" if by_variant.get(v) is not None else "-" for v in VARIANTS)
            lines.append(f"{when:20s} {name:10s} {metric:22s} {dense:>10s} {compressed:>11s} "
                         f"{record['total_wall_s']:8.1f}  {','.join(record['reused_stages']) or '-'}")
    return "\n".join(lines)


def history_series(records: list[dict]) -> dict[str, dict[str, list[tuple[datetime, float]]]]:
    """metric -> "name variant" -> (finished time, value) points in time order."""
    series: dict[str, dict[str, list[tuple[datetime, float]]]] = {}
    for record in records:
        when = datetime.fromtimestamp(record["finished_at"], timezone.utc)
        for row in record_rows(record):
            if row.get("value") is not None:
                series.setdefault(row["metric"], {}).setdefault(f"{row['name']} {row['variant']}", []).append(
                    (when, float(row["value"])))
    return {metric: {label: sorted(points) for label, points in by_label.items()}
            for metric, by_label in series.items()}


def plot_history(path: Path, records: list[dict], title: str) -> Figure:
    """Write the trend PNG (one subplot per metric, one marked line per series) and return the Figure.
    matplotlib is imported here, not at module level: every job imports this module to record a run.
    Figure + FigureCanvasAgg, not pyplot, so no global state and no display is needed."""
    from matplotlib import dates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = history_series(records)
    count = max(len(series), 1)
    columns = min(count, 3)  # a zero-shot suite brings ~15 metrics: a grid, not one tall column
    rows = -(-count // columns)
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (metric, by_label) in zip(axes, series.items()):
        for label, points in by_label.items():
            ax.plot([when for when, _ in points], [value for _, value in points], marker="o", label=label)
        locator = dates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
        ax.set(title=f"{title}: {metric}", xlabel="finished (UTC)", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if not series:
        axes[0].set_title(f"{title}: no metrics recorded")
    figure.savefig(path, format="png")
    return figure
