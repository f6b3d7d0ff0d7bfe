"""Reading training records off disk: JSON arrays and JSONL files into ``Row`` s (where, line, record).

Notable decisions:

- Errors name the file, the line and the field: ``train.jsonl:7 field 'output': ...`` (1-based line);
  ``train.json[12]:40 field 'output': ...`` in a JSON array (0-based record index, then the line the record
  starts on: the array is walked record by record with ``JSONDecoder.raw_decode``); ``name[12]`` for row 12
  of a ``datasets.Dataset``.
- A key given twice in a record and an integer too long to read are errors naming the key (``strict_json``).
- Only regular files are read (a FIFO would block forever, /dev/zero never end).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loramoe.errors import DataError, FileSystemError
from loramoe.files import check_regular
from loramoe.strict_json import JSONRefused, StrictDecoder

_WS = re.compile(r"[ \t\n\r]*")
Row = tuple[str, int | None, Any]  # (where: the path as errors show it, line, record)


def read_records(path: str | Path, *, skip_invalid: bool = False) -> tuple[list[Row], int]:
    """Read a JSON array or a JSONL file (UTF-8) into ``(where, line, record)`` rows.

    A file whose first non-blank character is ``[`` is a JSON array; anything else is read as JSONL (one JSON
    value a line, blank lines ignored). A BOM is accepted.

    Args:
        path: the file.
        skip_invalid: skip malformed JSONL lines (counted) instead of raising.

    Returns:
        The records with their lines, and the number of malformed lines skipped.

    Raises:
        DataError: missing file, a directory, not UTF-8, empty, malformed JSON, or no records.
        FileSystemError: the file cannot be read (permissions, an I/O error).
    """
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"file not found (relative paths start at {Path.cwd()}); check the path", path=path)
    if p.is_dir():
        raise DataError("is a directory; give a .json (array) or .jsonl file", path=path)
    check_regular(p, DataError, path=path)  # a FIFO would block forever, /dev/zero never end
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise FileSystemError.from_fault(err, path, doing="reading the data file") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not UTF-8 (byte {raw[e.start]:#04x}); re-save the file as UTF-8", path=path, line=line
        ) from None
    start = _WS.match(text).end()
    if start == len(text):
        raise DataError(
            "file is empty; it needs a JSON array of records or one JSON object per line", path=path
        )
    if text[start] == "[":
        rows, skipped = _json_array(text, start, path), 0
    else:
        rows, skipped = _jsonl(text, path, skip_invalid)
    if not rows and not skipped:
        raise DataError("holds no records", path=path)
    return rows, skipped


def _json_array(text: str, pos: int, path: str) -> list[Row]:
    decoder = StrictDecoder(constants=True)
    rows: list[Row] = []
    line, counted = 1, 0
    pos = _WS.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    if closed:
        pos += 1
    while not closed:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except JSONRefused as e:
            raise DataError(e.problem, path=f"{path}[{len(rows)}]", line=line, field=e.field) from None
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=e.lineno) from None
        except RecursionError:
            raise DataError("malformed JSON: nested too deeply", path=path, line=line) from None
        rows.append((f"{path}[{len(rows)}]", line, record))
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            closed, pos = True, pos + 1
        else:
            where = 1 + text.count("\n", 0, pos)
            raise DataError("malformed JSON: expected ',' or ']' after a record", path=path, line=where)
    if _WS.match(text, pos).end() != len(text):
        where = 1 + text.count("\n", 0, _WS.match(text, pos).end())
        raise DataError("malformed JSON: extra data after the closing ']'", path=path, line=where)
    return rows


def _jsonl(text: str, path: str, skip_invalid: bool) -> tuple[list[Row], int]:
    rows: list[Row] = []
    skipped, decoder = 0, StrictDecoder(constants=True)
    # split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028 and friends.
    for line, chunk in enumerate(text.split("\n"), start=1):
        if not chunk.strip():
            continue
        try:
            rows.append((path, line, decoder.decode(chunk)))
        except (json.JSONDecodeError, RecursionError, JSONRefused) as e:
            if skip_invalid:
                skipped += 1
                continue
            if isinstance(e, JSONRefused):
                raise DataError(e.problem, path=path, line=line, field=e.field) from None
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise DataError(
                f"malformed JSONL line: {msg}; each line must be one JSON object", path=path, line=line
            ) from None
    return rows, skipped


def dataset_rows(records: Iterable[Any], name: str) -> Iterable[Row]:
    """Rows for ``parse_records`` from any iterable of records (a ``datasets.Dataset``, a list of dicts)."""
    for i, record in enumerate(records):
        yield f"{name}[{i}]", None, record
