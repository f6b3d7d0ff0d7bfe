"""The one JSON decoder for text a user gives loramoe: data records, prompt files, adapter configs, results files.

``json`` takes two things silently or fails on them with a bare traceback: a key given twice in one object (it
keeps the last, so a record's ``"output"`` could be either) and an integer of more than 4,300 digits (a
``ValueError`` from the conversion). :class:`StrictDecoder` refuses both as :class:`JSONRefused`, which names the
field, so each reader turns it into its own one-line error with the file and line. Integers are bounded by
``loramoe.validation.MAX_INT_DIGITS``, like YAML's and the command line's.
"""

from __future__ import annotations

import json
from typing import Any

from loramoe.validation import MAX_INT_DIGITS, too_long_int


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class JSONRefused(ValueError):
    """A JSON document that parses but is refused: a key given twice in one object, or an integer of more than
    ``MAX_INT_DIGITS`` digits. ``field`` is where, as ``messages[0].content`` (None: not known)."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.field = problem, field

    def where(self) -> str:
        """`` field 'x'`` for a message, or nothing."""
        return "" if self.field is None else f" field {self.field!r}"


class _LongInt:
    """Stands in for an integer too long to convert, until the decoder has found where it is."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONRefused("the key is given twice in one object; keep one", key)
    return obj


class StrictDecoder(json.JSONDecoder):
    """``json.JSONDecoder`` that refuses what ``json`` would take silently or fail on with a traceback: a key given
    twice in one object (``json`` keeps the last) and an integer of more than ``MAX_INT_DIGITS`` digits (``json``
    raises a bare ``ValueError`` past 4,300); both as :class:`JSONRefused`. NaN and Infinity only if ``constants``.
    Depth is not bounded here: deep nesting raises ``RecursionError``, which callers report."""

    def __init__(self, *, constants: bool = False) -> None:
        super().__init__(
            parse_int=self._int,
            object_pairs_hook=_unique_keys,
            parse_constant=None if constants else _no_constant,
        )
        self._long: str | None = None  # the first long integer's literal

    def _int(self, literal: str) -> Any:
        if len(literal) <= MAX_INT_DIGITS or too_long_int(literal) is None:
            return int(literal)
        self._long = self._long or literal
        return _LongInt()

    def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
        self._long = None
        value, end = super().raw_decode(s, idx)
        if self._long is not None:
            raise JSONRefused(too_long_int(self._long) or "", _long_int_path(value))
        return value, end


def _long_int_path(value: Any) -> str | None:
    """Where the first ``_LongInt`` of a decoded value is, as ``a.b[2]`` (None: the value itself)."""
    stack: list[tuple[Any, str | None]] = [(value, None)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _LongInt):
            return path
        if isinstance(node, dict):
            stack.extend((v, k if path is None else f"{path}.{k}") for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, f"{path or ''}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None
