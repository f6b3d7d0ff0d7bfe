"""Never execute a loaded file: loading is data only. Pickles are refused without being unpickled, and no
``torch.load`` in ``src/`` goes without ``weights_only=True``. Shared setup: ``reliability_helpers.py``.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch

import loramoe.errors as errors
from loramoe.models.trained import load_trained

from reliability_helpers import CORPUS, REPO, make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory)


def test_pickle_adapters_are_refused_without_being_unpickled(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    marker = tmp_path / "pwned"
    folder = tmp_path / "adapter"
    shutil.copytree(CORPUS / "generated/adapters/good", folder)
    (folder / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(
        errors.AdapterError, match=r"refusing to load a pickle file \(unpickling can run arbitrary"
    ):
        load_trained(folder)
    assert not marker.exists()


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
