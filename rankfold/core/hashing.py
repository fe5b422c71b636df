"""Content hashes: of files (sha256, for artifacts and shards) and of JSON-able values (digests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed: any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digest_of(*parts: object) -> str:
    """Stable 20-hex digest of JSON-able parts (dict keys sorted; an object with `identity()`, e.g. a
    spec model, by that; other objects by str())."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_identity)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _identity(value: object) -> object:
    identity = getattr(value, "identity", None)
    return identity() if callable(identity) else str(value)
