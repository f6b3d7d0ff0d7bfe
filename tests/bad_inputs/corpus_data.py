"""Bad data files for the corpus, each with a config pointing at it: malformed JSON and JSONL, encodings other than
UTF-8, empty files, records of the wrong kind, unknown task types, and bad fields in every record format.
"""

from __future__ import annotations

import json
import re
from typing import Any

from corpus_cases import GOOD, OUT, REL, case, with_value, write_config


def data_case(name: str, content: bytes | str, match: str, *, error: str = "DataError", ext: str = "jsonl",
              source: dict | None = None) -> None:  # fmt: skip
    path = OUT / "data" / f"{name}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    rel = f"{REL}/data/{name}.{ext}"
    config = with_value("data.sources", [{"path": rel, **(source or {})}])
    where = re.escape(f"{name}.{ext}")
    case(f"data/{name}", error, match.replace("FILE", where), config=write_config(f"data-{name}", config))


def jsonl(records: list[Any]) -> str:
    """One record a line, non-ASCII written as is (escaped only where it cannot be UTF-8: lone surrogates)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return "".join(
        (line if line.isascii() or _utf8(line) else json.dumps(r)) + "\n" for line, r in zip(lines, records)
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def gen_data() -> None:
    good = GOOD["alpaca"]
    prefix = jsonl(good)  # two good lines: the bad one is line 3
    malformed_lines = {
        "trailing-comma": '{"instruction": "a", "output": "b",}',
        "single-quotes": "{'instruction': 'a', 'output': 'b'}",
        "unquoted-key": '{instruction: "a", "output": "b"}',
        "missing-brace": '{"instruction": "a", "output": "b"',
        "two-objects": '{"instruction": "a", "output": "b"} {"instruction": "c", "output": "d"}',
        "bare-text": "this is not json",
        "unclosed-string": '{"instruction": "a, "output": "b"}',
        "bad-escape": '{"instruction": "a\\x41", "output": "b"}',
        "control-char": '{"instruction": "a\tb", "output": "b"}'.replace("\\t", "\t"),
        "truncated": '{"instruction": "a", "outp',
        "missing-colon": '{"instruction" "a", "output": "b"}',
        "python-none": '{"instruction": "a", "output": None}',
        "comment": '// a comment\n{"instruction": "a", "output": "b"}',
        "deep-nesting": "[" * 5_000 + "]" * 5_000,
    }
    for name, line in malformed_lines.items():
        data_case(f"jsonl-{name}", prefix + line + "\n" + jsonl(good), r"FILE:3\b.*(malformed|nested)")
    data_case("jsonl-bad-first-line", "{oops}\n" + prefix, r"FILE:1\b.*malformed")
    data_case("jsonl-bad-last-line-no-newline", prefix * 3 + '{"instruction": "a"', r"FILE:7\b.*malformed")

    array_cases = {
        "missing-bracket": ('[\n{"instruction": "a", "output": "b", "task_type": 0}\n', r"FILE:\d+.*malformed"),
        "trailing-comma": ('[\n{"instruction": "a", "output": "b", "task_type": 0},\n]\n', r"FILE:3\b.*malformed"),
        "missing-comma": ('[\n{"instruction": "a", "output": "b", "task_type": 0}\n{"instruction": "c"}\n]\n',
                          r"FILE:3\b.*malformed"),
        "extra-data": ('[{"instruction": "a", "output": "b", "task_type": 0}]\n{"x": 1}\n', r"FILE:2\b.*extra data"),
        "unclosed-string": ('[\n{"instruction": "a", "output": "b\n}]\n', r"FILE:2\b.*malformed"),
        "only-open": ("[", r"FILE.*malformed"),
        "nested-garbage": ('[\n{"instruction": "a", "output": "b", "task_type": 0},\n{"instruction": [1, 2,}\n]',
                           r"FILE:3\b.*malformed"),
        "object-not-array": ('{"instruction": "a", "output": "b", "task_type": 0,\n "x": [1, 2\n}\n',
                             r"FILE:1\b.*malformed"),
        "deep-nesting": ("[" + "[" * 5_000 + "]" * 5_000 + "]", r"FILE:1\b.*malformed"),
    }  # fmt: skip
    for name, (text, match) in array_cases.items():
        data_case(f"json-{name}", text, match, ext="json")

    # encodings: UTF-8 is required
    body = jsonl([*good, {"instruction": "Café?", "output": "Crème", "task_type": 0}])
    encodings = {
        "latin1": (body.encode("latin-1"), r"FILE:3\b.*not UTF-8"),
        "cp1252-quotes": (jsonl([*good, {"instruction": "“hi”", "output": "x", "task_type": 0}]).encode("cp1252"),
                          r"FILE:3\b.*not UTF-8"),
        "utf16-le-bom": (body.encode("utf-16"), r"FILE:1\b.*not UTF-8"),
        "utf16-be": (body.encode("utf-16-be"), r"FILE:\d+\b.*(not UTF-8|malformed)"),  # no BOM: NULs, valid UTF-8
        "utf32": (body.encode("utf-32"), r"FILE:1\b.*not UTF-8"),
        "shift-jis": (jsonl([*good, {"instruction": "日本", "output": "x", "task_type": 0}]).encode("shift_jis"),
                      r"FILE:3\b.*not UTF-8"),
        "binary-garbage": (bytes(range(256)) * 4, r"FILE:2\b.*not UTF-8"),  # 0x80 comes after the first 0x0a
    }  # fmt: skip
    for name, (content, match) in encodings.items():
        data_case(f"encoding-{name}", content, match)

    # whole-file problems
    data_case("empty", "", r"FILE.*empty")
    data_case("whitespace-only", "  \n\n\t\n", r"FILE.*empty")
    data_case("empty-array", "[]", r"FILE.*no records", ext="json")
    data_case("nul-bytes", "\0" * 64, r"FILE:1\b.*malformed")

    # records of the wrong kind
    for name, record in {"list": [1, 2], "string": "hello", "number": 3, "null": None, "bool": True}.items():
        data_case(f"record-is-{name}", prefix + json.dumps(record) + "\n", r"FILE:3\b.*not a JSON object")
    data_case(
        "record-unknown-format",
        jsonl([{"text": "a", "label": 1}]),
        r"FILE:1\b.*cannot tell the record format",
    )
    data_case("record-empty-object", jsonl([{}]), r"FILE:1\b.*cannot tell the record format")
    data_case("record-format-switch", prefix + jsonl([{"question": "q?", "answer": "a", "task_type": 0}]),
              r"FILE:3\b field 'instruction'.*missing")  # fmt: skip

    # task types
    task_types = {"unknown-name": "math", "out-of-range": 2, "negative": -1, "float": 0.5, "bool": True,
                  "null": None, "list": [0], "empty-string": ""}  # fmt: skip
    for name, value in task_types.items():
        record = {"instruction": "a", "output": "b", "task_type": value}
        data_case(
            f"task-type-{name}", prefix + jsonl([record]), r"FILE:3\b field 'task_type'.*unknown task type"
        )
    data_case("task-type-missing", prefix + jsonl([{"instruction": "a", "output": "b"}]),
              r"FILE:3\b field 'task_type'.*missing")  # fmt: skip

    # fields, format by format: (format, record, field)
    bad_fields = [
        ("alpaca", {"instruction": "a", "output": ""}, "output", "empty answer"),
        ("alpaca", {"instruction": "a", "output": "   \n "}, "output", "empty answer"),
        ("alpaca", {"instruction": "a", "output": None}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": 42}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": ["b"]}, "output", "must be a string"),
        ("alpaca", {"instruction": "a", "output": {"text": "b"}}, "output", "must be a string"),
        ("alpaca", {"instruction": "", "output": "b"}, "instruction", "empty prompt"),
        ("alpaca", {"instruction": 7, "output": "b"}, "instruction", "must be a string"),
        ("alpaca", {"instruction": "a", "input": 3, "output": "b"}, "input", "must be a string"),
        ("alpaca", {"instruction": "a", "output": "\ud800"}, "output", "surrogate"),
        ("qa", {"question": "q", "answer": ""}, "answer", "empty answer"),
        ("qa", {"question": "q", "answer": None}, "answer", "must be a string"),
        ("qa", {"question": "q", "answers": []}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": [1]}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": {"value": 3}}, "answers", "must be a string"),
        ("qa", {"question": "q", "answers": {"aliases": ["x"]}}, "answers", "must be a string"),
        ("qa", {"question": "", "answer": "a"}, "question", "empty"),
        ("qa", {"question": ["q"], "answer": "a"}, "question", "must be a string"),
        ("prompt_completion", {"prompt": "p", "completion": ""}, "completion", "empty answer"),
        ("prompt_completion", {"prompt": "p", "completion": 1.5}, "completion", "must be a string"),
        ("prompt_completion", {"prompt": " ", "completion": "c"}, "prompt", "empty prompt"),
        ("prompt_completion", {"prompt": "p"}, "completion", "missing"),
        ("messages", {"messages": "hello"}, "messages", "list of two or more"),
        ("messages", {"messages": [{"role": "assistant", "content": "x"}]}, "messages", "list of two or more"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "messages", "must be the assistant"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1]", "not a {role"),
        ("messages", {"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[0].role",
         "missing"),
        ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
         "messages[0].content", "must be a string"),
        ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
         "messages", "empty answer"),
        ("messages", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]},
         "messages", "empty prompt"),
    ]  # fmt: skip
    for i, (fmt, record, field, what) in enumerate(bad_fields):
        lines = jsonl(GOOD[fmt]) + jsonl([{**record, "task_type": 0}])
        bad_line = len(GOOD[fmt]) + 1
        match = rf"FILE:{bad_line}\b field {re.escape(repr(field))}.*{re.escape(what)}"
        data_case(f"field-{fmt}-{field}-{i}".replace("[", "").replace("]", ""), lines, match)
    # the same in a JSON array: errors name the record index and its line
    records = [*good, {"instruction": "a", "output": "", "task_type": 0}]
    data_case("json-array-empty-answer", json.dumps(records, indent=1), r"FILE\[2\]:\d+ field 'output'.*empty answer",
              ext="json")  # fmt: skip
    # every record invalid, but skipped: nothing left to train on
    data_case(
        "all-invalid-skipped", "{bad\n[oops\n", r"FILE.*no usable records", source={"skip_invalid": True}
    )
    data_case("all-records-invalid-skipped", jsonl([{"instruction": "a", "output": ""}] * 3),
              r"FILE.*no usable records", source={"skip_invalid": True, "task_type": 0})  # fmt: skip
    # a format forced on records of another
    data_case("forced-format-mismatch", jsonl(GOOD["qa"]), r"FILE:1\b field 'instruction'.*missing",
              source={"format": "alpaca"})  # fmt: skip
    data_case("columns-map-missing", jsonl([{"q": "a", "a": "b", "task_type": 0}]), r"FILE:1\b.*(missing|format)",
              source={"columns": {"question": "question_text", "answer": "a"}})  # fmt: skip

    # --- class: values (integers too long to read, a key given twice) --------------------------------------
    long = "1" * 5000  # past Python's 4,300-digit limit on int(str)
    values = {
        "jsonl-long-integer": (prefix + '{"instruction": "a", "output": "b", "task_type": LONG}\n'.replace("LONG", long),
                               r"FILE:3\b field 'task_type': an integer of 5000 digits"),
        "jsonl-long-integer-nested": (prefix + '{"instruction": "a", "output": "b", "task_type": 0, "meta": {"ids": [1, -LONG]}}\n'.replace("LONG", long),
                                      r"FILE:3\b field 'meta\.ids\[1\]': an integer of 5000 digits"),
        "jsonl-duplicate-key": (prefix + '{"instruction": "a", "output": "b", "output": "c", "task_type": 0}\n',
                                r"FILE:3\b field 'output': the key is given twice"),
        "jsonl-duplicate-nested-key": (prefix + '{"messages": [{"role": "user", "role": "assistant", "content": "a"}], "task_type": 0}\n',
                                       r"FILE:3\b field 'role': the key is given twice"),
    }  # fmt: skip
    for name, (text, match) in values.items():
        data_case(name, text, match)
    array = '[\n{"instruction": "a", "output": "b", "task_type": 0},\n{"instruction": "a", "output": "b", %s}\n]\n'
    data_case("json-long-integer", array % f'"task_type": {long}',
              r"FILE\[1\]:3 field 'task_type': an integer of 5000 digits", ext="json")  # fmt: skip
    data_case("json-duplicate-key", array % '"task_type": 0, "task_type": 1',
              r"FILE\[1\]:3 field 'task_type': the key is given twice", ext="json")  # fmt: skip
