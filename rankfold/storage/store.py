"""Artifact stores: tensors (safetensors) and JSON under slash-separated keys, verified and atomic.

Two backends behind one interface: a local folder (default) and S3 (any S3-compatible endpoint,
through boto3). Every artifact carries the sha256 of its bytes — a `KEY.sha256` file beside it
locally, object metadata on S3 — and every read checks it, so a torn or altered artifact is an
error (or, for `verify`, a reason to recompute), never wrong numbers. Writes are atomic: a temp
file renamed into place locally; a single PUT or a completed multipart upload on S3.

Several processes may write one store at once (two runs of a job, two jobs sharing stage records, Ray
workers). Locally each key's write holds that key's file lock (core.files.locked), so data and checksum
never come from two writers. A record that several processes update (a job's manifest) goes through
`update_json`: read, change, write as one step — under the key's lock locally; on S3, which has no
locks, a conditional PUT (If-Match on the ETag read, If-None-Match for a new object) retried until no
other writer came in between. An S3-compatible endpoint that ignores those headers gives last-writer-wins.

Credentials never reach a message or a record: an endpoint URL carrying them is refused, and every
StoreError and `describe()` is passed through core.redact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rankfold.core.errors import BadInput
from rankfold.core.files import LockTimeout, atomic_write, locked
from rankfold.core.hashing import sha256_file
from rankfold.core.redact import has_url_credentials, redact

CHECKSUM_SUFFIX = ".sha256"


class StoreError(BadInput, RuntimeError):
    """Storage is unreachable, refuses us, or holds a damaged artifact; the message names which, with
    anything credential-shaped masked."""

    def __init__(self, message: str):
        super().__init__(redact(message))


# What a read-modify-write is given and returns: the stored JSON value (None when absent or
# unreadable) -> the value to store (None: leave the stored one as it is).
JsonChange = Callable[[object | None], object | None]


def _json_text(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/") or key.endswith(CHECKSUM_SUFFIX):
        raise ValueError(f"artifact key must be relative, stay inside the store and not end in "
                         f"{CHECKSUM_SUFFIX}: {key!r}")
    return key


@dataclass(frozen=True)
class StoreRef:
    """How to reopen a store in another process (a Ray worker): small, picklable, no credentials."""

    kind: str  # "local" | "s3"
    root: str = ""
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None


_OPEN: dict[StoreRef, "ArtifactStore"] = {}


def open_ref(ref: StoreRef) -> "ArtifactStore":
    """The store a ref names, opened once per process."""
    if ref not in _OPEN:
        if ref.kind == "local":
            _OPEN[ref] = LocalStore(ref.root)
        elif ref.kind == "s3":
            _OPEN[ref] = S3Store(ref.bucket, ref.prefix, ref.endpoint_url, ref.region)
        else:
            raise ValueError(f"unknown store kind {ref.kind!r}")
    return _OPEN[ref]


class ArtifactStore(ABC):
    """Files in, files out; tensors and JSON on top. Subclasses move verified files."""

    @abstractmethod
    def ref(self) -> StoreRef: ...

    @abstractmethod
    def describe(self, key: str = "") -> str:
        """Where `key` lives, for messages (never includes credentials)."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> str:
        """Store the file's bytes under `key` atomically; returns their sha256."""

    @abstractmethod
    @contextmanager
    def open_file(self, key: str) -> Iterator[Path]:
        """A local path holding `key`'s verified bytes, valid inside the context."""

    @abstractmethod
    def checksum(self, key: str) -> str | None:
        """The recorded sha256 of `key`, or None when the artifact (or its checksum) is missing."""

    @abstractmethod
    def actual_checksum(self, key: str) -> str | None:
        """sha256 of the bytes stored under `key` now (None when absent)."""

    @abstractmethod
    def version(self, key: str) -> tuple[str | None, str] | None:
        """(recorded sha256, a token that changes whenever the stored bytes change) without reading them
        — a local file's size and mtime, an S3 object's ETag; None when absent. What resume compares."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def update_json(self, key: str, change: JsonChange) -> object | None:
        """Read `key`'s JSON, apply `change` and store its result, as one step no other writer of `key`
        can come between (a writer that does is waited for, or its write re-read and `change` applied
        again: `change` may run more than once and must only compute). A missing or unreadable artifact
        reads as None. Returns the value stored now, as `get_json` would read it. Raises StoreError when
        the store refuses or another writer keeps winning."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]: ...

    # ------------------------------------------------------------ derived operations

    def exists(self, key: str) -> bool:
        return self.checksum(check_key(key)) is not None

    def verify(self, key: str) -> bool:
        """True when `key` exists and its bytes match the recorded checksum."""
        recorded = self.checksum(check_key(key))
        return recorded is not None and recorded == self.actual_checksum(key)

    def unchanged(self, key: str, sha: str, token: str | None) -> str | None:
        """The current version token of `key` when it still holds the bytes recorded as (`sha`, `token`):
        the token unchanged, or, where it moved (a copy, a touch), the bytes hashed again and equal to
        `sha`. None when `key` is missing or changed. What resume asks of every recorded artifact."""
        found = self.version(key)
        if found is None or found[0] != sha:
            return None
        return found[1] if found[1] == token or self.actual_checksum(key) == sha else None

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        with tempfile.TemporaryDirectory(prefix="rankfold-put-") as folder:
            path = Path(folder) / "artifact.safetensors"
            save_file({name: value.contiguous() for name, value in tensors.items()}, path, metadata=metadata)
            return self.put_file(key, path)

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        with self.open_file(key) as path:
            return load_file(path)

    def get_metadata(self, key: str) -> dict[str, str]:
        with self.open_file(key) as path, safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}

    def put_json(self, key: str, value: object) -> str:
        with tempfile.TemporaryDirectory(prefix="rankfold-put-") as folder:
            path = Path(folder) / "artifact.json"
            path.write_text(_json_text(value))
            return self.put_file(key, path)

    def get_json(self, key: str) -> object:
        with self.open_file(key) as path:
            return json.loads(path.read_text())

    def fetch(self, key: str, destination: Path) -> None:
        """Put `key`'s verified bytes at `destination` (a local file path)."""
        with self.open_file(key) as path:
            shutil.copyfile(path, destination)


class LocalStore(ArtifactStore):
    """A folder. The checksum file is written after the data, so a crash in between reads as missing.
    Every write of a key holds its lock (`.NAME.lock` beside it, hidden from list_keys)."""

    LOCK_TIMEOUT_S = 600.0  # a writer of a multi-GB shard may hold a key's lock for minutes

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ref(self) -> StoreRef:
        return StoreRef("local", root=str(self.root.resolve()))

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _checksum_path(self, key: str) -> Path:
        path = self.path(key)
        return path.with_name(path.name + CHECKSUM_SUFFIX)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """The key's lock held while inside; failing to take it is a StoreError naming the artifact."""
        with ExitStack() as held:
            try:
                held.enter_context(locked(self.path(key), timeout_s=self.LOCK_TIMEOUT_S))
            except LockTimeout as err:
                raise StoreError(f"artifact {self.describe(key)}: {err}") from None
            except OSError as err:
                raise StoreError(f"cannot lock {self.describe(key)}: {err.strerror or err}") from None
            yield

    def _atomic_write(self, target: Path, write) -> None:
        try:
            atomic_write(target, write)
        except OSError as err:
            raise StoreError(f"cannot write {target}: {err.strerror or err}") from None

    def _put_written(self, key: str, write) -> str:
        """`write(temp)` fills a temp file beside the target; hash it, rename it, then record the hash.
        The caller holds the key's lock: two writers interleaved could leave one's checksum on the other's bytes."""
        digest = ""

        def write_and_hash(temp: Path) -> None:
            nonlocal digest
            write(temp)
            digest = sha256_file(temp)

        self._checksum_path(key).unlink(missing_ok=True)  # the old checksum must not vouch for new bytes
        self._atomic_write(self.path(key), write_and_hash)
        self._atomic_write(self._checksum_path(key), lambda temp: temp.write_text(digest + "\n"))
        return digest

    def put_file(self, key: str, source: Path) -> str:
        with self._locked(key):
            return self._put_written(key, lambda temp: shutil.copyfile(source, temp))

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        contiguous = {name: value.contiguous() for name, value in tensors.items()}
        with self._locked(key):
            return self._put_written(key, lambda temp: save_file(contiguous, temp, metadata=metadata))

    def update_json(self, key: str, change: JsonChange) -> object | None:
        """Under the key's lock: every process that updates `key` this way does so one at a time."""
        with self._locked(key):
            current = self._json_or_none(key)
            value = change(current)
            if value is None:
                return current
            text = _json_text(value)
            self._put_written(key, lambda temp: temp.write_text(text))
            return json.loads(text)  # as stored (tuples as lists), as a later read gives it

    def _json_or_none(self, key: str) -> object | None:
        """`key`'s JSON, or None when missing, damaged or not JSON (an update then replaces it)."""
        if self.checksum(key) is None:
            return None
        try:
            return self.get_json(key)
        except (StoreError, ValueError):
            return None

    @contextmanager
    def open_file(self, key: str) -> Iterator[Path]:
        recorded = self.checksum(key)
        if recorded is None:
            raise StoreError(f"artifact {self.describe(key)} is missing (or was never completed)")
        if sha256_file(self.path(key)) != recorded:
            raise StoreError(f"artifact {self.describe(key)} is damaged: its sha256 differs from the recorded one "
                             f"(`rankfold verify SPEC --repair` drops the stage records that trust it)")
        yield self.path(key)

    def fetch(self, key: str, destination: Path) -> None:
        """A hard link when on the same file system (no second copy of a large checkpoint)."""
        with self.open_file(key) as path:
            destination.unlink(missing_ok=True)
            try:
                os.link(path, destination)
            except OSError:
                shutil.copyfile(path, destination)

    def checksum(self, key: str) -> str | None:
        checksum_path = self._checksum_path(key)
        if not (checksum_path.is_file() and self.path(key).is_file()):
            return None
        return checksum_path.read_text().strip() or None

    def actual_checksum(self, key: str) -> str | None:
        path = self.path(key)
        return sha256_file(path) if path.is_file() else None

    def version(self, key: str) -> tuple[str | None, str] | None:
        try:
            stat = self.path(key).stat()
        except FileNotFoundError:
            return None
        return self.checksum(key), f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"

    def delete(self, key: str) -> None:
        with self._locked(key):
            self._checksum_path(key).unlink(missing_ok=True)
            self.path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not k.endswith(CHECKSUM_SUFFIX)
                      and not Path(k).name.startswith("."))


class S3Store(ArtifactStore):
    """s3://bucket/prefix on any S3-compatible endpoint. Credentials come from boto3's standard
    chain (environment, shared files, instance roles) and are never printed."""

    CHECKSUM_META = "rankfold-sha256"
    UPDATE_ATTEMPTS = 30  # conditional PUTs lost to other writers before update_json gives up
    # A conditional PUT lost to another writer (or to a delete, for If-Match).
    LOST_RACE = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"})

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 client=None):
        import boto3
        from botocore.config import Config

        if endpoint_url and has_url_credentials(endpoint_url):
            raise StoreError(f"endpoint_url {endpoint_url!r}: credentials in the URL are refused (they would be "
                             f"stored and printed); they come from boto3's standard chain "
                             f"(AWS_ACCESS_KEY_ID / ~/.aws / instance role)")
        self.bucket, self.prefix, self.endpoint_url, self.region = bucket, prefix.strip("/"), endpoint_url, region
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,  # None: boto3's chain (env, ~/.aws/config, profile)
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60))
        self._check_access()

    def ref(self) -> StoreRef:
        # The region the driver resolved: a worker's own environment may name another.
        return StoreRef("s3", bucket=self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url,
                        region=self.region or self.client.meta.region_name)

    def describe(self, key: str = "") -> str:
        where = f"s3://{self.bucket}/{self._object(key)}" if key else f"s3://{self.bucket}/{self.prefix}"
        return redact(where + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""))

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, err: Exception, key: str = "") -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.describe(key)
        if isinstance(err, EndpointConnectionError):
            return StoreError(f"{where}: cannot reach the S3 endpoint ({self.endpoint_url or 'AWS default'})")
        if isinstance(err, NoCredentialsError):
            return StoreError(f"{where}: no S3 credentials found (AWS_ACCESS_KEY_ID / ~/.aws / instance role)")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and not key):
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "InvalidToken"):
                return StoreError(f"{where}: credentials rejected ({code})")
            return StoreError(f"{where}: S3 error {code or err}")
        return StoreError(f"{where}: {err}")

    def _check_access(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as err:  # noqa: BLE001 — every failure becomes one named StoreError
            raise self._error(err) from None

    def put_file(self, key: str, source: Path) -> str:
        digest = sha256_file(source)
        try:  # upload_file: single PUT or multipart, visible only once complete
            self.client.upload_file(str(source), self.bucket, self._object(key),
                                    ExtraArgs={"Metadata": {self.CHECKSUM_META: digest}})
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return digest

    @contextmanager
    def open_file(self, key: str) -> Iterator[Path]:
        recorded = self.checksum(key)
        if recorded is None:
            raise StoreError(f"artifact {self.describe(key)} is missing (or was never completed)")
        with tempfile.TemporaryDirectory(prefix="rankfold-get-") as folder:
            path = Path(folder) / Path(key).name
            try:
                self.client.download_file(self.bucket, self._object(key), str(path))
            except Exception as err:  # noqa: BLE001
                raise self._error(err, key) from None
            if sha256_file(path) != recorded:
                raise StoreError(f"artifact {self.describe(key)} is damaged: its sha256 differs from the recorded one "
                             f"(`rankfold verify SPEC --repair` drops the stage records that trust it)")
            yield path

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(err, key) from None
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def checksum(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get(self.CHECKSUM_META)

    def version(self, key: str) -> tuple[str | None, str] | None:
        """One HEAD: an object is replaced, never edited, and every upload gets a new ETag."""
        head = self._head(key)
        if head is None:
            return None
        return head.get("Metadata", {}).get(self.CHECKSUM_META), f"{head['ContentLength']}:{head['ETag']}"

    def actual_checksum(self, key: str) -> str | None:
        if self.checksum(key) is None:
            return None
        digest = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
            for block in iter(lambda: body.read(1 << 22), b""):
                digest.update(block)
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return digest.hexdigest()

    def update_json(self, key: str, change: JsonChange) -> object | None:
        """Optimistic: read the object and its ETag, PUT the change only if the ETag is still the one
        read (If-Match; If-None-Match: * when there was none), else re-read and retry."""
        for attempt in range(self.UPDATE_ATTEMPTS):
            current, etag = self._json_and_etag(key)
            value = change(current)
            if value is None:
                return current
            text = _json_text(value)
            if self._put_unless_changed(key, text.encode(), etag):
                return json.loads(text)
            time.sleep(min(1.0, 0.01 * 2 ** attempt) * random.uniform(0.5, 1.0))  # apart from the other writer
        raise StoreError(f"{self.describe(key)}: other writers changed it {self.UPDATE_ATTEMPTS} times while "
                         f"this process was updating it; try again")

    def _json_and_etag(self, key: str) -> tuple[object | None, str | None]:
        """(value, ETag); value None when absent, damaged or not JSON, ETag None when absent."""
        from botocore.exceptions import ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            data = found["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise self._error(err, key) from None
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        if found.get("Metadata", {}).get(self.CHECKSUM_META) != hashlib.sha256(data).hexdigest():
            return None, found["ETag"]
        try:
            return json.loads(data), found["ETag"]
        except ValueError:
            return None, found["ETag"]

    def _put_unless_changed(self, key: str, body: bytes, etag: str | None) -> bool:
        """PUT `body` if `key` still has `etag` (or still does not exist); False when another writer came first."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=body, ContentType="application/json",
                                   Metadata={self.CHECKSUM_META: hashlib.sha256(body).hexdigest()}, **condition)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in self.LOST_RACE:
                return False
            if code == "NotImplemented":
                raise StoreError(f"{self.describe(key)}: the endpoint does not support conditional writes "
                                 f"(If-Match / If-None-Match), which concurrent updates need") from None
            raise self._error(err, key) from None
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def list_keys(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                               Prefix=base + prefix):
                keys.extend(item["Key"][len(base):] for item in page.get("Contents", []))
        except Exception as err:  # noqa: BLE001
            raise self._error(err) from None
        return sorted(keys)
