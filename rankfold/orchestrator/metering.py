"""Wall time and peak resident memory of each stage, sampled while the stage runs."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psutil


@dataclass
class StageTiming:
    name: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    calls: int = 0
    worker_peak_rss_mb: float | None = None  # the largest worker process's peak (Ray), if any
    started_at: float | None = None  # Unix time the stage first started (lines up with outside samplers)


class _PeakSampler(threading.Thread):
    """Polls this process's RSS; a sampler, so short spikes between polls can be missed."""

    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def finish(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@dataclass
class StageMeter:
    interval_s: float = 0.02
    records: dict[str, StageTiming] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, worker_peak: Callable[[], float | None] = lambda: None) -> Iterator[None]:
        """Meter the block; `worker_peak` (an executor's `take_worker_peak_mb`) adds what workers report."""
        record = self.records.setdefault(name, StageTiming(name))
        sampler = _PeakSampler(self.interval_s)
        sampler.start()
        record.started_at = record.started_at or time.time()
        start = time.perf_counter()
        try:
            yield
        finally:
            record.wall_s += time.perf_counter() - start
            record.peak_rss_mb = max(record.peak_rss_mb, sampler.finish() / 2**20)
            record.calls += 1
            workers = worker_peak()
            if workers is not None:
                record.worker_peak_rss_mb = max(record.worker_peak_rss_mb or 0.0, workers)

    def as_rows(self) -> list[dict]:
        return [{"stage": r.name, "wall_s": round(r.wall_s, 2), "peak_rss_mb": round(r.peak_rss_mb, 1),
                 "started_at": r.started_at}
                | ({} if r.worker_peak_rss_mb is None else {"worker_peak_rss_mb": round(r.worker_peak_rss_mb, 1)})
                for r in self.records.values()]
