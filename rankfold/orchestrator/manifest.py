"""Content-addressed stage results and the per-job manifest that makes a job resumable.

Every stage's artifacts live under a key derived from a digest of everything that produced them
(model fingerprint, the spec fields the stage reads, the digests of the stages it consumed), so two
jobs that share a calibration share its statistics, and a changed input can never be served a stale
artifact. The manifest (`jobs/<job id>/manifest.json`, written by drivers only) records, per
stage, the digest, the sha256 of each artifact, a version token of each (ArtifactStore.version: size
and mtime, or the S3 ETag) and the stage's small results. A re-run skips a stage whose record has the
same digest and whose artifacts are all still there, unchanged; anything else is recomputed.
A record also holds a fingerprint of each input stage's record as it read it (`inputs`): a stage whose
input was recomputed under the same digest with other bits (a lost factor refitted on more threads) is
recomputed too — the digest alone cannot tell.

Deciding that reads no artifact: an artifact whose recorded sha256 and version token are unchanged is
taken as written (its bytes are verified where a later stage reads them anyway). Only one whose token
changed — a store copied elsewhere, a file touched — is hashed, and its token refreshed when the bytes
still match. `rankfold verify` hashes everything on demand.

Several drivers may write one manifest at once (the same job run twice into one store; `verify
--repair` beside a run): each change is one stage's record, merged into the manifest as stored now
(ArtifactStore.update_json: under a lock, or a conditional PUT on S3), so no driver drops a record
another one wrote. A token refresh of a shared record is written only if the record is still the one
read; a newer record (a recomputation) is never replaced by a refresh of an older one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace

from rankfold.storage.store import ArtifactStore, StoreError

MANIFEST_VERSION = 1


def shared_key(digest: str) -> str:
    """Where any job's record of a stage with this digest lives (artifacts + small result)."""
    return f"stages/{digest}.json"


@dataclass
class StageRecord:
    digest: str
    artifacts: dict[str, str]  # key -> sha256
    result: dict = field(default_factory=dict)
    finished_at: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)  # key -> ArtifactStore.version token when recorded
    inputs: dict[str, str] = field(default_factory=dict)  # input stage -> its record's fingerprint when read

    def fingerprint(self) -> str:
        """sha256 of what a reader of this stage gets: its artifacts' sha256 and its small result."""
        content = json.dumps({"artifacts": self.artifacts, "result": self.result}, sort_keys=True, default=str)
        return hashlib.sha256(content.encode()).hexdigest()

    def made_from(self, inputs: dict[str, str]) -> bool:
        """Whether this record was made from these inputs (a record older than `inputs`: taken as made)."""
        return not self.inputs or self.inputs == inputs


def _records(data: object) -> dict[str, dict]:
    """The stage records (as stored) of a manifest's JSON; {} when it is missing or not a manifest."""
    stages = data.get("stages") if isinstance(data, dict) else None
    return dict(stages) if isinstance(stages, dict) else {}


def _parsed(records: dict[str, dict]) -> dict[str, StageRecord]:
    """Records as StageRecords; one that does not parse (another version's, damaged) is left out."""
    parsed = {}
    for name, record in records.items():
        try:
            parsed[name] = StageRecord(**record)
        except TypeError:  # only costs that stage's recomputation
            continue
    return parsed


def _as_record(stored: object) -> StageRecord | None:
    """A stored record compared as a StageRecord: one written before a field existed equals its reading."""
    return _parsed({"": stored}).get("") if isinstance(stored, dict) else None


class Manifest:
    def __init__(self, store: ArtifactStore, job_id: str):
        self.store, self.job_id = store, job_id
        self.key = f"jobs/{job_id}/manifest.json"
        self.stages: dict[str, StageRecord] = {}
        if store.exists(self.key):
            try:
                data = store.get_json(self.key)
                self.stages = {name: StageRecord(**record) for name, record in data["stages"].items()}
            except (StoreError, KeyError, TypeError, AttributeError) as err:  # damaged: only costs recomputation
                self.stages = {}
                self.load_error = str(err)

    def completed(self, stage: str, digest: str) -> StageRecord | None:
        """The stage's record if it finished with these inputs — in this job, or in any job on this
        store (records are content-addressed: same digest, same output) — and every artifact still
        verifies. Another job's record is adopted into this manifest."""
        record = self.stages.get(stage)
        if record is None or record.digest != digest:
            record = self._shared(digest)
        refreshed = self._refreshed(record) if record is not None else None
        if refreshed is None:
            return None
        if self.stages.get(stage) != refreshed:
            if refreshed != record:  # tokens moved, bytes did not: record the new tokens for everyone
                self._refresh_shared(record, refreshed)
            self._commit(stage, refreshed)
        return refreshed

    def _refreshed(self, record: StageRecord) -> StageRecord | None:
        """`record` when every artifact is there with its recorded sha256 and version token; an artifact
        whose token moved is hashed, and the record comes back with its new token if the bytes match.
        None when any artifact is missing or changed."""
        versions = dict(record.versions)
        for key, sha in record.artifacts.items():
            token = self.store.unchanged(key, sha, versions.get(key))
            if token is None:
                return None
            versions[key] = token
        return record if versions == record.versions else replace(record, versions=versions)

    def record(self, stage: str, digest: str, artifacts: dict[str, str], result: dict | None = None,
               inputs: dict[str, str] | None = None) -> StageRecord:
        """`inputs`: each input stage's record fingerprint (StageRecord.fingerprint) as the stage read it."""
        versions = {key: found[1] for key in artifacts if (found := self.store.version(key)) is not None}
        record = StageRecord(digest, dict(artifacts), result or {}, time.time(), versions, dict(inputs or {}))
        self.store.put_json(shared_key(digest), asdict(record))  # first: other jobs may reuse it
        self._commit(stage, record)
        return record

    def forget(self, stage: str) -> None:
        """Drop the stage's record here and its shared record, so the next run recomputes it. A record
        another driver wrote since this one read it (a recomputation) is kept."""
        record = self.stages.get(stage)
        if record is not None:
            self.store.delete(shared_key(record.digest))
            self._commit(stage, None, dropped=record)

    def _shared(self, digest: str) -> StageRecord | None:
        try:
            return StageRecord(**self.store.get_json(shared_key(digest))) if self.store.exists(shared_key(digest)) \
                else None
        except (StoreError, TypeError):  # a damaged record only costs recomputation
            return None

    def _refresh_shared(self, read: StageRecord, refreshed: StageRecord) -> None:
        """Store `refreshed` as the shared record only while it still holds `read` (or nothing)."""
        def change(current: object | None) -> dict | None:
            return asdict(refreshed) if current is None or _as_record(current) == read else None

        self.store.update_json(shared_key(read.digest), change)

    def _commit(self, stage: str, record: StageRecord | None, dropped: StageRecord | None = None) -> None:
        """Set (`record`) or drop (`dropped`, if still the stored one) one stage's record in the stored
        manifest, keeping every other record there; this manifest then holds the merged result."""
        def change(current: object | None) -> dict:
            records = _records(current)
            if record is not None:
                records[stage] = asdict(record)
            elif dropped is not None and _as_record(records.get(stage)) == dropped:
                del records[stage]
            return {"version": MANIFEST_VERSION, "job": self.job_id, "stages": records}

        self.stages = _parsed(_records(self.store.update_json(self.key, change)))
