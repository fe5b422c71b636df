"""A checkpoint read straight from the artifact store, so any node of a cluster can evaluate it.

The compressed checkpoint is written into the store (a shard per layer); the driver also places a
copy in output.dir, which other nodes cannot see. `StoredCheckpointSource` is that checkpoint as a
model source on whichever process opens it: the small files (config, tokenizer, index) are fetched
when it opens, each layer's shard when a tensor of it is first read, into a local cache named by
the checkpoint's store location. Every fetch is verified against the store's sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rankfold.core.files import atomic_write
from rankfold.core.hashing import digest_of
from rankfold.models.sources import ModelSourceError, SafetensorsSource, cache_root, register_scheme
from rankfold.storage.store import StoreError, StoreRef, open_ref

SCHEME = "store:"


def stored_location(ref: StoreRef, prefix: str) -> str:
    """A model source location (a string, as workers receive it) naming a checkpoint in a store."""
    return SCHEME + json.dumps({"ref": asdict(ref), "prefix": prefix}, sort_keys=True)


def open_stored(location: str) -> "StoredCheckpointSource":
    try:
        fields = json.loads(location[len(SCHEME):])
        return StoredCheckpointSource(StoreRef(**fields["ref"]), fields["prefix"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{location!r}: not a stored checkpoint location ({err})") from None


class StoredCheckpointSource(SafetensorsSource):
    def __init__(self, ref: StoreRef, prefix: str, cache: Path | None = None):
        self.store, self.prefix = open_ref(ref), prefix.rstrip("/")
        folder = (cache or cache_root() / "stored") / digest_of(asdict(ref), self.prefix)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            keys = self.store.list_keys(self.prefix + "/")
            for key in keys:
                if not key.endswith(".safetensors"):  # small files now; shards on first use
                    self._fetch(key, folder / Path(key).name)
        except StoreError as err:
            raise ModelSourceError(f"checkpoint {self.prefix} in {self.store.describe()}: {err}") from None
        if not keys:
            raise ModelSourceError(f"no checkpoint under {self.store.describe(self.prefix)}")
        self._stored = {Path(key).name for key in keys}
        super().__init__(folder)
        self.location = stored_location(ref, self.prefix)

    def _missing(self, names: set[str]) -> list[str]:
        return sorted(names - self._stored)  # shards are fetched on first use: they must be in the store

    def _fetch(self, key: str, path: Path) -> None:
        """Verified bytes at `path`, atomically (actors on one node may fetch the same shard at once)."""
        atomic_write(path, lambda temp: self.store.fetch(key, temp))

    def _file_of(self, key: str) -> Path:
        return self._fetched(super()._file_of(key), "checkpoint shard")

    def side_file(self, name: str) -> Path | None:
        """Fetched on first use, like a shard (its name ends in .safetensors)."""
        return self._fetched(self.folder / name, "checkpoint file") if name in self._stored else None

    def _fetched(self, path: Path, what: str) -> Path:
        """`path` in the local copy, fetched from the store when not there yet."""
        if not path.is_file():
            try:
                self._fetch(f"{self.prefix}/{path.name}", path)
            except StoreError as err:
                raise ModelSourceError(f"{what} {path.name}: {err}") from None
        return path

    def fingerprint(self) -> str:
        return digest_of("stored", self.prefix)  # the prefix is content-addressed already


register_scheme(SCHEME, open_stored)
