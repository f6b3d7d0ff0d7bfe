"""Validation shared by every config dataclass: building one from a mapping, and per-field rules.

A rule is ``(is_valid, what the value must be)``; :func:`check_fields` raises a ``ConfigError`` for the first field
that fails, worded ``"<field> must be <what>, got <value>"``, so every config reports a bad value the same way.
YAML and JSON blur kinds that Python keeps apart (``true`` is an int to ``isinstance``), so the kinds here are the
strict ones: a bool is never an integer or a number. Function arguments are checked with the same rules
(:func:`check_value`), so a library call and a config file refuse the same values with the same words.

Integers typed by a user (YAML, JSON, ``key=value`` overrides, flags) are read through one bound,
:data:`MAX_INT_DIGITS` (:func:`int_digits`, :func:`parse_int`): Python refuses to convert a decimal string of over
4,300 digits either way (reading it, or printing the number in an error message), and no count, seed or id that
loramoe reads comes near the bound.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from loramoe.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]
T = TypeVar("T")

MAX_INT_DIGITS = 100
# ASCII only: str.isdigit() also accepts digits such as "²" that int() refuses.
_DECIMAL = re.compile(r"[+-]?[0-9]+")


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML and JSON give both)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_digits(literal: str) -> int:
    """The digits of an integer literal, in any base (``0x``/``0o``/``0b`` prefix, sign, ``_`` and YAML's ``:``
    separators not counted)."""
    body = literal.strip().lstrip("+-")
    if body[:2].lower() in ("0x", "0o", "0b"):
        body = body[2:]
    return sum(ch.isalnum() for ch in body)


def too_long_int(literal: str) -> str | None:
    """Why ``literal`` is refused as an integer (more than :data:`MAX_INT_DIGITS` digits), or None."""
    digits = int_digits(literal)
    if digits <= MAX_INT_DIGITS:
        return None
    return f"an integer of {digits} digits, more than the {MAX_INT_DIGITS} loramoe reads; is this the right value?"


def parse_int(text: str, what: str) -> int | None:
    """``text`` as an int when it is a decimal integer (ASCII digits, an optional sign), else None.

    Raises:
        ConfigError: naming ``what``, for more than :data:`MAX_INT_DIGITS` digits.
    """
    if not _DECIMAL.fullmatch(text):
        return None
    problem = too_long_int(text)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")
    return int(text)


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message, cut to about ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int of over 4,300 digits, alone or inside a list
        return f"{'an int' if is_int(value) else type(value).__name__} too long to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def integer(minimum: int | None = None) -> Rule:
    """An int (not a bool), at least ``minimum`` when given."""
    need = "an integer" if minimum is None else f"an integer >= {minimum}"
    return (lambda v: is_int(v) and (minimum is None or v >= minimum)), need


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Rule:
    """A finite number in the interval from ``low`` to ``high`` (closed ends unless ``*_open``)."""

    def ok(v: Any) -> bool:
        if not is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if low is not None and high is not None:
        need = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        need = (
            "a positive number"
            if (low == 0 and low_open)
            else f"a number {'>' if low_open else '>='} {low:g}"
        )
    else:
        need = "a finite number"
    return ok, need


def boolean() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


def one_of(choices: Collection[Any]) -> Rule:
    """One of ``choices``, of the choice's own kind: ``True`` is not ``1`` and ``1.0`` is not ``1`` here, though
    ``==`` (and so ``in``) says they are."""
    return (lambda v: any(type(v) is type(c) and v == c for c in choices)), f"one of {list(choices)}"


def text() -> Rule:
    """A non-empty string."""
    return (lambda v: isinstance(v, str) and bool(v)), "a non-empty string"


def is_path_text(value: Any) -> bool:
    """A non-empty string that can name a file: no NUL byte (no file system has one in a name) and UTF-8 text (a
    name read from a command line with bytes that are not UTF-8 cannot be written into loramoe's UTF-8 records of
    a run: its config, its model card)."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


PATH_NEED = "without NUL bytes, in UTF-8 (rename a file or folder whose name is not)"


def path_text(what: str = "a path") -> Rule:
    """A name or path that can name a file (:func:`is_path_text`)."""
    return is_path_text, f"{what} {PATH_NEED}"


def list_of(rule: Rule, *, at_least: int = 1, distinct: bool = False) -> Rule:
    """A list or tuple of at least ``at_least`` items, each passing ``rule`` (and all different if ``distinct``)."""
    ok, need = rule

    def valid(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) < at_least or not all(ok(e) for e in v):
            return False
        return not distinct or len(set(v)) == len(v)

    what = "a non-empty list" if at_least == 1 else f"a list of at least {at_least} items"
    return valid, f"{what}{', all different' if distinct else ''}, each {need}"


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    ok, need = rule
    return (lambda v: v is None or ok(v)), f"{need} or null"


def check_value(name: str, value: Any, rule: Rule) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` passes ``rule``."""
    ok, need = rule
    require(ok(value), f"{name} must be {need}, got {shown(value)}")


def check_fields(config: Any, rules: Mapping[str, Rule]) -> None:
    """Raise ``ConfigError`` for the first field of ``config`` that fails its rule, naming the field."""
    for name, rule in rules.items():
        check_value(name, getattr(config, name), rule)


def from_mapping(cls: type[T], data: Any, *, where: str | None = None) -> T:
    """Build the dataclass ``cls`` from a YAML / JSON mapping; unknown keys are listed with the valid ones.

    Args:
        cls: a dataclass whose ``__post_init__`` validates the values.
        data: the mapping.
        where: how errors name the mapping (default: the class name).
    """
    where = where or cls.__name__
    require(
        isinstance(data, Mapping), f"{where} must be a mapping of keys to values, got {type(data).__name__}"
    )
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in data if k not in valid)
    require(not unknown, f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    return cls(**data)


def section(name: str, cls: type[T], value: Any) -> T:
    """A nested config (``loramoe:``, ``data:`` ...) built from its mapping; its errors start with ``name``."""
    if isinstance(value, cls):
        return value
    try:
        return from_mapping(cls, value, where=name)
    except ConfigError as err:
        if str(err).startswith(name):
            raise
        raise ConfigError(f"{name}: {err}") from err
