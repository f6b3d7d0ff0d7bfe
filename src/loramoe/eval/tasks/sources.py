"""Where each evaluation file comes from: a pinned URL and its SHA-256, and fetching it through ``datasets``.

``sources.json`` (beside this module) names, for every data folder the tasks read, the public repository, the
commit the files are pinned to, their license and, per file, its path in that repository, size and SHA-256. That is
the lm-evaluation-harness way of naming a source (a URL with a checksum), so the project carries no data.

Design decisions:

- The data directory keeps one layout (``<folder>/<file>`` as listed in ``sources.json``) whatever serves it: a
  local folder (``--data-dir`` / ``$LORAMOE_DATA_DIR``), or the download view built here. Downstream code (the
  task YAMLs, ``utils.load_rome`` / ``load_lama``) never knows which.
- Downloads go through ``datasets.DownloadManager`` into the ``datasets`` cache (``$HF_DATASETS_CACHE/downloads``),
  where any other Hugging Face tool finds them; each file is checked against its SHA-256 before it is used, and a
  mismatch is an error naming the URL, never a silently different evaluation.
- The view (``$HF_DATASETS_CACHE/loramoe_eval_data/<folder>/<file>``) links to the cached downloads, so a later
  offline run (``HF_DATASETS_OFFLINE=1``) finds them without a request; its files are re-checked on every use.
- Only the files the requested tasks read are fetched.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from loramoe.errors import ConfigError, DataError
from loramoe.files import sha256_file

VIEW_NAME = "loramoe_eval_data"
_MANIFEST = Path(__file__).resolve().parent / "sources.json"


@functools.cache
def sources() -> dict[str, dict]:
    """``sources.json``: folder -> ``{repository, commit, license, url, files: {name: {path, bytes, sha256}}}``."""
    return json.loads(_MANIFEST.read_text(encoding="utf-8"))


def files_for(needed: Iterable[str]) -> dict[str, tuple[str, str]]:
    """The files under the relative paths ``needed`` (a file, or a folder such as ``lama_trex_pararel/patterns``).

    Returns:
        ``{"<folder>/<file>": (url, sha256)}``, in manifest order.
    """
    out: dict[str, tuple[str, str]] = {}
    for rel in needed:
        folder, _, rest = rel.partition("/")
        entry = sources().get(folder)
        if entry is None:
            raise ConfigError(f"no known source for {rel!r}; give a data directory that holds it")
        for name, meta in entry["files"].items():
            if not rest or name == rest or name.startswith(rest.rstrip("/") + "/"):
                out[f"{folder}/{name}"] = (entry["url"] + meta["path"], meta["sha256"])
    return out


def describe(needed: Iterable[str]) -> str:
    """The source folders the paths ``needed`` come from, ``; ``-separated: repository, commit, license."""
    folders = dict.fromkeys(rel.split("/", 1)[0] for rel in needed)
    lines = []
    for folder in folders:
        entry = sources().get(folder)
        if entry is not None:
            lines.append(
                f"{folder}/: {entry['repository']} at commit {entry['commit'][:12]} ({entry['license']})"
            )
    return "; ".join(lines)


def view_dir() -> Path:
    """Where fetched files are laid out as a data directory: ``$HF_DATASETS_CACHE/loramoe_eval_data``."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / VIEW_NAME


def offline() -> bool:
    """Whether ``datasets`` may not download (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)  # datasets folds HF_DATASETS_OFFLINE into it


def cached(needed: Iterable[str]) -> Path | None:
    """The view directory when it already holds every file of ``needed`` with its checksum, else None."""
    root = view_dir()
    for rel, (_url, digest) in files_for(needed).items():
        path = root / rel
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return root


def fetch(needed: Iterable[str], root: str | os.PathLike[str] | None = None) -> Path:
    """Download the files of ``needed`` into the ``datasets`` cache, check them, and lay them out under ``root``.

    Args:
        needed: Relative paths: data folders (``"nq_open"``), their subfolders or files.
        root: The data directory to lay them out in (links to the cached downloads); default :func:`view_dir`.

    Returns:
        ``root``: a data directory holding ``<folder>/<file>`` for every file of ``needed``.

    Raises:
        ConfigError: Offline (the message says how to go online or where a local copy goes).
        DataError: a download failed, or a file's SHA-256 differs from the pinned one (the URL is named).
    """
    from datasets import DownloadConfig, DownloadManager

    wanted = files_for(needed)
    root = view_dir() if root is None else Path(root).expanduser().resolve()
    todo = {rel: url for rel, (url, digest) in wanted.items() if not _verified(root / rel, digest)}
    if not todo:
        return root
    if offline():
        raise ConfigError(
            f"{len(todo)} data file(s) are not downloaded yet and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set; "
            "unset them to download, or copy the data sets into a local data directory"
        )
    # The cache folder is read now, not at import: datasets fixes its default download folder when imported.
    config = DownloadConfig(cache_dir=str(view_dir().parent / "downloads"), disable_tqdm=True)
    manager = DownloadManager(download_config=config)
    try:
        paths = manager.download(todo)
    except (OSError, ConnectionError, FileNotFoundError) as err:  # datasets raises these for HTTP failures
        raise DataError(f"downloading the evaluation data failed ({err}); retry, or give --data-dir") from err
    for rel, cached_path in paths.items():
        got = sha256_file(cached_path)
        if got != wanted[rel][1]:
            # Set aside, not deleted: the cache must not hand the wrong file back, and it stays inspectable.
            os.replace(cached_path, f"{cached_path}.sha256-mismatch")
            raise DataError(
                f"{todo[rel]}: SHA-256 {got} differs from the pinned {wanted[rel][1]}; the source changed or the "
                f"download was damaged (it is kept as {cached_path}.sha256-mismatch). Retry, or give a data directory "
                "(--data-dir) holding the right file",
                path=rel,
            )
        _link(Path(cached_path), root / rel)
    return root


def _verified(path: Path, digest: str) -> bool:
    return path.is_file() and sha256_file(path) == digest


def _link(target: Path, link: Path) -> None:
    """Place ``link`` -> ``target`` atomically (a copy where the file system has no symbolic links)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(
        f".{link.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    )  # unique: nothing to clear first
    try:
        tmp.symlink_to(target.resolve())
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
