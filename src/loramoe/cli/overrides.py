"""Values as the command line gives them: ``key.sub=value`` overrides of a YAML config, integer flags, and naming
the config file in the errors its settings cause."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from loramoe.errors import ConfigError, TargetError
from loramoe.files import YAML_FLOAT, parse_yaml
from loramoe.validation import parse_int, shown

MAX_OVERRIDE_BYTES = 64 << 10


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML: numbers, booleans, lists; bounded in size, depth
    and alias expansion like a config file, and text itself when the value is not YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {shown(item)} must look like key=value (e.g. training.learning_rate=1e-4)"
            )
        what = f"override {shown(item)}"
        value = parse_yaml(raw, what, max_bytes=MAX_OVERRIDE_BYTES, or_text=True) if raw else ""
        if isinstance(value, str) and YAML_FLOAT.fullmatch(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        node: Any = config
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # data.sources.0.path: an index into a list
                node = node[_index(what, part, node)]
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"{what}: item {part} is {shown(node)}, not a section")
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"{what}: {shown(part)} is not a section")
            node = child
        if isinstance(node, list):
            node[_index(what, parts[-1], node)] = value
        else:
            node[parts[-1]] = value
    return config


def int_flag(text: str) -> int:
    """An integer flag's value (``type=int_flag``), read by the bounded parser: argparse reports a bad one on its
    one error line, the value cut short and a 5,000-digit one refused without converting it."""
    try:
        value = parse_int(text.strip(), "the value")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value is None:
        raise argparse.ArgumentTypeError(f"not an integer: {shown(text)}")
    return value


def _index(what: str, part: str, items: list) -> int:
    index = parse_int(part, what)
    if index is None or not 0 <= index < len(items):
        raise ConfigError(f"{what}: {shown(part)} is not an index of a list of {len(items)} items")
    return index


def with_source(path: str, build: Callable[[Any], Any], raw: Any) -> Any:
    """Call ``build(raw)``; a config or target error it raises names the config file (data errors name theirs)."""
    try:
        return build(raw)
    except (ConfigError, TargetError) as err:
        raise type(err)(f"{path}: {err}") from err
