"""Training data sources: where records come from, how many of each, and the seeded mixture.

Notable decisions:

- ``SourceConfig`` / ``DataConfig`` are plain dataclasses validated in ``__post_init__``: every error names the
  field and what it must be; unknown keys are listed with the valid ones.
- The mixture is drawn on ``Example``s (``formats.py``), before tokenisation, so only what is used is tokenised.
- ``num_samples`` larger than a source repeats whole copies, then draws the remainder at random (seeded).
- A source's ``task_type`` overrides the records' own ``task_type`` (logged when they differ).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loramoe.config import BINARY_TASK_NAMES
from loramoe.data.formats import (
    FORMATS,
    RECORD_FIELDS,
    Example,
    check_task_names,
    parse_records,
    resolve_task_type,
    valid_task_types,
)
from loramoe.data.records import dataset_rows, read_records
from loramoe.errors import ConfigError, DataError
from loramoe.validation import (
    PATH_NEED,
    boolean,
    check_fields,
    from_mapping,
    integer,
    is_int,
    is_path_text,
    number,
    one_of,
    optional,
    require,
    section,
    text,
)

logger = logging.getLogger("loramoe.data")

TEMPLATES = ("auto", "chat", "plain")
SPECIAL_TOKENS_IN_TEXT = ("warn", "refuse", "allow")
# DataConfig fields that only check the data and never change a sample: a resumed run may change them.
CHECK_ONLY_FIELDS = ("special_tokens_in_text",)


def _name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value != "")


def _path(value: Any) -> bool:
    return value is None or is_path_text(value)


def _task_type(value: Any) -> bool:
    return _name(value) or (is_int(value) and value >= 0)


def _columns(value: Any) -> bool:
    return value is None or (
        isinstance(value, Mapping)
        and all(k in RECORD_FIELDS and isinstance(c, str) and c for k, c in value.items())
    )


_SOURCE_RULES = {
    "path": (_path, f"a JSON or JSONL file {PATH_NEED}"),
    "hf_dataset": (_path, f"a datasets name or folder {PATH_NEED}"),
    "hf_config": (_name, "a dataset configuration name or null"),
    "split": text(),
    "name": optional(text()),
    "format": one_of(FORMATS),
    "task_type": (_task_type, "a task name or an int >= 0, or null"),
    "num_samples": optional(integer(1)),
    "ratio": (optional(number(0, 1, low_open=True))[0], "a share of total_samples in (0, 1], or null"),
    "columns": (_columns, f"a mapping from fields ({', '.join(RECORD_FIELDS)}) to the records' keys"),
    "skip_invalid": boolean(),
}
_DATA_RULES = {
    "sources": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0,
                "a non-empty list of sources, e.g. [{path: train.json, task_type: downstream}]"),
    "max_length": integer(2),
    "seed": integer(),
    "template": one_of(TEMPLATES),
    "val_size": (lambda v: (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v < 1),
                 "a count >= 0 or a fraction in [0, 1)"),
    "total_samples": optional(integer(1)),
    "special_tokens_in_text": one_of(SPECIAL_TOKENS_IN_TEXT),
}  # fmt: skip


@dataclass
class SourceConfig:
    """One data source: a local JSON/JSONL file or a Hugging Face dataset.

    Attributes:
        path: a JSON array or JSONL file (UTF-8). Exactly one of ``path`` and ``hf_dataset``.
        hf_dataset: a ``datasets.load_dataset`` name or local dataset folder (needs ``datasets``).
        hf_config: the dataset's configuration name, if it has several.
        split: the dataset split to read (``hf_dataset`` only).
        name: the name in statistics and logs; defaults to the file name or dataset name.
        format: "auto" (detected from the first record), "alpaca" (alias "loramoe"), "messages" (alias
            "chat"), "qa" or "prompt_completion" (alias "completion").
        task_type: int or task name for every record of this source; overrides the records' own ``task_type``.
        num_samples: draw this many records (repeats whole copies when larger than the source); default all.
        ratio: this source's share of ``DataConfig.total_samples`` (instead of ``num_samples``).
        columns: record key for a canonical field that is named differently, e.g. ``{"question": "qText"}``.
        skip_invalid: skip invalid records (counted and logged) instead of stopping with a DataError.
    """

    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    name: str | None = None
    format: str = "auto"
    task_type: int | str | None = None
    num_samples: int | None = None
    ratio: float | None = None
    columns: dict[str, str] | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.path, Path):
            self.path = str(self.path)
        check_fields(self, _SOURCE_RULES)
        got = f"got path={self.path!r}, hf_dataset={self.hf_dataset!r}"
        require(
            (self.path is None) != (self.hf_dataset is None),
            f"give exactly one of path and hf_dataset; {got}",
        )
        require(
            self.num_samples is None or self.ratio is None, "give a source num_samples or ratio, not both"
        )
        self.columns = None if self.columns is None else dict(self.columns)

    @property
    def label(self) -> str:
        """The source's name in statistics and logs."""
        return self.name or (Path(self.path).name if self.path else str(self.hf_dataset))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` of it gives an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceConfig:
        """Build from a dict (a YAML/JSON mapping). Raises ConfigError on unknown keys or bad values."""
        return from_mapping(cls, d)


@dataclass
class DataConfig:
    """Training data: the sources, the mixture, the template and the sequence length.

    Attributes:
        sources: the sources (dicts and plain paths are accepted and converted).
        max_length: tokens per sample, prompt and answer together (at least 2).
        seed: seeds the mixture draw, the shuffle and the validation split.
        template: "auto" (chat template if the tokenizer has one, else plain), "chat" or "plain".
        val_size: validation examples held out after shuffling: a count, or a fraction in [0, 1).
        total_samples: the mixture size that source ``ratio``s are shares of.
        special_tokens_in_text: a record whose text holds a special token of the tokenizer written out (an answer
            quoting ``<|im_end|>``) is tokenised as that token, not as text: "warn" (count them, warn naming the
            first record), "refuse" (stop at the first, naming it) or "allow" (count them only).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    max_length: int = 1024
    seed: int = 42
    template: str = "auto"
    val_size: int | float = 0
    total_samples: int | None = None
    special_tokens_in_text: str = "warn"

    def __post_init__(self) -> None:
        check_fields(self, _DATA_RULES)
        self.sources = [
            section(f"sources[{i}]", SourceConfig, SourceConfig(path=s) if isinstance(s, (str, Path)) else s)
            for i, s in enumerate(self.sources)
        ]
        labels = [s.label for s in self.sources]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        require(not twice, f"several sources are named {twice}; give each a distinct name:")
        ratios = [s.ratio for s in self.sources if s.ratio is not None]
        require(not ratios or self.total_samples is not None, "sources with ratio: need total_samples: (the "
               "mixture size the ratios are shares of); or give them num_samples:")  # fmt: skip
        require(
            sum(ratios) <= 1 + 1e-9, f"the sources' ratios add up to {sum(ratios):g}; they must not exceed 1"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` of it gives an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a dict (a YAML/JSON mapping). Raises ConfigError on unknown keys or bad values."""
        return from_mapping(cls, d)


def examples_from_records(
    records: Iterable[Any],
    task_names: Sequence[str] = BINARY_TASK_NAMES,
    *,
    name: str = "records",
    **source: Any,
) -> list[Example]:
    """Examples from records already in memory: a ``datasets.Dataset``, a list of dicts.

    Args:
        records: the records, in any format ``SourceConfig.format`` accepts.
        task_names: names of the task types (index = task type).
        name: the source's name; errors show rows as ``name[i]``.
        **source: other ``SourceConfig`` fields: ``format``, ``task_type``, ``columns``, ``skip_invalid``.

    Raises:
        DataError: an invalid record (unless ``skip_invalid``), or no usable record.
    """
    config = SourceConfig(hf_dataset=name, **source)  # hf_dataset only names it: the records are given
    return load_source(config, check_task_names(task_names), records=records)[0]


def load_examples(source: SourceConfig, task_names: Sequence[str] = BINARY_TASK_NAMES) -> list[Example]:
    """All Examples of one source (no sampling), in file order.

    Raises:
        DataError: unreadable file or invalid record (unless ``skip_invalid``); names file, line and field.
        ConfigError: the source's task_type is not one of ``task_names``.
    """
    return load_source(source, check_task_names(task_names))[0]


def load_source(
    source: SourceConfig,
    names: tuple[str, ...],
    records: Iterable[Any] | None = None,
) -> tuple[list[Example], int]:
    task_type = None
    if source.task_type is not None:
        try:
            task_type = resolve_task_type(source.task_type, names)
        except DataError:
            raise ConfigError(
                f"source {source.label!r}: task_type {source.task_type!r} is not one of "
                f"{valid_task_types(names)}"
            ) from None
    where, skipped = source.path or source.label, 0
    if records is not None:
        rows = dataset_rows(records, source.label)
    elif source.path is not None:
        rows, skipped = read_records(source.path, skip_invalid=source.skip_invalid)
    else:
        rows = dataset_rows(_load_hf(source), source.label)
    examples, invalid, overridden = parse_records(
        rows, task_names=names, source=source.label, fmt=source.format, task_type=task_type,
        columns=source.columns, skip_invalid=source.skip_invalid,
    )  # fmt: skip
    skipped += invalid
    if skipped:
        logger.warning("%s: skipped %d invalid records (skip_invalid is on)", where, skipped)
    if overridden:
        logger.warning("%s: the source's task_type %r overrides the records' own in %d records", where,
                       source.task_type, overridden)  # fmt: skip
    if not examples:
        raise DataError(f"no usable records ({skipped} invalid ones skipped)", path=where)
    return examples, skipped


def _load_hf(source: SourceConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError("hf_dataset: needs the datasets package: pip install 'loramoe[train]'") from None
    try:
        return datasets.load_dataset(source.hf_dataset, source.hf_config, split=source.split)
    # datasets raises many types here (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
    except Exception as e:
        raise DataError(f"cannot load split {source.split!r}: {e}", path=source.hf_dataset) from e


def mix_examples(groups: Sequence[Sequence[Example]], data_cfg: DataConfig) -> list[Example]:
    """Draw each source's share of the mixture reproducibly from ``data_cfg.seed``, then shuffle it all.

    A source without ``num_samples``/``ratio`` gives all its examples; a count above its size repeats whole
    copies and draws the remainder. Ratios are rounded by largest remainder, so all-ratio mixtures have
    exactly ``total_samples`` examples.

    Args:
        groups: each source's Examples, in the order of ``data_cfg.sources``.
        data_cfg: the sources (for their counts), ``total_samples`` and ``seed``.
    """
    require(len(groups) == len(data_cfg.sources), "mix_examples needs one group of examples per source")
    counts = [len(g) if s.num_samples is None else s.num_samples for s, g in zip(data_cfg.sources, groups)]
    total = data_cfg.total_samples
    shares = {i: s.ratio * total for i, s in enumerate(data_cfg.sources) if s.ratio is not None}
    floors = {i: math.floor(x) for i, x in shares.items()}
    extra = round(sum(shares.values())) - sum(floors.values())
    for i in sorted(shares, key=lambda i: (floors[i] - shares[i], i))[:extra]:
        floors[i] += 1
    for i, c in floors.items():
        counts[i] = c
    empty = [i for i, c in floors.items() if c == 0]
    if empty:
        source = data_cfg.sources[empty[0]]
        raise ConfigError(
            f"source {source.label!r}: ratio {source.ratio:g} of total_samples {total} rounds to 0 samples; raise "
            "its ratio or total_samples, or remove the source"
        )
    mixed: list[Example] = []
    for i, (source, group, n) in enumerate(zip(data_cfg.sources, groups, counts)):
        rng = random.Random(f"{data_cfg.seed}/{i}")  # one stream per source: changing one leaves the others
        copies, rest = divmod(n, len(group))
        if copies > 1 or (copies == 1 and rest):
            logger.info("%s: %d samples drawn from %d records (repeated)", source.label, n, len(group))
        mixed += list(group) * copies + rng.sample(list(group), rest)
    random.Random(data_cfg.seed).shuffle(mixed)
    return mixed
