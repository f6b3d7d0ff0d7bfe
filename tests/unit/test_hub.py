"""Adapters by Hugging Face Hub id: loaded from huggingface_hub's own cache layout with the network off, with the same
checks as a local folder, and clear errors for an id that is not there."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loramoe.cli import main
from loramoe.config import LoRAMoEConfig
from loramoe.errors import AdapterError
from loramoe.hub import is_hub_id
from loramoe.inject import adapted_modules, inject
from loramoe.models.trained import load_trained

from tiny import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 200, 33, 9, 64]])
REPO = "someone/tiny-loramoe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _trained(base_dir: Path) -> torch.nn.Module:
    model = tiny_model("llama")
    model.name_or_path = str(base_dir)  # recorded in the adapter: load_trained finds the base by it
    inject(model, LoRAMoEConfig(num_experts=2, rank=2))
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
            layer.loramoe_router.normal_(std=1.0)
    return model.eval()


def _cache_repo(hub_cache: Path, repo: str, adapter: Path, commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout: blobs named by content hash, a snapshot of symlinks, refs/main -> commit."""
    storage = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        data = (adapter / name).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tmp HF_HOME holding REPO in its hub cache, the network off; yields (model, snapshot folder)."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = _trained(base_dir)
    adapter = save_adapter(model, tmp_path / "saved")
    hub_cache = tmp_path / "hf_home" / "hub"
    snapshot = _cache_repo(hub_cache, REPO, adapter)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: point its constants at the same places.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    return model, snapshot


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_an_adapter_loads_by_hub_id_from_the_cache_offline(hub):
    model, _ = hub
    loaded = load_adapter(tiny_model("llama"), REPO)
    assert torch.equal(logits(loaded), logits(model))
    pinned = load_adapter(tiny_model("llama"), REPO, revision=COMMIT)
    assert torch.equal(logits(pinned), logits(model))


def test_load_trained_and_generate_take_a_hub_id(hub, capsys):
    model, _ = hub
    loaded, tokenizer = load_trained(REPO)  # the base comes from the adapter's record
    # The base is read back from disk by from_pretrained (its own attention kernel): float32 rounding only.
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    assert tokenizer is not None
    argv = ["generate", "--adapter", REPO, "--revision", "main", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--jsonl"]) == 0
    assert '"prompt": "hi"' in capsys.readouterr().out


def test_a_missing_hub_id_offline_names_the_id_the_cache_and_what_to_do(hub):
    with pytest.raises(AdapterError) as info:
        load_adapter(tiny_model("llama"), "someone/not-downloaded")
    message = str(info.value)
    assert "'someone/not-downloaded' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "hf download someone/not-downloaded" in message
    assert "no local directory 'someone/not-downloaded'" in message


def test_a_missing_revision_offline_is_an_adapter_error(hub):
    with pytest.raises(AdapterError, match="at revision 'v2' is not in the Hugging Face cache"):
        load_adapter(tiny_model("llama"), REPO, revision="v2")


def test_the_cli_reports_a_missing_hub_id_in_one_line_with_exit_code_2(hub, capsys):
    assert main(["generate", "--adapter", "someone/not-downloaded", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "someone/not-downloaded" in err and "Traceback" not in err


def test_a_tampered_cached_weight_file_fails_the_checksum_like_a_local_one(hub):
    _, snapshot = hub
    blob = (snapshot / WEIGHTS_NAME).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum does not match"):
        load_adapter(tiny_model("llama"), REPO)


def test_a_hub_snapshot_without_safetensors_weights_is_refused(hub):
    _, snapshot = hub
    (snapshot / WEIGHTS_NAME).unlink()
    with pytest.raises(
        AdapterError, match="has no adapter_model.safetensors; .*pickle weights are never downloaded"
    ):
        load_adapter(tiny_model("llama"), REPO)


def test_an_existing_directory_wins_over_the_hub_id_of_the_same_name(hub, tmp_path):
    local_model = _trained(tmp_path / "base")
    save_adapter(local_model, tmp_path / REPO)  # ./someone/tiny-loramoe, a different adapter
    assert not is_hub_id(REPO)
    loaded = load_adapter(tiny_model("llama"), REPO)
    assert torch.equal(logits(loaded), logits(local_model))
    shutil.rmtree(tmp_path / "someone")
    assert is_hub_id(REPO)


def test_what_reads_as_a_hub_id():
    assert is_hub_id("org/name") and is_hub_id("Org-1/name_2.v3")
    for not_an_id in ("name", "./org/name", "/abs/org/name", "a/b/c", "org/", "org/na..me", "org/x.git"):
        assert not is_hub_id(not_an_id), not_an_id


def test_a_revision_for_a_local_directory_is_refused(hub, tmp_path):
    with pytest.raises(AdapterError, match="revision 'main' applies to a Hub repository id"):
        load_adapter(tiny_model("llama"), tmp_path / "saved", revision="main")
