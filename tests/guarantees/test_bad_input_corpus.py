"""Never crash on bad input: the bad-input corpus (``tests/bad_inputs``).

Every case, through the command line, ends in one line naming the file and what is wrong, exit code 2 and no
traceback; through the library, in its specific ``loramoe.errors`` type. The corpus's controls load and train, two
cases also run as real processes, and long samples are truncated and counted, not errors. Shared setup:
``reliability_helpers.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import loramoe.errors as errors
from loramoe.cli import main
from loramoe.cli.overrides import apply_overrides
from loramoe.errors import LoRAMoEError
from loramoe.files import load_yaml
from loramoe.models.trained import load_trained
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from reliability_helpers import CASES, CORPUS, Processes, case_argv, make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def processes(workspace):
    procs = Processes(workspace, workers=1)
    yield procs
    procs.close()


def _names(case: dict) -> str:
    """What the one-line error must name: the data file, config file, adapter folder or override."""
    if "names" in case:
        return case["names"]
    if case["id"].startswith("data/"):
        return case["id"].split("/", 1)[1]
    if "overrides" in case:
        return case["overrides"][0]
    return Path(case.get("config") or case["adapter"]).name


def _library_call(case: dict) -> None:
    if "config" in case:
        raw = apply_overrides(load_yaml(case["config"]), case.get("overrides", []))
        train(RunConfig.from_dict(raw))
    else:
        load_trained(case["adapter"], base=case.get("model"))


def test_corpus_is_large_and_every_case_names_a_loramoe_error():
    assert len(CASES) >= 200
    assert len({c["id"] for c in CASES}) == len(CASES)
    for c in CASES:
        cls = getattr(errors, c["error"])
        assert issubclass(cls, LoRAMoEError) and cls is not LoRAMoEError, c["id"]


def test_corpus_controls_load_and_train(workspace, processes, monkeypatch, capsys):
    """The corpus's good adapters load and its config template trains, so each case fails for its one defect.

    (``processes`` is requested here, by the first test, to start the background processes early.)"""
    monkeypatch.chdir(workspace)
    for adapter in ("good", "peft-good"):
        model, _ = load_trained(f"corpus/generated/adapters/{adapter}")
        assert not model.training
    load_trained("base")  # a full fine-tuning output is a model directory
    assert main(["train", "corpus/generated/configs/override-base.yaml"]) == 0
    assert main(["generate", "--adapter", "out", "--prompt", "hi", "--max-new-tokens", "2"]) == 0


def _param(case: dict):
    """A case whose ``known_bug`` is not fixed yet is expected to fail (reported; see the manifest)."""
    marks = [pytest.mark.xfail(reason=case["known_bug"], strict=False)] if "known_bug" in case else []
    return pytest.param(case, id=case["id"], marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_a_specific_error(case, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    shutil.rmtree(workspace / "out", ignore_errors=True)
    capsys.readouterr()
    assert main(case_argv(case)) == 2, f"{case['id']}: expected exit code 2"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("loramoe ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"loramoe {case_argv(case)[0]}: error: ")
    assert re.search(case["match"], line), f"{case['id']}: {line!r} does not match {case['match']!r}"
    assert _names(case) in line, f"{case['id']}: {line!r} does not name {_names(case)!r}"

    expected = getattr(errors, case["error"])
    with pytest.raises(LoRAMoEError) as info:
        _library_call(case)
    assert type(info.value) is expected, f"{case['id']}: {type(info.value).__name__}: {info.value}"
    assert re.search(case["match"], str(info.value)), str(info.value)


def test_real_processes_exit_2_with_one_line_and_no_traceback(workspace, processes):
    """``python -m loramoe train`` on a bad data file, and the entry point's ``main`` on a bad adapter."""
    adapter_case = next(c for c in CASES if "adapter" in c)
    runs = [
        (processes.cli_case, processes.cli),
        (adapter_case, processes.run(case_argv(adapter_case), workspace)),
    ]
    for case, proc in runs:
        assert proc.wait(timeout=1200) == 2, case["id"]  # generous: shared CI machines get very loaded
        stderr = proc.stderr_path.read_text()
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert [line for line in stderr.splitlines() if "error:" in line] == [last]
        assert re.search(case["match"], last), last


def test_long_samples_are_truncated_and_counted_not_errors(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    long = [{"instruction": "x" * 300, "output": "y", "task_type": 0}, {"instruction": "q", "output": "z" * 300,
            "task_type": 1}]  # fmt: skip
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    raw = yaml.safe_load((CORPUS / "generated/configs/override-base.yaml").read_text())
    raw["data"]["sources"] = [{"path": str(tmp_path / "long.jsonl")}]
    raw["training"]["output_dir"] = str(tmp_path / "out")
    metrics = train(RunConfig.from_dict(raw))
    assert metrics["data"]["prompt_truncated"] == 1 and metrics["data"]["answer_truncated"] == 1
