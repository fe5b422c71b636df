"""Progress of long stages, shown while the "rankfold" logger is enabled for INFO (the CLI enables it):
tqdm's bar when stderr is a terminal; otherwise (Ray job logs, files, pipes) plain
'(i/N) stage  elapsed 12.3s  ETA 4.5s' lines logged instead, because tqdm's '\\r' updates make logs unreadable."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PLAIN_EVERY_S = 10.0  # at most one plain line per this many seconds, plus the last one

log = logging.getLogger(__name__)


def progress(items: Iterable[T], stage: str, total: int | None = None,
             status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield `items`, reporting each one done with `status()` (e.g. a running loss) beside the count;
    silently when INFO is not enabled."""
    if not log.isEnabledFor(logging.INFO):
        return iter(items)
    if getattr(sys.stderr, "isatty", lambda: False)():
        return _with_postfix(tqdm(items, desc=stage, total=total, file=sys.stderr, dynamic_ncols=True), status)
    return _plain_lines(items, stage, total, status)


def _with_postfix(bar: tqdm, status: Callable[[], str] | None) -> Iterator[T]:
    for item in bar:
        yield item
        if status is not None:
            bar.set_postfix_str(status())


def _plain_lines(items: Iterable[T], stage: str, total: int | None,
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
            log.info("(%d/%d) %s  elapsed %.1fs  ETA %.1fs%s", done, total, stage, elapsed, eta, shown)
