"""Guarantee 5 of docs/reliability.md: bounded parsing and reading.

A huge config or override is refused unread, FIFOs and devices are refused without reading, a huge record is cut
before it is tokenised with the same result, YAML and JSON parsing (fuzzed by hypothesis) raise only their
loramoe errors, and an absurd adapter is refused before allocating. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramoe.cli.overrides import apply_overrides
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, ConfigError, DataError
from loramoe.files import load_yaml
from loramoe.inject import adapted_modules, inject

from guarantees_helpers import make_root
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


def test_a_huge_config_or_override_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model: base\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: \d+ bytes, more than a config can be"):
        load_yaml(big)
    with pytest.raises(ConfigError, match=r"more than a config can be"):
        apply_overrides({}, ["model=" + "x" * (100 << 10)])


def _returns_within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a thread; fail if it is still blocked after ``seconds`` (a FIFO read never returns)."""
    result: list = []

    def run():
        try:
            call()
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked reading a non-regular file"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_refused_without_reading(root, tmp_path):
    from loramoe.data.records import read_records
    from loramoe.inference.prompts import read_prompts

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    for call, kind in [
        (lambda: read_records(fifo), DataError),
        (lambda: read_records("/dev/zero"), DataError),
        (lambda: load_yaml(fifo), ConfigError),
        (lambda: read_prompts(fifo), DataError),
        (lambda: apply_overrides({}, []) or load_yaml("/dev/zero"), ConfigError),
    ]:
        err = _returns_within(10, call)
        assert isinstance(err, kind) and re.search(
            r"(FIFO \(named pipe\)|character device), not a regular file", str(err)
        ), err


def test_a_huge_record_is_cut_before_it_is_tokenised_with_the_same_result(root):
    from loramoe.data.dataset import ExampleEncoder
    from loramoe.data.formats import Example

    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok, max_length=64, template="plain")
    calls = []
    original = tok.__class__.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text))
        return original(self, text, *args, **kwargs)

    # ~16k characters: cut, and still far more than 64 tokens
    words = " ".join(f"w{i % 97}" for i in range(3000))
    whole = ExampleEncoder(tok, max_length=10**6, template="plain").encode(Example(words, words, 0))[0]
    cut, how = encoder.encode(Example(words, words, 0))
    assert how == "answer"
    keep = 64 // 2  # the answer is cut, so the prompt keeps max_length // 2 tokens: its end
    prompt_ids = whole["input_ids"][: whole["labels"].count(-100)]
    assert cut["input_ids"][:keep] == prompt_ids[-keep:]
    answer_ids = whole["input_ids"][len(prompt_ids) :]
    assert cut["input_ids"][keep:] == answer_ids[: 64 - keep]
    try:
        tok.__class__.__call__ = counting
        encoder.encode(Example("p" * 50_000_000, "a" * 50_000_000, 0))  # 100 MB of text
    finally:
        tok.__class__.__call__ = original
    assert max(calls) <= 64 * 32 + 16  # never the whole record


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!<>,'\"#|? \n\t0123")), max_size=80)
    | st.text(max_size=40)
)
def test_yaml_parsing_raises_only_config_errors(text):
    from loramoe.files import parse_yaml

    with contextlib.suppress(ConfigError):
        parse_yaml(text, "f.yaml")


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=120)
    | st.text(alphabet=st.sampled_from(list('[]{}":,0123 NaInfty')), max_size=80).map(str.encode)
)
def test_json_reading_raises_only_the_given_error(tmp_path_factory, data):
    from loramoe.files import read_json

    path = tmp_path_factory.mktemp("json") / "x.json"
    path.write_bytes(data)
    with contextlib.suppress(AdapterError):
        read_json(path, error=AdapterError)


def test_an_absurd_adapter_is_refused_before_allocating():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"num_experts=1000000 .*more than 10x the base model's"):
        inject(model, LoRAMoEConfig(num_experts=1_000_000, rank=64))
    assert not adapted_modules(model)


LONG = "1" * 5000  # past Python's 4,300-digit limit on int(str), which would end in a bare ValueError


def test_an_integer_too_long_to_read_is_a_one_line_error_naming_where(tmp_path):
    from loramoe.data.records import read_records
    from loramoe.files import parse_yaml, read_json
    from loramoe.inference.prompts import read_prompts
    from loramoe.inject import experts_spec

    for text, line in [(f"a: 1\nb: {LONG}\n", 2), (f"a: [0x{LONG}]\n", 1), (f"a: 1{'_1' * 4999}\n", 1)]:
        with pytest.raises(ConfigError, match=rf"^f\.yaml:{line}: invalid YAML \(an integer of \d+ digits"):
            parse_yaml(text, "f.yaml")
    assert parse_yaml("a: -" + "9" * 100, "f.yaml") == {"a": -int("9" * 100)}  # the bound: 100 digits
    with pytest.raises(ConfigError, match=r"^override 'a=1111.*an integer of 5000 digits"):
        apply_overrides({}, [f"a={LONG}"])
    with pytest.raises(ConfigError, match=r"^override 'a\.1111.*an integer of 5000 digits"):
        apply_overrides({"a": [1]}, [f"a.{LONG}=2"])
    with pytest.raises(ConfigError, match=r"'²' is not an index"):  # str.isdigit() says yes, int() says no
        apply_overrides({"a": [1]}, ["a.²=2"])
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "x": {"y": [0, LONG]}}\n'.replace(
            "LONG", LONG
        )
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2 field 'x\.y\[1\]': an integer of 5000 digits"):
        read_records(data)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "n": LONG}\n'.replace("LONG", LONG))
    with pytest.raises(DataError, match=r"p\.jsonl:1 field 'n': an integer of 5000 digits"):
        read_prompts(prompts)
    doc = tmp_path / "c.json"
    doc.write_text('{"config": {"rank": LONG}}'.replace("LONG", LONG))
    with pytest.raises(AdapterError, match=r"c\.json field 'config\.rank': an integer of 5000 digits"):
        read_json(doc, error=AdapterError)
    with pytest.raises(ConfigError, match=r"LoRAMoE config field 'rank': an integer of 5000 digits"):
        LoRAMoEConfig.from_json('{"rank": LONG}'.replace("LONG", LONG))
    with pytest.raises(ConfigError, match=r"experts_off: an integer of 5000 digits"):
        experts_spec(f"0,{LONG}")
    with pytest.raises(ConfigError, match=r"rank must be an integer >= 1, got an int too long to print"):
        LoRAMoEConfig(rank=-(10**5000))


def test_long_integers_in_command_line_values_exit_2(root, capsys):
    from loramoe.cli.routing import parse_data_arg

    from guarantees_helpers import cli_error

    line = cli_error(capsys, ["compare", "a.json", "b.json", "--out", str(root / "cmp"), "--base", LONG])
    assert re.search(r"--base: an integer of 5000 digits", line), line
    with pytest.raises(ConfigError, match=r"--data 'x=d\.jsonl:1111.*an integer of 5000 digits"):
        parse_data_arg(f"x=d.jsonl:{LONG}", ["downstream", "knowledge"])


def test_a_key_given_twice_in_a_json_object_is_refused_naming_it(tmp_path):
    from loramoe.data.records import read_records
    from loramoe.files import read_json
    from loramoe.inference.prompts import read_prompts

    rows = tmp_path / "d.jsonl"
    rows.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "output": "c"}\n'
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2 field 'output': the key is given twice in one object"):
        read_records(rows)
    array = tmp_path / "d.json"
    array.write_text(
        '[\n{"instruction": "a", "output": "b"},\n{"messages": [{"role": "user", "role": "x"}]}\n]'
    )
    with pytest.raises(DataError, match=r"d\.json\[1\]:3 field 'role': the key is given twice"):
        read_records(array)
    # skip_invalid skips such a line like any malformed one
    assert (
        len(read_records(rows, skip_invalid=True)[0]) == 1 and read_records(rows, skip_invalid=True)[1] == 1
    )
    prompts = tmp_path / "p.json"
    prompts.write_text('[{"prompt": "a", "prompt": "b"}]')
    with pytest.raises(DataError, match=r"p\.json field 'prompt': the key is given twice"):
        read_prompts(prompts)
    doc = tmp_path / "adapter_config.json"
    doc.write_text('{"format": "loramoe", "config": {"alpha": 8, "alpha": 32}}')
    with pytest.raises(AdapterError, match=r"adapter_config\.json field 'alpha': the key is given twice"):
        read_json(doc, error=AdapterError)
    with pytest.raises(ConfigError, match=r"LoRAMoE config field 'rank': the key is given twice"):
        LoRAMoEConfig.from_json('{"rank": 2, "rank": 4}')


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=st.sampled_from(list('[]{}":,0123456789-e. aNI')), max_size=120))
def test_data_lines_raise_only_data_errors(tmp_path_factory, text):
    from loramoe.data.records import read_records

    path = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    path.write_text(text + "\n" + '{"a": %s}' % ("7" * (90 + len(text))))
    with contextlib.suppress(DataError):
        read_records(path)


def test_integer_flags_are_read_by_the_bounded_parser(capsys):
    """Every ``type=int`` flag of the command line: a 5,000-digit value is refused without converting it, and
    the error line shows the value cut short (argparse prints its usage, then one ``loramoe`` error line)."""
    import subprocess

    from loramoe.cli import main
    from loramoe.cli.overrides import int_flag

    assert int_flag(" 12 ") == 12 and int_flag("-3") == -3
    src = Path(__file__).resolve().parents[2] / "src" / "loramoe" / "cli"
    leftover = subprocess.run(["grep", "-rn", r"type=int\b", str(src)], capture_output=True, text=True).stdout
    assert not leftover, f"an integer flag not read by int_flag: {leftover}"
    for argv in (
        ["generate", "--prompt", "hi", "--max-new-tokens", LONG],
        ["serve", "--max-tokens", LONG],
        ["info", "--rank", "²"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loramoe ")]
        assert len(lines) == 1 and len(lines[0]) < 300, lines
        assert re.search(r"an integer of 5000 digits|not an integer: '²'", lines[0]), lines[0]
