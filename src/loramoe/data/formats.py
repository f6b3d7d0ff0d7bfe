"""Training records: normalising each record format to one ``Example`` (reading the files: ``data/records.py``).

Notable decisions:

- Every format parser returns the same small ``Example``; nothing downstream knows a record's format.
- The format is detected once per record set, from its first record, so a typo in a later record is an error
  rather than a silent switch to another format.
- Errors name the file, the line and the field of a record (its ``Row``, from ``data/records.py``).
- Task types are ints in ``range(len(task_names))``; records may give the int or the name. The defaults follow
  the reference (arXiv 2312.09979, ``data/tiny_data``): 0 = downstream task, 1 = world knowledge (closed-book
  QA).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from loramoe.config import BINARY_TASK_NAMES
from loramoe.data.records import Row
from loramoe.errors import ConfigError, DataError
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
