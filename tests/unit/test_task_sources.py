"""Evaluation data by pinned source: the manifest, downloading over real HTTP into the datasets cache with checksums,
the offline cache and the offline error, and every task reading the committed fixtures through lm-eval."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramoe.cli import main
from loramoe.errors import ConfigError, DataError
from loramoe.eval.tasks import DATA_DIR_ENV, TASKS, check_data, resolve_data_dir, sources, task_dir

datasets = pytest.importorskip("datasets")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
SST2 = ["loramoe_sst2"]


def test_the_manifest_covers_every_file_a_task_reads_with_a_pinned_url_and_checksum() -> None:
    for task, spec in TASKS.items():
        files = sources.files_for(spec.files)
        assert files, task
        for rel, (url, digest) in files.items():
            entry = sources.sources()[rel.split("/", 1)[0]]
            assert url.startswith("https://raw.githubusercontent.com/") and entry["commit"] in url
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert len(sources.files_for(["lama_trex_pararel/patterns"])) == 39  # a folder names every file under it


@pytest.fixture
def server() -> Iterator[str]:
    """A real HTTP server over the fixtures (the same layout the pinned URLs serve)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a, **k: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def pinned(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The manifest pointed at the local server (sha256 of the fixtures), a fresh datasets cache, no local dir."""
    manifest = {}
    for folder in ("sst2", "webquestions"):
        files = {
            p.relative_to(FIXTURES / folder).as_posix(): {
                "path": p.relative_to(FIXTURES / folder).as_posix(),
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for p in sorted((FIXTURES / folder).rglob("*"))
            if p.is_file()
        }
        manifest[folder] = {"repository": f"{server}{folder}", "commit": "0" * 40, "license": "test",
                            "url": f"{server}{folder}/", "files": files}  # fmt: skip
    monkeypatch.setattr(sources, "sources", lambda: manifest)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return manifest


def test_without_a_data_dir_the_files_download_into_the_datasets_cache_and_verify(pinned, tmp_path) -> None:
    root = resolve_data_dir(None, SST2)
    assert root == tmp_path / "datasets" / sources.VIEW_NAME
    assert (root / "sst2" / "dev.tsv").read_bytes() == (FIXTURES / "sst2" / "dev.tsv").read_bytes()
    assert (root / "sst2" / "dev.tsv").resolve().parent == tmp_path / "datasets" / "downloads"
    assert not (root / "webquestions").exists()  # only what the tasks read
    check_data(SST2, root)
    assert (task_dir(None, tmp_path / "tasks", SST2) / "loramoe_sst2.yaml").is_file()


def test_offline_a_cached_download_serves_and_a_missing_one_names_both_ways(pinned, server, capsys) -> None:
    resolve_data_dir(None, SST2)
    datasets.config.HF_HUB_OFFLINE = True  # restored by monkeypatch
    assert (resolve_data_dir(None, SST2) / "sst2" / "dev.tsv").is_file()
    with pytest.raises(ConfigError) as info:
        resolve_data_dir(None, ["loramoe_webq"])
    message = str(info.value)
    assert "--data-dir" in message and DATA_DIR_ENV in message and "HF_DATASETS_OFFLINE" in message
    assert f"webquestions/: {server}webquestions at commit 000000000000 (test)" in message
    assert main(["eval", "--tasks", "webq"]) == 2  # the command line: the same message, one line, exit code 2
    assert "no evaluation data" in capsys.readouterr().err


def test_a_file_whose_checksum_differs_is_refused_naming_the_url_and_not_kept(pinned, server) -> None:
    pinned["sst2"]["files"]["dev.tsv"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match=rf"{server}sst2/dev.tsv: SHA-256 \w+ differs from the pinned 0000"):
        resolve_data_dir(None, SST2)
    datasets.config.HF_HUB_OFFLINE = True
    with pytest.raises(ConfigError, match="no evaluation data"):  # the wrong file is not in the view
        resolve_data_dir(None, SST2)


def test_a_dead_source_is_a_data_error(pinned) -> None:
    pinned["sst2"]["url"] = "http://127.0.0.1:9/sst2/"  # the discard port: nothing listens
    with pytest.raises(DataError, match="downloading the evaluation data failed"):
        resolve_data_dir(None, SST2)


def test_every_task_reads_its_documents_from_the_committed_fixtures(tmp_path: Path) -> None:
    """The fixtures have the layout the loaders read: each task builds real documents through lm-eval."""
    from lm_eval.tasks import TaskManager, get_task_dict

    check_data(list(TASKS), FIXTURES)
    manager = TaskManager(include_path=str(task_dir(FIXTURES, tmp_path / "tasks")), include_defaults=False)
    tasks = get_task_dict(list(TASKS), manager)
    for name in TASKS:
        docs = list(tasks[name].test_docs())
        assert docs, name
        assert tasks[name].doc_to_text(docs[0]) is not None


def test_the_data_command_lays_out_a_data_directory_others_can_read(pinned, tmp_path, capsys) -> None:
    out = tmp_path / "my data"
    assert main(["data", "sst2", "--out", str(out)]) == 0
    assert f"data directory: {out}" in capsys.readouterr().out
    assert (out / "sst2" / "dev.tsv").read_bytes() == (FIXTURES / "sst2" / "dev.tsv").read_bytes()
    check_data(SST2, resolve_data_dir(out))
    assert main(["data", "--list"]) == 0
    assert "webquestions" in capsys.readouterr().out
    assert main(["data", "imagenet"]) == 2
    assert "unknown data set(s) ['imagenet']" in capsys.readouterr().err
