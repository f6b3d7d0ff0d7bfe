"""Guarantee 2 of docs/reliability.md: never unpickle; one loading gate, safetensors only, for every weight file.

Pickle-format weights are refused wherever a loader reads weights (with only a pickle and an unrelated
safetensors file beside it), a pickle beside the safetensors is never opened, and the explicit ``--allow-pickle``
opt-in reads tensors only: a payload never runs. Shared setup: ``guarantees_helpers.py``.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from loramoe.adapter import WEIGHTS_NAME, save_adapter
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError, LoRAMoEError
from loramoe.inject import inject
from loramoe.models.base import load_base
from loramoe.models.trained import load_trained
from loramoe.training.run_config import RunConfig
from loramoe.training.train import train

from guarantees_helpers import cli_error, config, make_root, tree
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)


def full_output(folder: Path) -> None:
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def test_pickle_weights_are_refused_wherever_a_loader_reads_weights(root, tmp_path):
    """Each loader (loramoe adapter, PEFT adapter, full output, base model, a base named by an adapter, a base to
    train), with only a pickle (whose unpickling would create a file) and an unrelated safetensors file beside."""
    marker = tmp_path / "pwned"
    full = tmp_path / "full"
    full_output(full)
    (full / "model.safetensors").rename(full / "unrelated.safetensors")
    evil_pickle(full / "pytorch_model.bin", marker)
    adapter = tmp_path / "adapter"
    save_adapter(
        inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2)),
        adapter,
        base_name_or_path=str(full),
    )
    named = tmp_path / "names-a-pickle-base"
    shutil.copytree(adapter, named)
    (adapter / WEIGHTS_NAME).rename(adapter / "unrelated.safetensors")
    evil_pickle(adapter / "adapter_model.bin", marker)
    from peft import LoraConfig, get_peft_model

    peft = tmp_path / "peft"
    base = tiny_model("llama")
    get_peft_model(base, LoraConfig(r=2, target_modules=["up_proj"])).save_pretrained(peft)
    (peft / "adapter_model.safetensors").rename(peft / "unrelated.safetensors")
    evil_pickle(peft / "adapter_model.bin", marker)
    meta = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(
        json.dumps({**meta, "base_model_name_or_path": str(root / "base")})
    )

    refusal = r"pytorch_model\.bin|adapter_model\.bin"
    for call in (
        lambda: load_trained(full),
        lambda: load_trained(adapter),
        lambda: load_trained(peft),
        lambda: load_trained(named),
        lambda: load_base(str(full)),
        lambda: train(RunConfig.from_dict({**config(root, tmp_path / "out"), "model": str(full)})),
    ):
        with pytest.raises(
            LoRAMoEError, match=rf"({refusal}): refusing to load a pickle file \(unpickling can run"
        ):
            call()
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_opened(root, tmp_path):
    marker = tmp_path / "pwned"
    full = tmp_path / "full"
    full_output(full)
    evil_pickle(full / "pytorch_model.bin", marker)
    model, _ = load_trained(full)
    assert not marker.exists() and not model.training


def test_allow_pickle_reads_tensors_only(root, tmp_path, capsys):
    """The explicit opt-in reads pickle-format weights with torch.load(weights_only=True): real tensors load, a
    payload is still refused and never runs."""
    full = tmp_path / "full"
    full_output(full)
    state = tiny_model("llama").state_dict()
    (full / "model.safetensors").unlink()
    torch.save(state, full / "pytorch_model.bin")
    with pytest.raises(AdapterError, match="allow-pickle"):
        load_trained(full)
    model, _ = load_trained(full, allow_pickle=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    marker = tmp_path / "pwned"
    evil_pickle(full / "pytorch_model.bin", marker)
    with pytest.raises(LoRAMoEError):
        load_trained(full, allow_pickle=True)
    line = cli_error(capsys, ["generate", "--adapter", str(full), "--allow-pickle", "--prompt", "hi"])
    assert "full" in line
    assert not marker.exists()


REPO = Path(__file__).resolve().parents[2]


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name == "load"
                and isinstance(func, ast.Attribute)
                and getattr(func.value, "id", "") == "torch"
            ):
                yield node


def test_src_never_calls_torch_load_without_weights_only():
    sources = sorted((REPO / "src").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for call in _torch_load_calls(tree):
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            )
            assert safe, f"{path}:{call.lineno}: torch.load without weights_only=True"
        # no aliases or pickle-based loaders either
        assert not re.search(
            r"from torch import .*\bload\b|\bpickle\.loads?\(|\bdill\b|numpy\.load\(.*allow_pickle=True", text
        ), path


def test_a_pickle_in_a_checkpoints_optimizer_or_rng_state_is_refused_in_one_line(root, tmp_path, capsys):
    """The Trainer reads a checkpoint's optimizer and RNG state with ``weights_only=True``: a payload in either,
    even under a completion marker rewritten to match, never runs, and the resume stops with one line naming the
    file, exit code 2, the checkpoints untouched."""
    import yaml

    from loramoe.training.checkpoints import run_id_of
    from loramoe.training.completion import mark_complete

    out = tmp_path / "run"
    train(RunConfig.from_dict(config(root, out, max_steps=6)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, out, max_steps=9)))
    folder, marker = out / "checkpoint-6", tmp_path / "pwned"
    for name, damaged in (("optimizer.pt", False), ("rng_state.pth", False), ("optimizer.pt", True)):
        good = (folder / name).read_bytes()
        if damaged:  # not a payload: the archive cut short
            (folder / name).write_bytes(good[:200])
        else:
            torch.save({"state": Payload(marker)}, folder / name)
        mark_complete(folder, run_id_of(out))  # as an attacker would: the checksums match the payload
        before = {sub: tree(out / sub) for sub in ("checkpoint-3", "checkpoint-6")}
        line = cli_error(capsys, ["train", str(cfg), "--resume"])
        why = "it is truncated or damaged (" if damaged else "it asks to build "
        assert line.startswith(f"loramoe train: error: {folder / name}: refused on resume, {why}"), line
        assert "nothing in it ran" in line and "move that folder out of training.output_dir" in line, line
        assert not marker.exists()
        assert {sub: tree(out / sub) for sub in before} == before
        (folder / name).write_bytes(good)
        mark_complete(folder, run_id_of(out))
