"""Training records: reading JSON / JSONL files and normalising each record format to one ``Example``.

Notable decisions:

- Every format parser returns the same small ``Example``; nothing downstream knows a record's format.
- The format is detected once per record set, from its first record, so a typo in a later record is an error
  rather than a silent switch to another format.
- Errors name the file, the line and the field: ``train.jsonl:7 field 'output': ...`` (1-based line);
  ``train.json[12]:40 field 'output': ...`` in a JSON array (0-based record index, then the line the record
  starts on: the array is walked record by record with ``JSONDecoder.raw_decode``); ``name[12]`` for row 12
  of a ``datasets.Dataset``.
- A key given twice in a record and an integer too long to read are errors naming the key (``strict_json``).
- Task types are ints in ``range(len(task_names))``; records may give the int or the name. The defaults follow
  the reference (arXiv 2312.09979, ``data/tiny_data``): 0 = downstream task, 1 = world knowledge (closed-book
  QA).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from loramoe.config import BINARY_TASK_NAMES
from loramoe.errors import ConfigError, DataError, FileSystemError
from loramoe.files import check_regular
from loramoe.strict_json import JSONRefused, StrictDecoder
from loramoe.validation import is_int

# format -> the keys that identify it (checked in this order by detect_format).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "qa": ("question", "answer|answers"),
}
FORMAT_ALIASES = {"loramoe": "alpaca", "chat": "messages", "completion": "prompt_completion"}
FORMATS = ("auto", *FORMAT_KEYS, *FORMAT_ALIASES)
RECORD_FIELDS = ("instruction", "input", "output", "messages", "question", "answer", "answers", "prompt",
                 "completion", "task_type")  # fmt: skip

_WS = re.compile(r"[ \t\n\r]*")
Row = tuple[str, int | None, Any]  # (where: the path as errors show it, line, record)
logger = logging.getLogger("loramoe.data")


@dataclass
class Example:
    """One training sample, whatever format it came in.

    Attributes:
        prompt: the prompt as plain text (used by the plain template).
        answer: the target text; the only tokens (with EOS) that are learned.
        task_type: index into the task names (0 = downstream, 1 = knowledge by default).
        source: the source's name (file name or dataset name), for statistics and error messages.
        line: where the record is in its file (see the module docstring), or None.
        messages: the prompt as chat messages for a chat template; None: one user turn holding ``prompt``.
    """

    prompt: str
    answer: str
    task_type: int
    source: str = ""
    line: int | None = None
    messages: list[dict[str, str]] | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a single user turn unless the record had its own)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


def check_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
    """Validate the task names (index = task type) and return them as a tuple.

    Raises:
        ConfigError: not a non-empty list of distinct non-empty strings.
    """
    if isinstance(task_names, str) or not isinstance(task_names, Sequence) or not task_names:
        raise ConfigError(f"task_names must be a non-empty list of names, e.g. {list(BINARY_TASK_NAMES)}")
    if not all(isinstance(n, str) and n for n in task_names) or len(set(task_names)) != len(task_names):
        raise ConfigError(f"task_names must be distinct non-empty strings; got {list(task_names)!r}")
    return tuple(task_names)


def valid_task_types(task_names: Sequence[str]) -> str:
    """The valid task types written out for error messages, e.g. ``0 ('downstream'), 1 ('knowledge')``."""
    return ", ".join(f"{i} ({n!r})" for i, n in enumerate(task_names))


def resolve_task_type(
    value: Any, task_names: Sequence[str], *, path: str | None = None, line: int | None = None
) -> int:
    """Map a task type given as an int or a name to its int.

    Raises:
        DataError: an unknown name, an int out of range, or another type; the message lists the valid values.
    """
    if is_int(value) and 0 <= value < len(task_names):
        return value
    if isinstance(value, str) and value in task_names:
        return task_names.index(value)
    valid = valid_task_types(task_names)
    raise DataError(f"unknown task type {value!r}; valid: {valid}", path=path, line=line, field="task_type")


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


def detect_format(record: Any, *, path: str | None = None, line: int | None = None) -> str:
    """The format of a record set, judged from one record's keys.

    Raises:
        DataError: the record is not an object or matches no format; the message lists the formats' keys.
    """
    if isinstance(record, Mapping):
        for fmt, keys in FORMAT_KEYS.items():
            if all(any(k in record for k in key.split("|")) for key in keys):
                return fmt
    known = "; ".join(f"{fmt}: {' + '.join(keys)}" for fmt, keys in FORMAT_KEYS.items())
    found = sorted(map(str, record))[:12] if isinstance(record, Mapping) else type(record).__name__
    raise DataError(
        f"cannot tell the record format from {found}; expected one of ({known}), or set format: and "
        f"columns: on the source",
        path=path,
        line=line,
    )


def parse_records(
    rows: Iterable[Row],
    *,
    task_names: Sequence[str],
    source: str = "",
    fmt: str = "auto",
    task_type: int | None = None,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Example], int, int]:
    """Normalise ``(where, line, record)`` rows into Examples.

    Args:
        rows: from ``read_records``, or from ``dataset_rows`` for records in memory (a ``datasets.Dataset``).
        task_names: names of the task types (index = task type).
        source: the name stored on each Example.
        fmt: one of ``FORMATS``; "auto" detects it from the first record.
        task_type: the source's task type; when given it overrides the records' own ``task_type``.
        columns: the record's key for each field named differently, e.g. ``{"question": "qText"}``.
        skip_invalid: skip (and count) invalid records instead of raising; the first one's error is logged.

    Returns:
        The Examples, the number of records skipped, and the number whose own task type was overridden.

    Raises:
        DataError: an invalid record (when not skipping); names file, line and field.
    """
    rename = {v: k for k, v in (columns or {}).items()}
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMAT_KEYS and fmt != "auto":
        raise ConfigError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    examples: list[Example] = []
    skipped = overridden = 0
    for path, line, record in rows:
        at = _At(path, line)
        try:
            if not isinstance(record, Mapping):
                raise at.error(f"record is a {type(record).__name__}, not a JSON object")
            record = {rename.get(k, k): v for k, v in record.items()} if rename else record
            fmt = detect_format(record, path=path, line=line) if fmt == "auto" else fmt
            example = _PARSERS[fmt](record, at)
            overridden += _set_task_type(example, record, at, task_type, task_names)
        except DataError as e:
            if not skip_invalid:
                raise
            if not skipped:
                logger.warning("skipping invalid records (skip_invalid is on); the first: %s", e)
            skipped += 1
            continue
        example.source, example.line = source, line
        examples.append(example)
    return examples, skipped, overridden


def _set_task_type(
    example: Example, record: Mapping, at: _At, task_type: int | None, task_names: Sequence[str]
) -> bool:
    """Give ``example`` the source's task type, else the record's own; True when the source's overrode a
    different one in the record."""
    if task_type is not None:
        example.task_type = task_type
        return record.get("task_type", task_type) not in (task_type, task_names[task_type])
    if "task_type" not in record:
        valid = valid_task_types(task_names)
        raise at.error(
            f"missing; add it to the records or set task_type: on the source ({valid})", "task_type"
        )
    example.task_type = resolve_task_type(record["task_type"], task_names, path=at.path, line=at.line)
    return False


class _At(NamedTuple):
    """Where a record is, for its errors."""

    path: str | None
    line: int | None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)

    def text(self, record: Mapping, key: str, *, optional: bool = False, name: str | None = None) -> str:
        """``record[key]`` checked to be a string (``name``: the field as errors show it)."""
        value, name = record.get(key), name or key
        if value is None and optional:
            return ""
        if key not in record:
            raise self.error("missing; add it, or map the record's own key to it with columns:", name)
        if not isinstance(value, str):
            raise self.error(f"must be a string, not {type(value).__name__}", name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.error("holds an unpaired surrogate (\\ud800-\\udfff); fix the text", name) from None
        return value


def _example(prompt: str, answer: str, at: _At, prompt_field: str, answer_field: str, **kw: Any) -> Example:
    if not prompt.strip():
        raise at.error("empty prompt; every record needs one", prompt_field)
    if not answer.strip():
        raise at.error(
            "empty answer, nothing to learn; fix or remove the record (or set skip_invalid)", answer_field
        )
    return Example(prompt=prompt, answer=answer, task_type=0, **kw)


def _alpaca(record: Mapping, at: _At) -> Example:
    instruction, extra = at.text(record, "instruction"), at.text(record, "input", optional=True)
    # The reference's prompt: instruction + "\n" + input.
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return _example(prompt, at.text(record, "output"), at, "instruction", "output")


def _prompt_completion(record: Mapping, at: _At) -> Example:
    return _example(at.text(record, "prompt"), at.text(record, "completion"), at, "prompt", "completion")


def _qa(record: Mapping, at: _At) -> Example:
    """Closed-book QA; with several gold answers the first is the target (TriviaQA's ``{"value"}`` too)."""
    question, key = at.text(record, "question"), "answer" if "answer" in record else "answers"
    if not question.strip():
        raise at.error("empty prompt; every record needs one", "question")
    value = record.get(key)
    if isinstance(value, list) and value:
        value = value[0]
    elif isinstance(value, Mapping) and "value" in value:
        value = value["value"]
    if not isinstance(value, str):
        raise at.error("must be a string, a non-empty list of strings or {'value': string}", key)
    answer = at.text({key: value}, key)
    prompt = f"Question: {question}\nAnswer:"  # the reference's closed-book QA prompt
    return _example(prompt, answer, at, "question", key, messages=[{"role": "user", "content": question}])


def _messages(record: Mapping, at: _At) -> Example:
    """Chat: the final message is the answer and must be the assistant's; the ones before are the prompt."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise at.error(
            "must be a list of two or more {role, content} messages, the last the assistant's", "messages"
        )
    prompt = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise at.error(f"is a {type(m).__name__}, not a {{role, content}} object", f"messages[{i}]")
        role, content = (at.text(m, k, name=f"messages[{i}].{k}") for k in ("role", "content"))
        prompt.append({"role": role, "content": content})
    *prompt, last = prompt
    if last["role"] != "assistant":
        raise at.error(f"the last message must be the assistant's answer, not {last['role']!r}'s", "messages")
    # plain-template prompt: a lone turn as is, several as "role: content" paragraphs
    text = (
        prompt[0]["content"]
        if len(prompt) == 1
        else "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    )
    return _example(text, last["content"], at, "messages", "messages", messages=prompt)


_PARSERS = {"alpaca": _alpaca, "messages": _messages, "prompt_completion": _prompt_completion, "qa": _qa}
