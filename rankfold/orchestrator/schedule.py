"""Scheduled (nightly) jobs: a registry of (spec, cron, cluster) entries, and the scheduler that
submits each entry's runs when they fall due.

The registry is a small JSON file (default `$RANKFOLD_HOME/schedules.json`, `~/.rankfold`), written
atomically. A missed run (scheduler down) is made up once, not once per missed slot; a run is due
when the entry's next time has passed, and the next time is then counted from that slot, so the
schedule does not drift.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from rankfold.core.files import atomic_write_text
from rankfold.jobs.spec import load_any_spec
from rankfold.orchestrator.cron import parse_cron


def default_registry() -> Path:
    return Path(os.environ.get("RANKFOLD_HOME", Path.home() / ".rankfold")) / "schedules.json"


@dataclass
class ScheduleEntry:
    name: str
    spec: str                 # absolute path of the spec file (read at each run: edits apply)
    cron: str
    address: str | None       # Ray Job API address; None: the default
    next_run: str             # ISO time of the next slot (local time, minute precision)
    last_submission: str | None = None
    last_run: str | None = None


class ScheduleRegistry:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_registry()

    def entries(self) -> list[ScheduleEntry]:
        if not self.path.is_file():
            return []
        return [ScheduleEntry(**entry) for entry in json.loads(self.path.read_text())["schedules"]]

    def save(self, entries: list[ScheduleEntry]) -> None:
        atomic_write_text(self.path, json.dumps({"schedules": [asdict(e) for e in entries]}, indent=2))

    def add(self, spec_path: str | Path, cron: str, address: str | None, name: str | None = None,
            now: datetime | None = None) -> ScheduleEntry:
        """Register a spec (validated now) under a cron expression (validated now)."""
        expression = parse_cron(cron)
        load_any_spec(spec_path)  # a compression job or an evaluation-only spec
        spec = str(Path(spec_path).resolve())
        name = name or Path(spec_path).stem
        entries = [e for e in self.entries() if e.name != name]  # re-scheduling replaces
        entry = ScheduleEntry(name, spec, cron, address, expression.next_after(now or datetime.now()).isoformat())
        self.save(entries + [entry])
        return entry

    def remove(self, name: str) -> bool:
        entries = self.entries()
        kept = [e for e in entries if e.name != name]
        self.save(kept)
        return len(kept) != len(entries)


def run_due(registry: ScheduleRegistry, now: datetime, submit: Callable[[str, str | None], str],
            log: Callable[[str], None] = print) -> list[str]:
    """Submit every entry whose next slot has passed; returns the submission ids. A failed
    submission is logged and retried at the next slot, without blocking the other entries."""
    entries, submitted = registry.entries(), []
    for entry in entries:
        slot = datetime.fromisoformat(entry.next_run)
        if slot > now:
            continue
        try:
            submission = submit(entry.spec, entry.address)
            entry.last_submission, entry.last_run = submission, now.isoformat(timespec="seconds")
            submitted.append(submission)
            log(f"{now:%Y-%m-%d %H:%M} {entry.name}: submitted {submission}")
        except Exception as err:  # noqa: BLE001 — one bad entry must not stop the scheduler
            log(f"{now:%Y-%m-%d %H:%M} {entry.name}: submission failed: {err}")
        cron = parse_cron(entry.cron)
        following = cron.next_after(slot)
        while following <= now:  # missed slots are made up once, not replayed
            following = cron.next_after(following)
        entry.next_run = following.isoformat()
    registry.save(entries)
    return submitted


def scheduler_loop(registry: ScheduleRegistry, submit: Callable[[str, str | None], str], poll_s: float = 30.0,
                   log: Callable[[str], None] = print) -> None:
    log(f"scheduler: {len(registry.entries())} schedule(s) in {registry.path}; checking every {poll_s:.0f} s")
    while True:
        run_due(registry, datetime.now(), submit, log)
        time.sleep(poll_s)
