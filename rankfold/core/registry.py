"""A name -> entry registry (methods, allocators, evaluators): one registration per file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    def __init__(self, what: str):
        self.what = what  # e.g. "method", for messages
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry: Entry) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry; KeyError naming the known ones for an unknown name (never a fallback)."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def import_all(package: str, path: list[str]) -> None:
    """Import every module of a package (from its `__init__`: `import_all(__name__, __path__)`), so
    a new file that registers itself needs no other edit."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
