"""A key written twice in one YAML mapping, at any depth, is an error naming the key and both lines."""

from __future__ import annotations

import pytest
import yaml

from rankfold.core.strict_yaml import DuplicateKeyError, load_yaml


@pytest.mark.parametrize("text, key, first, second", [
    ("evaluation: {}\nmodel: {source: x}\nevaluation: {dense: false}\n", "evaluation", 1, 3),
    ("method: {name: a, name: b}\n", "name", 1, 1),  # flow style, one line
    ("method:\n  name: svd\n  options:\n    k: 1\n    k: 2\n", "k", 4, 5),  # block style, nested
    ("runs:\n  - {id: 1}\n  - id: 2\n    id: 3\n", "id", 3, 4),  # inside a list
    ('{"a": 1, "b": {"c": 1, "c": 2}}', "c", 1, 1),  # JSON is YAML: the same rule
    ("yes: 1\ntrue: 2\n", True, 1, 2),  # two spellings of one key
])
def test_duplicate_keys_are_named_with_their_lines(text, key, first, second):
    with pytest.raises(DuplicateKeyError) as info:
        load_yaml(text)
    assert (info.value.key, info.value.first_line, info.value.line) == (key, first, second)
    assert f"duplicate key {key!r}" in str(info.value) and f"line {second}" in str(info.value)
    assert isinstance(info.value, yaml.YAMLError)


def test_merge_keys_may_be_overridden_and_aliases_reused():
    text = "base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 5\ny: *b\nz: *b\n"
    assert load_yaml(text) == {"base": {"a": 1, "b": 2}, "x": {"a": 5, "b": 2}, "y": {"a": 1, "b": 2},
                               "z": {"a": 1, "b": 2}}


def test_it_stays_a_safe_loader():
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']\n")
    assert load_yaml("a: [1, 2]\nb: {c: null}\n") == {"a": [1, 2], "b": {"c": None}}
