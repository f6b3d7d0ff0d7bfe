"""Reading JSON / JSONL records and normalising every format to Example (loramoe.formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramoe.config import BINARY_TASK_NAMES
from loramoe.data.formats import (
    Example,
    check_task_names,
    detect_format,
    parse_records,
    resolve_task_type,
)
from loramoe.data.records import dataset_rows, read_records
from loramoe.errors import ConfigError, DataError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def parse_file(path: Path, **kw) -> list[Example]:
    rows, _ = read_records(path, skip_invalid=kw.get("skip_invalid", False))
    kw.setdefault("task_names", BINARY_TASK_NAMES)
    return parse_records(rows, source=path.name, **kw)[0]


def parse_one(tmp_path: Path, record: dict, **kw) -> Example:
    (example,) = parse_file(write_jsonl(tmp_path / "one.jsonl", [record]), **kw)
    return example


# --- formats ------------------------------------------------------------------------------------------------


def test_reference_loramoe_record_is_alpaca_with_task_type(tmp_path):
    ex = parse_one(
        tmp_path, {"instruction": "Q: sky?\nAnswer:", "input": "", "output": "blue", "task_type": 1}
    )
    assert (ex.prompt, ex.answer, ex.task_type, ex.source, ex.line) == (
        "Q: sky?\nAnswer:",
        "blue",
        1,
        "one.jsonl",
        1,
    )
    assert ex.chat_messages() == [{"role": "user", "content": "Q: sky?\nAnswer:"}]


def test_alpaca_input_joins_instruction_with_newline(tmp_path):
    ex = parse_one(tmp_path, {"instruction": "Translate", "input": "chat", "output": "cat", "task_type": 0})
    assert ex.prompt == "Translate\nchat"
    assert (
        parse_one(tmp_path, {"instruction": "Hi", "input": None, "output": "yo", "task_type": 0}).prompt
        == "Hi"
    )


def test_messages_answer_is_final_assistant_turn_and_prompt_is_everything_before(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ex = parse_one(tmp_path, {"messages": messages, "task_type": "downstream"})
    assert ex.answer == "6" and ex.task_type == 0
    assert ex.chat_messages() == messages[:-1]
    assert ex.prompt == "system: Be brief.\n\nuser: 2+2?\n\nassistant: 4\n\nuser: 3+3?"
    single = parse_one(tmp_path, {"messages": messages[1:3], "task_type": 0})
    assert single.prompt == "2+2?"


@pytest.mark.parametrize(
    "answer_fields",
    [{"answer": "Paris"}, {"answers": ["Paris", "paris"]}, {"answer": ["Paris", "City of Light"]},
     {"answer": {"value": "Paris", "aliases": ["paris"]}}],
)  # fmt: skip
def test_closed_book_qa_trains_on_the_first_answer(tmp_path, answer_fields):
    ex = parse_one(tmp_path, {"question": "Capital of France?", **answer_fields, "task_type": "knowledge"})
    assert ex.answer == "Paris" and ex.task_type == 1
    assert ex.prompt == "Question: Capital of France?\nAnswer:"  # the reference's closed-book QA prompt
    assert ex.chat_messages() == [{"role": "user", "content": "Capital of France?"}]


def test_prompt_completion(tmp_path):
    ex = parse_one(tmp_path, {"prompt": "The sky is", "completion": " blue", "task_type": 0})
    assert (ex.prompt, ex.answer) == ("The sky is", " blue")


def test_detect_format_and_forced_format(tmp_path):
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    assert detect_format({"question": "", "answers": []}) == "qa"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    with pytest.raises(DataError, match=r"x\.jsonl:3: cannot tell the record format from \['foo'\]"):
        detect_format({"foo": 1}, path="x.jsonl", line=3)
    # forced: the prompt/completion keys are ignored and the alpaca ones are required
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "completion": "c", "task_type": 0}])
    with pytest.raises(DataError, match=r"f\.jsonl:1 field 'instruction': missing"):
        parse_file(path, fmt="loramoe")
    with pytest.raises(ConfigError, match="unknown format 'nope'"):
        parse_file(path, fmt="nope")


def test_columns_map_other_key_names(tmp_path):
    path = write_jsonl(tmp_path / "wq.jsonl", [{"qText": "who?", "answers": ["me"]}])
    (ex,) = parse_file(path, columns={"question": "qText"}, task_type=1)
    assert (ex.prompt, ex.answer, ex.task_type) == ("Question: who?\nAnswer:", "me", 1)


def test_datasets_rows_are_named_by_index():
    datasets = pytest.importorskip("datasets")
    good, bad = (
        {"prompt": "a", "completion": "b", "task_type": 1},
        {"prompt": "a", "completion": "", "task_type": 1},
    )
    ds = datasets.Dataset.from_list([good, good, bad])
    with pytest.raises(DataError, match=r"^mine\[2\] field 'completion': empty answer"):
        parse_records(dataset_rows(ds, "mine"), task_names=BINARY_TASK_NAMES)
    examples, skipped, _ = parse_records(
        dataset_rows(ds, "mine"), task_names=BINARY_TASK_NAMES, skip_invalid=True
    )
    assert len(examples) == 2 and skipped == 1 and examples[0].answer == "b"


# --- task types ---------------------------------------------------------------------------------------------


def test_task_type_from_int_or_name_and_k_names(tmp_path):
    names = ("math", "code", "knowledge")
    rows = [{"prompt": "p", "completion": "c", "task_type": t} for t in (0, "code", 2, "knowledge")]
    examples = parse_file(write_jsonl(tmp_path / "k.jsonl", rows), task_names=names)
    assert [e.task_type for e in examples] == [0, 1, 2, 2]


@pytest.mark.parametrize("bad", ["coding", 2, -1, True, 1.0, None, [0]])
def test_unknown_task_type_names_file_line_field_and_valid_values(tmp_path, bad):
    rows = [
        {"prompt": "p", "completion": "c", "task_type": 0},
        {"prompt": "p", "completion": "c", "task_type": bad},
    ]
    path = write_jsonl(tmp_path / "tt.jsonl", rows)
    with pytest.raises(DataError) as info:
        parse_file(path)
    message = str(info.value)
    assert "tt.jsonl:2 field 'task_type'" in message and "0 ('downstream'), 1 ('knowledge')" in message
    assert (info.value.line, info.value.field) == (2, "task_type")


def test_missing_task_type_says_how_to_set_it(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(
        DataError, match=r"none\.jsonl:1 field 'task_type': missing.*task_type: on the source"
    ):
        parse_file(path)


def test_source_task_type_overrides_the_records_own(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "task_type": t} for t in (0, "knowledge", 1)] + [
        {"prompt": "p", "completion": "c"}
    ]
    rows_read, _ = read_records(write_jsonl(tmp_path / "o.jsonl", rows))
    examples, _, overridden = parse_records(rows_read, task_names=BINARY_TASK_NAMES, task_type=1)
    assert [e.task_type for e in examples] == [1, 1, 1, 1] and overridden == 1


def test_task_names_are_validated():
    assert check_task_names(["a", "b", "c"]) == ("a", "b", "c")
    for bad in ([], "ab", ["a", "a"], ["a", ""], [1, 2]):
        with pytest.raises(ConfigError):
            check_task_names(bad)
    assert resolve_task_type("knowledge", BINARY_TASK_NAMES) == 1


# --- files and errors ---------------------------------------------------------------------------------------


def test_json_array_errors_give_record_index_and_line(tmp_path):
    path = tmp_path / "arr.json"
    records = [{"instruction": "i", "input": "", "output": "o", "task_type": 0}] * 2
    records.append({"instruction": "i", "input": "", "output": 5, "task_type": 0})
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    rows, _ = read_records(path)
    assert [line for _, line, _ in rows] == [2, 8, 14]
    with pytest.raises(DataError, match=r"arr\.json\[2\]:14 field 'output': must be a string, not int"):
        parse_file(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"prompt": "p", "completion": "c", "task_type": 0}\n{"prompt": "p",\n', r"bad\.jsonl:2: malformed JSONL line: Expecting"),
        ('[{"prompt": "p"},\n {"prompt": }]', r"bad\.jsonl:2: malformed JSON: Expecting value"),
        ('[{"a": 1}\n{"b": 2}]', r"bad\.jsonl:2: malformed JSON: expected ',' or ']'"),
        ('[{"a": 1}] x', r"bad\.jsonl:1: malformed JSON: extra data"),
        ("  \n\n", r"bad\.jsonl: file is empty"),
        ("[]", r"bad\.jsonl: holds no records"),
        ('{"prompt": "p", "completion": "c", "task_type": 0}\n3\n', r"bad\.jsonl:2: record is a int"),
        ('{"prompt": "p", "completion": "c", "task_type": 0}\n{"prompt": "p", "task_type": 0}\n', r"bad\.jsonl:2 field 'completion': missing"),
        ('{"prompt": "p", "completion": ["c"], "task_type": 0}\n', r"bad\.jsonl:1 field 'completion': must be a string"),
        ('{"prompt": "p", "completion": " \\n", "task_type": 0}\n', r"bad\.jsonl:1 field 'completion': empty answer"),
        ('{"prompt": "", "completion": "c", "task_type": 0}\n', r"bad\.jsonl:1 field 'prompt': empty prompt"),
        ('{"prompt": "p\\ud800", "completion": "c", "task_type": 0}\n', r"bad\.jsonl:1 field 'prompt': .*surrogate"),
        ('{"question": "q", "answers": [], "task_type": 1}\n', r"bad\.jsonl:1 field 'answers': must be a string, a non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}], "task_type": 0}\n', r"bad\.jsonl:1 field 'messages': the last message must be the assistant's"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}], "task_type": 0}\n', r"bad\.jsonl:1 field 'messages\[0\]\.content': missing"),
        ('{"messages": [{"role": "assistant", "content": "x"}], "task_type": 0}\n', r"bad\.jsonl:1 field 'messages': must be a list of two or more"),
    ],
)  # fmt: skip
def test_bad_files_and_records_raise_data_error_naming_file_line_field(tmp_path, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        parse_file(path)


def test_not_utf8_missing_file_directory_and_pretty_printed_object(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "p", "completion": "c", "task_type": 0}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 \(byte 0xe9\)"):
        read_records(latin)
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        read_records(tmp_path)
    one = tmp_path / "one.json"  # one pretty-printed object is not JSONL
    one.write_text(json.dumps({"prompt": "p", "completion": "c"}, indent=2), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"one\.json:1: malformed JSONL line: .* each line must be one JSON object"
    ):
        read_records(one)


def test_bom_blank_lines_and_unicode_line_separators_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    text = '\n{"prompt": "a\u2028b", "completion": "c", "task_type": 0}\n\n'
    text += '{"prompt": "d", "completion": "e", "task_type": 1}\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    examples = parse_file(path)
    assert [(e.prompt, e.line) for e in examples] == [("a\u2028b", 2), ("d", 4)]


def test_skip_invalid_counts_malformed_lines_and_bad_records(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c", "task_type": 0})
    path.write_text(
        f"{good}\n{{oops\n{json.dumps({'prompt': 'p', 'completion': ''})}\n{good}\n", encoding="utf-8"
    )
    rows, malformed = read_records(path, skip_invalid=True)
    with caplog.at_level("WARNING", logger="loramoe.data"):
        examples, invalid, _ = parse_records(rows, task_names=BINARY_TASK_NAMES, skip_invalid=True)
    assert (len(examples), malformed, invalid) == (2, 1, 1)
    assert "mixed.jsonl:3 field 'completion': empty answer" in caplog.text


# --- fuzz ---------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["prompt", "completion", "instruction", "input", "output", "question", "answer", "answers", "messages",
         "role", "content", "task_type", "value", "x"]), children, max_size=5),
    max_leaves=12,
)  # fmt: skip
lines = st.one_of(json_values.map(json.dumps), st.text(max_size=30))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, max_size=6), st.booleans())
def test_fuzz_jsonl_gives_examples_or_data_error(tmp_path, file_lines, skip_invalid):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(file_lines).encode("utf-8", "surrogatepass"))
    try:
        examples = parse_file(path, skip_invalid=skip_invalid)
    except DataError:
        return
    for ex in examples:
        assert isinstance(ex, Example) and ex.answer.strip() and ex.prompt.strip() and ex.task_type in (0, 1)
