"""Scheduled (nightly) jobs: a registry of (spec, cron, cluster) entries, and the scheduler that
submits each entry's runs when they fall due.

The registry is a small JSON file (default `$RANKFOLD_HOME/schedules.json`, `~/.rankfold`), written
atomically. Several processes change it (`rankfold schedule`, `schedules --remove`, the scheduler),
so every change is made under its lock (`.schedules.json.lock` beside it) to the entries as stored
at that moment, never to a list read earlier. The scheduler claims the due slots (advances their
next times) under the lock, submits outside it (a submission may take minutes), then records each
submission on its entry if that entry is still registered: an entry added meanwhile is kept, one
removed meanwhile stays removed, and two schedulers on one registry never submit one slot twice.

A missed run (scheduler down) is made up once, not once per missed slot; a run is due when the
entry's next time has passed, and the next time is then counted from that slot, so the schedule does
not drift. Times are local and naive (orchestrator.cron); a time with a UTC offset is converted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

from rankfold.core.errors import BadInput
from rankfold.core.files import atomic_write_text, locked
from rankfold.core.redact import has_url_credentials, redact
from rankfold.jobs.spec import load_any_spec
from rankfold.orchestrator.cron import local_time, parse_cron


class ScheduleError(BadInput, ValueError):
    """A registry that cannot be read, an entry or a time that cannot be used; names the file or value."""


def default_registry() -> Path:
    return Path(os.environ.get("RANKFOLD_HOME", Path.home() / ".rankfold")) / "schedules.json"


def parse_now(text: str) -> datetime:
    """An ISO time for `rankfold scheduler --now`: naive (local time) or with an offset (converted to
    local time). Raises ScheduleError naming the value when it is not one."""
    try:
        return local_time(datetime.fromisoformat(text))
    except ValueError:
        raise ScheduleError(f"--now {text!r}: not an ISO time (e.g. 2026-12-03T07:01:00 for local time, "
                            f"or 2026-12-03T07:01:00+00:00)") from None


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
    LOCK_TIMEOUT_S = 60.0  # a change holds the lock for milliseconds; longer means a hung process

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_registry()

    def entries(self) -> list[ScheduleEntry]:
        """The entries as stored now. Raises ScheduleError naming the file when it is not a registry."""
        if not self.path.is_file():
            return []
        try:
            return [ScheduleEntry(**entry) for entry in json.loads(self.path.read_text())["schedules"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ScheduleError(f"schedule registry {self.path}: not a registry rankfold wrote ({err}); "
                                f"fix or remove it") from None

    def update(self, change: Callable[[list[ScheduleEntry]], list[ScheduleEntry] | None]) -> list[ScheduleEntry]:
        """Apply `change` to the entries as stored now and store its result (None: store nothing), under
        the registry's lock, so no other process's change in between is lost. Returns the entries stored.
        Raises LockTimeout when another process holds the lock for over LOCK_TIMEOUT_S."""
        with locked(self.path, timeout_s=self.LOCK_TIMEOUT_S):
            entries = self.entries()
            changed = change(entries)
            if changed is None:
                return entries
            atomic_write_text(self.path, json.dumps({"schedules": [asdict(e) for e in changed]}, indent=2))
            return changed

    def save(self, entries: list[ScheduleEntry]) -> None:
        """Replace every entry (under the lock). A list read earlier drops what others added since:
        change entries with `update`."""
        self.update(lambda _: entries)

    def add(self, spec_path: str | Path, cron: str, address: str | None, name: str | None = None,
            now: datetime | None = None) -> ScheduleEntry:
        """Register a spec (validated now) under a cron expression (validated now); an entry of the same
        name is replaced. Raises CronError, SpecError, or ScheduleError for an address with credentials."""
        expression = parse_cron(cron)
        if address and has_url_credentials(address):
            raise ScheduleError(f"address {redact(address)!r}: credentials in a URL are refused (they would be "
                                f"stored in {self.path} and printed)")
        load_any_spec(spec_path)  # a compression job or an evaluation-only spec
        spec = str(Path(spec_path).resolve())
        name = name or Path(spec_path).stem
        entry = ScheduleEntry(name, spec, cron, address, expression.next_after(now or datetime.now()).isoformat())
        self.update(lambda entries: [e for e in entries if e.name != name] + [entry])  # re-scheduling replaces
        return entry

    def remove(self, name: str) -> bool:
        """Unregister `name`; False when no entry has that name."""
        found = []

        def drop(entries: list[ScheduleEntry]) -> list[ScheduleEntry] | None:
            found[:] = [e for e in entries if e.name == name]
            return [e for e in entries if e.name != name] if found else None

        self.update(drop)
        return bool(found)


def run_due(registry: ScheduleRegistry, now: datetime, submit: Callable[[str, str | None], str],
            log: Callable[[str], None] = print) -> list[str]:
    """Submit every entry whose next slot has passed at `now` (naive local time, or any time with an
    offset); returns the submission ids. A failed submission is logged and retried at the next slot,
    without blocking the other entries. Raises ScheduleError for a registry entry that cannot be read."""
    now, submitted = local_time(now), []
    for entry in _claim_due(registry, now):
        try:
            submission = submit(entry.spec, entry.address)
        except Exception as err:  # noqa: BLE001 — one bad entry must not stop the scheduler
            log(f"{now:%Y-%m-%d %H:%M} {entry.name}: submission failed: {redact(str(err))}")
            continue
        submitted.append(submission)
        log(f"{now:%Y-%m-%d %H:%M} {entry.name}: submitted {submission}")
        _record_submission(registry, entry, submission, now)
    return submitted


def _claim_due(registry: ScheduleRegistry, now: datetime) -> list[ScheduleEntry]:
    """Under the lock: the entries due at `now` (as they were), their stored next times moved past `now`,
    so that no other scheduler submits these slots too."""
    due: list[ScheduleEntry] = []

    def claim(entries: list[ScheduleEntry]) -> list[ScheduleEntry] | None:
        due.clear()
        for entry in entries:
            slot = _slot(entry)
            if slot <= now:
                due.append(replace(entry))
                entry.next_run = _following(entry, slot, now).isoformat()
        return entries if due else None

    registry.update(claim)
    return due


def _slot(entry: ScheduleEntry) -> datetime:
    try:
        return local_time(datetime.fromisoformat(entry.next_run))
    except (TypeError, ValueError):
        raise ScheduleError(f"schedule {entry.name!r}: next_run {entry.next_run!r} is not an ISO time") from None


def _following(entry: ScheduleEntry, slot: datetime, now: datetime) -> datetime:
    """The entry's first slot after `now`: missed slots are made up once, not replayed."""
    cron = parse_cron(entry.cron)
    following = cron.next_after(slot)
    while following <= now:
        following = cron.next_after(following)
    return following


def _record_submission(registry: ScheduleRegistry, claimed: ScheduleEntry, submission: str, now: datetime) -> None:
    """Note the submission on the claimed entry if it is still registered as it was claimed (not
    removed, nor replaced by a re-scheduling with another spec, cron or address)."""
    identity = (claimed.name, claimed.spec, claimed.cron, claimed.address)

    def note(entries: list[ScheduleEntry]) -> list[ScheduleEntry] | None:
        for entry in entries:
            if (entry.name, entry.spec, entry.cron, entry.address) == identity:
                entry.last_submission, entry.last_run = submission, now.isoformat(timespec="seconds")
                return entries
        return None

    registry.update(note)


def scheduler_loop(registry: ScheduleRegistry, submit: Callable[[str, str | None], str], poll_s: float = 30.0,
                   log: Callable[[str], None] = print) -> None:
    log(f"scheduler: {len(registry.entries())} schedule(s) in {registry.path}; checking every {poll_s:.0f} s")
    while True:
        run_due(registry, datetime.now(), submit, log)
        time.sleep(poll_s)
