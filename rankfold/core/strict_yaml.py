"""YAML as users write it, read strictly: a key given twice in one mapping is an error.

PyYAML's safe loader keeps the last of two equal keys without a word, so a section written twice
(`evaluation:` near the top and again further down) silently loses the first. UniqueKeyLoader is the
safe loader (no arbitrary objects) that refuses that, at any depth, naming the key and both lines.
Merge keys (`<<: *anchor`) still work: an explicit key overriding a merged one is what they are for.
"""

from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConstructorError):
    """A mapping gives one key twice; `key`, `line` (1-based, the second) and `first_line` say where."""

    def __init__(self, key: object, line: int, first_line: int, node: yaml.MappingNode, key_node: yaml.Node):
        super().__init__("while constructing a mapping", node.start_mark,
                         f"found duplicate key {key!r} (first given at line {first_line})", key_node.start_mark)
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that raises DuplicateKeyError on a key repeated in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._check_unique(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique(self, node: yaml.MappingNode) -> None:
        first: dict[object, yaml.Node] = {}  # key -> the node that gave it first
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the safe constructor's own error names it
                continue
            if earlier is not key_node:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, earlier.start_mark.line + 1, node, key_node)


def load_yaml(text: str) -> object:
    """Parse YAML (or JSON, a subset of it) safely. Raises DuplicateKeyError for a repeated key, and
    yaml.YAMLError for any other malformed document."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 — UniqueKeyLoader is a SafeLoader
