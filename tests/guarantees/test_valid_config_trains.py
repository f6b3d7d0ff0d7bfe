"""Guarantee 4 of docs/reliability.md: a config that validates does not fail once training starts.

A resume with a changed config names every changed field, the output directory is checked before the model is
loaded, and a prompt longer than the model's context is a config error. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loramoe.errors import ConfigError
from loramoe.models.base import load_base
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import cli_error, config, make_root, owned_run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


def test_resume_with_a_changed_config_names_every_changed_field(root, tmp_path, caplog):
    out = tmp_path / "run"
    owned_run(root, out)
    changed = config(root, out, max_steps=6)
    changed["method"] = "lora"
    changed["loramoe"]["rank"] = 4
    changed["data"]["max_length"] = 40
    with pytest.raises(ConfigError) as info:
        train(RunConfig.from_dict(changed), resume=True)
    message = str(info.value)
    for field in (
        "method: was 'loramoe', now 'lora'",
        "loramoe.rank: was 2, now 4",
        "data.max_length: was 48",
    ):
        assert field in message, message
    with caplog.at_level("WARNING", logger="loramoe.train"):  # more steps: a training setting may change
        train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert "training.max_steps changed: was 3, now 6" in caplog.text


def test_the_output_directory_is_checked_before_the_model_is_loaded(root, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr("loramoe.models.base.load_base", lambda *a, **k: loads.append(1))
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot be written|is a file|Not a directory"):
        train(RunConfig.from_dict(config(root, blocked / "out")))
    assert not loads


def test_a_prompt_longer_than_the_context_is_a_config_error(root, capsys):
    from loramoe.inference.generate import generate

    model, tok = load_base(str(root / "base"))
    with pytest.raises(
        ConfigError,
        match=r"prompt 1 is \d+ tokens; with max_new_tokens 8 that is more than the model's context \(128",
    ):
        generate(model, tok, ["hi", "word " * 200], max_new_tokens=8, progress=False)
    with pytest.raises(ConfigError, match=r"prompt 0 .*context"):
        generate(model, tok, ["hi"], max_new_tokens=500, progress=False)
    line = cli_error(
        capsys, ["generate", "--model", str(root / "base"), "--prompt", "hi", "--max-new-tokens", "999"]
    )
    assert "context (128 positions)" in line
