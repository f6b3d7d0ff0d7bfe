"""The command line: YAML and key=value overrides, one-line errors with exit code 2, and the subcommands on a tiny
model (run in-process: ``main(argv)`` is what the ``loramoe`` entry point calls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import loramoe.training.run_config
import loramoe.training.train
from loramoe.cli import main
from loramoe.cli.overrides import apply_overrides
from loramoe.errors import ConfigError, DataError
from loramoe.files import load_yaml

from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "base"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_config(tmp_path: Path, base: Path, **training) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w, "task_type": i % 2}) + "\n"
                            for i, w in enumerate(["hi", "bye", "yes", "no"])))  # fmt: skip
    config = {
        "model": str(base),
        "loramoe": {"num_experts": 2, "rank": 2},
        "data": {"sources": [str(data)], "max_length": 32},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                     "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, **training},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_then_generate_jsonl(base, tmp_path, capsys):
    config = write_config(tmp_path, base)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"adapter written to {tmp_path / 'out'}" in out and '"train_loss"' in out
    card = (tmp_path / "out" / "README.md").read_text()  # the trainer's data summary is on the model card
    assert "| training examples | 4 (downstream 2, knowledge 2) |" in card
    argv = ["generate", "--adapter", str(tmp_path / "out"), "--prompt", "Say hi.", "--prompt", "Say no."]
    assert main([*argv, "--jsonl", "--max-new-tokens", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["Say hi.", "Say no."]
    assert all(isinstance(line["output"], str) for line in lines)


def test_info_prints_the_adapted_layers(base, capsys):
    assert main(["info", "--model", str(base), "--num-experts", "2", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "down_proj" in out and "trainable" in out.lower()


def test_help_lists_config_keys_from_the_field_docs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "loramoe.num_experts: N, LoRA experts" in out and "lora.rank:" in out and "--resume" in out


def test_building_the_parser_imports_neither_the_trainer_nor_peft():
    """Every subcommand (serve, generate, chat) builds the whole parser first: it must stay light."""
    code = (
        "import sys, loramoe.cli; loramoe.cli.build_parser(); "
        "print(sorted(m for m in ('peft', 'transformers.trainer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_overrides_set_nested_values_parsed_as_yaml():
    config = {
        "training": {"learning_rate": 1.0},
        "data": {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]},
    }
    apply_overrides(config, ["training.learning_rate=1e-4", "training.bf16=true", "loramoe.task_names=[a, b]",
                             "data.sources.1.task_type=1", "model=", "training.run_name=x=y"])  # fmt: skip
    assert config["training"] == {"learning_rate": 1e-4, "bf16": True, "run_name": "x=y"}
    assert config["loramoe"] == {"task_names": ["a", "b"]}
    assert config["data"]["sources"][1] == {"path": "b.jsonl", "task_type": 1}
    assert config["model"] == ""


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("training.learning_rate", "must look like key=value"),
        ("=1", "must look like key=value"),
        ("model.name=x", "'model' is not a section"),
        ("data.sources.2.path=x", "'2' is not an index of a list of 1 items"),
        ("data.sources.first.path=x", "'first' is not an index"),
        (
            "data.sources.0.task_type=1",
            "item 0 is 'a.jsonl', not a section",
        ),  # a source given as a plain path
    ],
)
def test_bad_overrides_are_config_errors(override, match):
    config = {"model": "m", "data": {"sources": ["a.jsonl"]}}
    with pytest.raises(ConfigError, match=match):
        apply_overrides(config, [override])


def test_load_yaml_reads_exponents_as_floats_and_names_the_line_of_a_syntax_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  save_strategy: no\n")
    assert load_yaml(path) == {"training": {"learning_rate": 1e-4, "save_strategy": False}}
    path.write_text("model: base\n  method: lora\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: invalid YAML"):
        load_yaml(path)


def test_unquoted_no_for_a_save_strategy_means_no(base, tmp_path):
    config = write_config(tmp_path, base)
    raw = apply_overrides(load_yaml(config), ["training.save_strategy=no"])
    assert loramoe.training.run_config.RunConfig.from_dict(raw).training_arguments().save_strategy == "no"


def test_a_library_error_is_one_line_on_stderr_and_exit_2(base, tmp_path, capsys, monkeypatch):
    def fail(run, resume=False):
        raise DataError("bad record\nsecond line", path="x.jsonl", line=3, field="output")

    monkeypatch.setattr(loramoe.training.train, "train", fail)
    assert main(["train", str(write_config(tmp_path, base))]) == 2
    captured = capsys.readouterr()
    assert captured.err == "loramoe train: error: x.jsonl:3 field 'output': bad record second line\n"
    assert captured.out == ""


def test_verbose_shows_the_traceback_instead(base, tmp_path, monkeypatch):
    def fail(run, resume=False):
        raise DataError("bad record")

    monkeypatch.setattr(loramoe.training.train, "train", fail)
    with pytest.raises(DataError, match="bad record"):
        main(["-v", "train", str(write_config(tmp_path, base))])


def test_ctrl_c_exits_130_without_a_traceback(base, tmp_path, capsys, monkeypatch):
    def interrupted(run, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(loramoe.training.train, "train", interrupted)
    assert main(["train", str(write_config(tmp_path, base))]) == 130
    assert capsys.readouterr().err == "loramoe train: interrupted\n"


def test_a_config_error_names_the_config_file(base, tmp_path, capsys):
    config = write_config(tmp_path, base)
    assert main(["train", str(config), "loramoe.num_experts=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loramoe train: error: {config}: loramoe: num_experts=3 is odd")
    assert err.count("\n") == 1


def test_resume_flag_reaches_train(base, tmp_path, monkeypatch):
    seen = {}

    def fake(run, resume=False):
        seen["resume"] = resume
        return {"train_loss": 0.0}

    monkeypatch.setattr(loramoe.training.train, "train", fake)
    assert main(["train", str(write_config(tmp_path, base)), "--resume"]) == 0
    assert seen == {"resume": True}
