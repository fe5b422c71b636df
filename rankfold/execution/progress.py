"""Progress of long stages: tqdm's bar on a terminal; on a log (Ray job logs, files, pipes) plain
'(i/N) stage  elapsed 12.3s  ETA 4.5s' lines instead, because tqdm's '\\r' updates make logs unreadable."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PLAIN_EVERY_S = 10.0  # at most one plain line per this many seconds, plus the last one


def progress(items: Iterable[T], stage: str, total: int | None = None, stream: TextIO | None = sys.stderr,
             status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield `items`, reporting each one done to `stream` (None: silently), with `status()` (e.g. a
    running loss) beside the count."""
    if stream is None:
        return iter(items)
    if getattr(stream, "isatty", lambda: False)():
        return _with_postfix(tqdm(items, desc=stage, total=total, file=stream, dynamic_ncols=True), status)
    return _plain_lines(items, stage, total, stream, status)


def _with_postfix(bar: tqdm, status: Callable[[], str] | None) -> Iterator[T]:
    for item in bar:
        yield item
        if status is not None:
            bar.set_postfix_str(status())


def _plain_lines(items: Iterable[T], stage: str, total: int | None, stream: TextIO,
                 status: Callable[[], str] | None = None) -> Iterator[T]:
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if done == total or now - last >= PLAIN_EVERY_S:
            elapsed, last = now - start, now
            eta = elapsed / done * (total - done)
            shown = f"  {status()}" if status is not None else ""
            print(f"({done}/{total}) {stage}  elapsed {elapsed:.1f}s  ETA {eta:.1f}s{shown}", file=stream, flush=True)
