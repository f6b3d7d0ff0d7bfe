"""Guarantee 1 of docs/reliability.md: loramoe deletes or overwrites only what it wrote, and rotates checkpoints
only after the new one verifies.

A directory loramoe did not write is refused and left intact, a foreign checkpoint inside a loramoe run is never
deleted, a kill at a chosen moment (before a checkpoint's marker, mid-create, mid-remove) is finished on resume,
an earlier loramoe's output resumes from its verified checkpoints; in ``src/``, deletion happens only in the
guarded places and no message recommends destroying data. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

import loramoe.training.trainer as trainer_module
from loramoe.errors import ConfigError
from loramoe.training.checkpoints import OWNER_MARKER, latest_good_checkpoint
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import cli_error, config, make_root, owned_run, tree

SRC = Path(__file__).resolve().parents[2] / "src" / "loramoe"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


def foreign_project(folder: Path) -> None:
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("another project's results\n")


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_loramoe_did_not_write_is_refused_and_left_intact(root, tmp_path, capsys, resume):
    out = tmp_path / "theirs"
    foreign_project(out)
    before = tree(out)
    with pytest.raises(
        ConfigError, match=r"holds files loramoe did not write \(checkpoint-500, notes\.txt\)"
    ):
        train(RunConfig.from_dict(config(root, out)), resume=resume)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, out)))
    line = cli_error(capsys, ["train", str(cfg), *(["--resume"] if resume else [])])
    assert "did not write" in line and not re.search(r"\bdelete\b|--resume", line), line
    assert tree(out) == before


def test_a_foreign_checkpoint_inside_a_loramoe_run_is_never_deleted(root, tmp_path, capsys):
    out = tmp_path / "ours"
    owned_run(root, out)
    assert (out / OWNER_MARKER).is_file() and (out / "checkpoint-3" / OWNER_MARKER).is_file()
    foreign = out / "checkpoint-9"  # newer than ours, no marker: a resume used to remove it as "torn"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(os.urandom(128))
    impostor = out / "checkpoint-6"  # a marker naming another run
    impostor.mkdir()
    (impostor / OWNER_MARKER).write_text(json.dumps({"run_id": "someone-else"}))
    before = tree(out)
    for resume in (True, False):
        with pytest.raises(ConfigError, match=r"checkpoint-9: not written by this loramoe run.*Move it out"):
            train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=resume)
    assert tree(out) == before
    shutil.rmtree(foreign)  # the user moves it away; the impostor is still not ours
    with pytest.raises(ConfigError, match=r"checkpoint-6: not written by this loramoe run"):
        train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert (impostor / OWNER_MARKER).is_file()


def test_a_copied_marker_or_run_config_does_not_make_a_folder_loramoe_s(root, tmp_path, capsys):
    """The owner marker names the inode of the directory it was written in: copied into a user's folder (with the
    run config), it proves nothing there, and the folder is refused untouched. A whole run copied elsewhere still
    resumes: its complete checkpoints prove the run, and the claim records the new inode."""
    run = tmp_path / "run"
    owned_run(root, run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (mine / "README.md").write_text("my own adapter\n")
    shutil.copy(run / "loramoe_run.json", mine)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump(config(root, mine)))
    for copied in ("loramoe_run.json", OWNER_MARKER):
        shutil.copy(run / copied, mine)
        before = tree(mine)
        for resume in (False, True):
            with pytest.raises(
                ConfigError, match=r"holds files loramoe did not write \(README\.md, adapter_model"
            ):
                train(RunConfig.from_dict(config(root, mine)), resume=resume)
            line = cli_error(capsys, ["train", str(cfg), *(["--resume"] if resume else [])])
            assert "did not write" in line and (copied != OWNER_MARKER or "proves nothing here" in line), line
        assert tree(mine) == before
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    train(RunConfig.from_dict(config(root, copy, max_steps=6)), resume=True)
    assert latest_good_checkpoint(copy) == str(copy / "checkpoint-6")
    marker, original = (json.loads((d / OWNER_MARKER).read_text()) for d in (copy, run))
    assert marker["run_id"] == original["run_id"] and marker["directory"] != original["directory"]


def test_an_edited_checkpoint_is_never_deleted(root, tmp_path, caplog):
    """JSON files are checksummed by content: re-indented, a checkpoint still verifies and is resumed from. One
    whose content changed after it was complete fails verification and is set aside, every byte kept, never
    removed; the run resumes from the one before it and writes that step again."""
    from loramoe.training.completion import COMPLETE_MARKER, checkpoint_is_complete

    out = tmp_path / "run"
    owned_run(root, out, max_steps=6)
    for path in (out / "checkpoint-6").glob("*.json"):
        if path.name != COMPLETE_MARKER:
            path.write_text(json.dumps(json.loads(path.read_text()), indent=7, sort_keys=True))
    with caplog.at_level("INFO", logger="loramoe.train"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert f"resuming from {out / 'checkpoint-6'}" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]
    # an earlier loramoe checksummed JSON files byte for byte: its markers still verify
    marker = out / "checkpoint-3" / COMPLETE_MARKER
    body = json.loads(marker.read_text())
    body["files"] = {
        name: hashlib.sha256((out / "checkpoint-3" / name).read_bytes()).hexdigest() for name in body["files"]
    }
    marker.write_text(json.dumps(body))
    assert checkpoint_is_complete(out / "checkpoint-3")

    state = out / "checkpoint-9" / "trainer_state.json"
    edited = json.loads(state.read_text())
    edited["global_step"] = 8  # a changed value, not only layout
    state.write_text(json.dumps(edited, indent=2))
    before = tree(out / "checkpoint-9")
    caplog.clear()
    with caplog.at_level("INFO", logger="loramoe.train"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    aside = out / "checkpoint-9.failed-verification"
    assert tree(aside) == before  # set aside, untouched
    assert "trainer_state.json differs from the checksum" in caplog.text and str(aside) in caplog.text
    assert f"resuming from {out / 'checkpoint-6'}" in caplog.text and "removing" not in caplog.text
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")  # written again


def test_a_finished_checkpoint_whose_completion_marker_was_deleted_is_set_aside_not_removed(
    root, tmp_path, caplog
):
    """Only a folder still holding the saving marker it was created with is an interrupted save, which a resume
    removes; a finished checkpoint that lost its completion marker afterwards looks the same otherwise, and is
    kept whole under another name."""
    from loramoe.training.completion import COMPLETE_MARKER, SAVING_MARKER

    out = tmp_path / "run"
    owned_run(root, out, max_steps=6)
    assert not list(out.glob(f"checkpoint-*/{SAVING_MARKER}"))  # gone once each save finished
    (out / "checkpoint-6" / COMPLETE_MARKER).unlink()
    before = tree(out / "checkpoint-6")
    with caplog.at_level("INFO", logger="loramoe.train"):
        assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
        train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    aside = out / "checkpoint-6.failed-verification"
    assert tree(aside) == before
    assert f"no {COMPLETE_MARKER}, though its save was not interrupted" in caplog.text
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text and "removing" not in caplog.text
    assert latest_good_checkpoint(out) == str(out / "checkpoint-6")  # written again


class Killed(BaseException):
    """Stands for SIGKILL at one chosen moment: nothing after it runs, no handler catches it."""


def test_rotation_waits_for_the_new_checkpoint_to_verify(root, tmp_path, monkeypatch, caplog):
    """save_total_limit=1 and a crash after checkpoint-6 is written but before its marker: checkpoint-3, the last
    good one, is still there, and the resumed run continues from step 3, not from step 0."""
    out = tmp_path / "run"
    real = trainer_module.mark_complete

    def crash_at_6(folder, run_id=None):
        if folder.name == "checkpoint-6":
            raise Killed
        real(folder, run_id)

    monkeypatch.setattr(trainer_module, "mark_complete", crash_at_6)
    with pytest.raises(Killed):
        owned_run(root, out, max_steps=9, save_total_limit=1)
    assert latest_good_checkpoint(out) == str(out / "checkpoint-3")
    monkeypatch.setattr(trainer_module, "mark_complete", real)
    with caplog.at_level("INFO", logger="loramoe.train"):
        train(RunConfig.from_dict(config(root, out, max_steps=9, save_total_limit=1)), resume=True)
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text  # continued, not restarted from step 0
    assert "removing" in caplog.text and "checkpoint-6" in caplog.text  # its own torn one, replaced
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-9"]  # rotated once verified


def test_what_a_kill_leaves_mid_create_or_mid_remove_is_finished_on_resume(root, tmp_path):
    """Checkpoint folders are created and removed under hidden names holding the run id (then renamed), so a kill
    at any moment leaves either nothing or such a hidden folder, never a marker-less checkpoint-N; the next run
    finishes them. A claim killed half way (the owner marker's temporary file) does not make the directory foreign."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{OWNER_MARKER}.x1y2.tmp").write_text("{")  # killed while claiming
    owned_run(root, out)
    run_id = json.loads((out / OWNER_MARKER).read_text())["run_id"]
    creating = out / f".checkpoint-6.new-{run_id}"  # killed before the rename into checkpoint-6
    creating.mkdir()
    removing = out / f".checkpoint-3.removing-{run_id}"  # killed in the middle of a removal
    removing.mkdir()
    (removing / "optimizer.pt").write_bytes(b"half")
    train(RunConfig.from_dict(config(root, out, max_steps=6)), resume=True)
    assert not creating.exists() and not removing.exists()
    assert latest_good_checkpoint(out) == str(out / "checkpoint-6")


def test_an_output_directory_of_an_earlier_loramoe_resumes_from_its_verified_checkpoints(root, tmp_path):
    """Written before owner markers: its complete checkpoints (loramoe's own completion marker verifies) are found
    and resumed from; a torn one without markers cannot be proven to be loramoe's and is refused, not removed."""
    from loramoe.training.completion import mark_complete

    out = tmp_path / "old"
    owned_run(root, out, max_steps=6)
    (out / OWNER_MARKER).unlink()
    for folder in out.glob("checkpoint-*"):
        (folder / OWNER_MARKER).unlink()
        mark_complete(folder)  # as an earlier loramoe wrote it: no run id
    assert latest_good_checkpoint(out) == str(out / "checkpoint-6")
    torn = out / "checkpoint-9"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.raises(ConfigError, match=r"checkpoint-9: not written by this loramoe run"):
        train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert torn.is_dir()
    shutil.rmtree(torn)  # the user moves it away
    train(RunConfig.from_dict(config(root, out, max_steps=9)), resume=True)
    assert latest_good_checkpoint(out) == str(out / "checkpoint-9")


def _deleting_calls(tree_: ast.AST):
    """The enclosing function of every call that deletes a file or folder (``shutil.rmtree``, ``os.remove``,
    ``os.unlink``, ``os.rmdir``, ``Path.unlink``/``rmdir``) in a module."""
    for fn in ast.walk(tree_):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
                    if name in ("rmtree", "unlink", "rmdir", "removedirs") or (
                        name == "remove" and owner == "os"
                    ):
                        yield fn.name


# Where loramoe deletes, and what: this run's checkpoints (after checking ownership), its own temporary files.
ALLOWED_DELETIONS = {
    ("checkpoints.py", "_remove_owned"),  # a checkpoint this run proved is its own, right before
    ("checkpoints.py", "_sweep_leftovers"),  # its own hidden folders a kill left, named by its run id
    ("checkpoints.py", "claim_output_dir"),  # the probe file it just wrote
    ("files.py", "atomic_path"),  # its own temporary file, when a write fails
    ("completion.py", "mark_complete"),  # a checkpoint's saving marker, once the checkpoint is complete
}


def test_deletion_happens_only_in_the_guarded_places():
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        for function in _deleting_calls(ast.parse(path.read_text(encoding="utf-8"))):
            found.add((path.name, function))
    conversion = {f for f in found if f[1] == "_ensure_converted"}  # its own temporary conversion folders
    assert found - conversion <= ALLOWED_DELETIONS, found - conversion - ALLOWED_DELETIONS
    assert ("checkpoints.py", "_remove_owned") in found


def test_no_message_recommends_destroying_data():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"\b(delete|remove|rm -rf|erase|wipe) (it|them|the folder|the directory)\b",
                                     node.value, re.I), f"{path.name}: {node.value!r}"  # fmt: skip
