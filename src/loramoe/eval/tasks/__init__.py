"""lm-eval tasks for LoRAMoE: world-knowledge probes (closed-book QA, cloze facts) and downstream tasks.

The YAMLs in this folder are templates: their data paths read ``@DATA_DIR@``. :func:`task_dir` writes a copy with
the data directory filled in (plus a ``utils.py`` shim) and returns the folder to give lm-eval as
``include_path``. Data is read in place, never copied.

Design decisions:

- :data:`TASKS` is the one table of task name -> suite, primary metric, default ``limit`` and data files; the
  YAMLs carry the prompts and the scoring hooks. A test checks the two agree.
- Each task has its own default ``limit`` so a CPU run of every suite stays at minutes, not hours.
- The data directory comes from the caller (``--data-dir``), then ``$LORAMOE_DATA_DIR``; with neither, the files
  the tasks read are downloaded from their pinned sources (``sources.json``: a URL and a SHA-256 per file) into the
  ``datasets`` cache, or found there when offline (:mod:`loramoe.eval.tasks.sources`). The project carries no data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loramoe.errors import ConfigError, DataError
from loramoe.eval.tasks import sources
from loramoe.files import atomic_write_text

__all__ = [
    "DATA_DIR_ENV",
    "SUITES",
    "TASKS",
    "TaskSpec",
    "check_data",
    "expand_tasks",
    "resolve_data_dir",
    "task_dir",
]

DATA_DIR_ENV = "LORAMOE_DATA_DIR"
_PLACEHOLDER = "@DATA_DIR@"
_TEMPLATE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TaskSpec:
    """What the evaluation code needs to know about one task without loading it.

    Attributes:
        suite: ``"knowledge"`` (retention is measured on these) or ``"downstream"``.
        metric: The primary metric, the one reports and comparisons show.
        limit: Default number of documents per run on CPU.
        generative: True for ``generate_until`` tasks (``max_new_tokens`` applies to them).
        files: Paths relative to the data directory that must exist.
    """

    suite: str
    metric: str
    limit: int
    generative: bool
    files: tuple[str, ...]


_LAMA_FILES = ("lama_trex_pararel/patterns", "lama_trex_pararel/trex_lms_vocab")
_ROME_FILES = ("rome_known_1000/known_1000.json", "lama_trex_pararel/trex_lms_vocab")

TASKS: dict[str, TaskSpec] = {
    "loramoe_webq": TaskSpec("knowledge", "contains", 100, True, ("webquestions/test.json",)),
    "loramoe_trec": TaskSpec("knowledge", "regex", 100, True, ("trec_factoid_curated/curated-test.tsv",)),
    "loramoe_nq": TaskSpec(
        "knowledge", "contains", 100, True, ("nq_open/NQ-open.efficientqa.dev.1.1.jsonl",)
    ),
    "loramoe_rome_gen": TaskSpec("knowledge", "contains", 100, True, _ROME_FILES),
    "loramoe_rome_rank": TaskSpec("knowledge", "acc", 100, False, _ROME_FILES),
    "loramoe_lama_gen": TaskSpec("knowledge", "contains", 100, True, _LAMA_FILES),
    "loramoe_lama_rank": TaskSpec("knowledge", "acc", 100, False, _LAMA_FILES),
    "loramoe_sst2": TaskSpec("downstream", "acc", 200, False, ("sst2/dev.tsv",)),
    "loramoe_rte": TaskSpec("downstream", "acc", 200, False, ("rte/dev.tsv",)),
    "loramoe_boolq": TaskSpec("downstream", "acc", 200, False, ("boolq/dev.jsonl",)),
    "loramoe_agnews": TaskSpec("downstream", "acc", 200, False, ("ag_news/test.tsv",)),
    "loramoe_xsum": TaskSpec("downstream", "rougeL", 50, True, ("xsum_1k/test.jsonl",)),
}

SUITES: dict[str, list[str]] = {
    "knowledge": [name for name, spec in TASKS.items() if spec.suite == "knowledge"],
    "downstream": [name for name, spec in TASKS.items() if spec.suite == "downstream"],
    "all": list(TASKS),
}


def expand_tasks(names: Iterable[str]) -> list[str]:
    """Expand suite names and short task names into full task names, in order, without duplicates.

    Args:
        names: Suite names (``"knowledge"``, ``"downstream"``, ``"all"``) or task names with or without the
            ``loramoe_`` prefix (``"webq"`` or ``"loramoe_webq"``).

    Returns:
        Full task names, keys of :data:`TASKS`.

    Raises:
        ConfigError: If a name is neither a suite nor a task; the message lists both.
    """
    out: list[str] = []
    for name in names:
        key = name.strip()
        if key in SUITES:
            found = SUITES[key]
        elif key in TASKS or f"loramoe_{key}" in TASKS:
            found = [key if key in TASKS else f"loramoe_{key}"]
        else:
            raise ConfigError(
                f"unknown suite or task {name!r}; suites: {', '.join(SUITES)}; "
                f"tasks: {', '.join(t.removeprefix('loramoe_') for t in TASKS)}"
            )
        out.extend(t for t in found if t not in out)
    return out


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None, tasks: Iterable[str] | None = None
) -> Path:
    """Find the data directory: a local one, or the pinned sources fetched into the ``datasets`` cache.

    Args:
        data_dir: An explicit directory; wins over everything else.
        tasks: The full task names whose files are needed when downloading (default: every task).

    Returns:
        The absolute directory: ``data_dir``, else ``$LORAMOE_DATA_DIR``, else the ``datasets`` cache's view of the
        downloaded files (``sources.view_dir()``), downloading what is missing unless offline.

    Raises:
        ConfigError: The chosen directory does not exist; or there is none and the files are neither cached nor
            downloadable (offline). The message names both ways to get the data and the sources.
        DataError: A download failed or a file's checksum differs from the pinned one.
    """
    if data_dir is not None:
        chosen, origin = Path(data_dir), "the data_dir setting (--data-dir)"
    elif os.environ.get(DATA_DIR_ENV):
        chosen, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        needed = [rel for task in (TASKS if tasks is None else tasks) for rel in TASKS[task].files]
        found = sources.cached(needed)
        if found is not None:
            return found
        if sources.offline():
            raise ConfigError(
                "no evaluation data: give a local copy with --data-dir DIR (EvalConfig.data_dir) or "
                f"${DATA_DIR_ENV}, laid out as <folder>/<file> (src/loramoe/eval/tasks/sources.json lists them), or "
                "run online (unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE) to download them into the datasets cache "
                f"({sources.view_dir().parent}) from their pinned sources: {sources.describe(needed)}"
            )
        return sources.fetch(needed)
    chosen = chosen.expanduser().resolve()
    if not chosen.is_dir():
        raise ConfigError(
            f"data directory {chosen} (from {origin}) does not exist; pass data_dir or set ${DATA_DIR_ENV} "
            "to the folder holding webquestions/, sst2/, ..., or set neither to download the data"
        )
    return chosen


def check_data(tasks: Iterable[str], data_dir: Path) -> None:
    """Fail early, naming the file, when a task's data is missing.

    Args:
        tasks: Full task names.
        data_dir: The resolved data directory.

    Raises:
        DataError: For the first missing file or folder.
    """
    for task in tasks:
        for rel in TASKS[task].files:
            if not (data_dir / rel).exists():
                raise DataError(
                    f"task {task} needs this file; check data_dir / ${DATA_DIR_ENV}", path=str(data_dir / rel)
                )


def _write_atomic(path: Path, text: str) -> None:
    """Write unless the file already holds ``text`` (several evaluations may share the folder)."""
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)


def task_dir(
    data_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    tasks: Iterable[str] | None = None,
) -> Path:
    """Write the task YAMLs with the data directory filled in and return their folder (lm-eval's include_path).

    The folder is keyed by a hash of the data directory and the templates, so repeated calls reuse it and
    concurrent processes never see a half-written file (each file is written to a temporary name and renamed).

    Args:
        data_dir: The data directory; resolved with :func:`resolve_data_dir`.
        out_dir: Where to write; default ``<system temp>/loramoe_tasks_<hash>``.
        tasks: The tasks whose data must be there when it is downloaded (default: every task).

    Returns:
        The folder holding one YAML per task and a ``utils.py`` that re-exports :mod:`loramoe.eval.tasks.utils`.
    """
    root = resolve_data_dir(data_dir, tasks)
    # Inside a double-quoted YAML scalar a JSON string body is valid, whatever characters the path holds.
    quoted = json.dumps(root.as_posix())[1:-1]
    templates = {p.name: p.read_text(encoding="utf-8") for p in sorted(_TEMPLATE_DIR.glob("*.yaml"))}
    digest = hashlib.sha256(json.dumps([quoted, templates], sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / f"loramoe_tasks_{digest}"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in templates.items():
        _write_atomic(out / name, text.replace(_PLACEHOLDER, quoted))
    _write_atomic(
        out / "utils.py",
        "from loramoe.eval.tasks.utils import *  # noqa: F403 (written by loramoe.eval.tasks.task_dir)\n",
    )
    return out
