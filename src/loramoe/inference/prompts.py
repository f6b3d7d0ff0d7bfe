"""Reading prompts from a file (``loramoe generate --file``): plain text lines, JSONL or a JSON list."""

from __future__ import annotations

import json
from pathlib import Path

from loramoe.errors import DataError
from loramoe.files import check_regular
from loramoe.strict_json import JSONRefused, StrictDecoder

# Record fields that hold a prompt, in order of preference; "input" is appended to "instruction".
PROMPT_FIELDS = ("prompt", "instruction", "question")


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a file.

    Formats, by extension:

    - ``.txt``: one prompt per line; surrounding whitespace stripped, blank lines skipped.
    - ``.jsonl``: one JSON object (or string) per line, blank lines skipped.
    - ``.json``: a list of objects (or strings).

    An object's prompt is its ``prompt`` field, else ``instruction`` (followed by a blank line and ``input`` when
    that is non-empty), else ``question``.

    Args:
        path: The file.

    Returns:
        The prompts, in file order.

    Raises:
        DataError: Missing or unreadable file, unknown extension, bad JSON, a record without a usable prompt field
            (the error names the line, or for ``.json`` the 1-based record number, and the field), or no prompts.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise DataError(
            "unknown prompt file type; use .txt (one prompt per line), .jsonl or .json", path=str(path)
        )
    check_regular(path, DataError, path=str(path))  # a FIFO would block forever, /dev/zero never end
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read: {e}", path=str(path)) from e

    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = _jsonl_prompts(text, str(path))
    else:
        prompts = _json_prompts(text, str(path))
    if not prompts:
        raise DataError("no prompts in the file", path=str(path))
    return prompts


def _jsonl_prompts(text: str, path: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(_record_prompt(_decode(line, path, number), path, number))
    return prompts


def _decode(text: str, path: str, line: int | None) -> object:
    """One JSON value, with the same refusals as training data (``StrictDecoder``); errors name the line."""
    try:
        return StrictDecoder(constants=True).decode(text)
    except JSONRefused as e:
        raise DataError(e.problem, path=path, line=line, field=e.field) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path=path, line=line or e.lineno) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", path=path, line=line) from None


def _json_prompts(text: str, path: str) -> list[str]:
    records = _decode(text, path, None)
    if not isinstance(records, list):
        raise DataError(f"a .json prompt file must hold a list, found {type(records).__name__}", path=path)
    return [_record_prompt(record, path, number) for number, record in enumerate(records, start=1)]


def _record_prompt(record: object, path: str, line: int) -> str:
    if isinstance(record, str):
        if not record.strip():
            raise DataError("empty prompt", path=path, line=line)
        return record
    if not isinstance(record, dict):
        raise DataError(
            f"expected an object or a string, found {type(record).__name__}", path=path, line=line
        )
    field = next((name for name in PROMPT_FIELDS if name in record), None)
    if field is None:
        raise DataError(
            f"no prompt field; expected one of {', '.join(PROMPT_FIELDS)}, found {', '.join(map(str, record)) or 'none'}",
            path=path,
            line=line,
            field="prompt",
        )
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError("must be a non-empty string", path=path, line=line, field=field)
    if field == "instruction":
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError("must be a string", path=path, line=line, field="input")
        if extra and extra.strip():
            return f"{value}\n\n{extra}"
    return value
