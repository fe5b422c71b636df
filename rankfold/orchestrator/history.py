"""Run history: every finished job appends a record to the artifact store; `rankfold history` reads
them back as a trend table and a PNG plot.

Records are one object per run (`history/<job id>/<UTC time>.json`): S3 has no append, and separate
objects never race. The plot is drawn by hand (a few lines of rasterising) because the project's
dependencies carry no plotting library.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np

from rankfold.orchestrator.store import ArtifactStore


def record_run(store: ArtifactStore, job_id: str, report: dict) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    key = f"history/{job_id}/{stamp}-{time.time_ns() % 1_000_000:06d}.json"
    store.put_json(key, {
        "finished_at": time.time(),
        "perplexity": [{k: row.get(k) for k in ("name", "window", "tokens", "dense", "compressed")}
                       for row in report["perplexity"]],
        "achieved_compression": report["parameters"].get("achieved_compression"),
        "method": report["method"].get("name"),
        "total_wall_s": report["total_wall_s"],
        "reused_stages": report["reused_stages"],
        "executor": report.get("executor", ""),
    })
    return key


def load_history(store: ArtifactStore, job_id: str) -> list[dict]:
    return [store.get_json(key) for key in store.list_keys(f"history/{job_id}/")]


def format_history(records: list[dict]) -> str:
    lines = [f"{'finished (UTC)':20s} {'dataset':10s} {'dense ppl':>10s} {'compressed':>11s} {'wall s':>8s}  reused"]
    for record in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["finished_at"]))
        for row in record["perplexity"] or [{"name": "-", "dense": None, "compressed": None}]:
            dense = f"{row['dense']:.3f}" if row.get("dense") is not None else "-"
            compressed = f"{row['compressed']:.3f}" if row.get("compressed") is not None else "-"
            lines.append(f"{when:20s} {row['name']:10s} {dense:>10s} {compressed:>11s} "
                         f"{record['total_wall_s']:8.1f}  {','.join(record['reused_stages']) or '-'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- PNG line plot

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _line(canvas: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], width: int = 2) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for t in np.linspace(0.0, 1.0, steps + 1):
        x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
        canvas[max(y - width // 2, 0):y + width - width // 2, max(x - width // 2, 0):x + width - width // 2] = color


def plot_series(path: Path, series: dict[str, list[tuple[float, float]]], size: tuple[int, int] = (640, 360)) -> None:
    """One polyline (with point markers) per series over a shared time axis; axes, no text. The legend
    colours follow PALETTE in series order (printed by the CLI next to the table)."""
    width, height = size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    margin = 30
    points = [p for values in series.values() for p in values]
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y_low, y_high = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        y_pad = 0.1 * (y_high - y_low)
        y_low, y_high = y_low - y_pad, y_high + y_pad
        to_px = lambda x, y: (margin + round((x - x_low) / (x_high - x_low) * (width - 2 * margin)),  # noqa: E731
                              height - margin - round((y - y_low) / (y_high - y_low) * (height - 2 * margin)))
        for index, values in enumerate(series.values()):
            color = PALETTE[index % len(PALETTE)]
            pixels = [to_px(x, y) for x, y in sorted(values)]
            for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):
                _line(canvas, ax, ay, bx, by, color)
            for px, py in pixels:
                canvas[max(py - 3, 0):py + 4, max(px - 3, 0):px + 4] = color
    _line(canvas, margin, height - margin, width - margin, height - margin, (0, 0, 0), 1)  # axes
    _line(canvas, margin, margin, margin, height - margin, (0, 0, 0), 1)
    _write_png(path, canvas)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))
