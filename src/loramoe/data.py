"""Task-typed training data: sources and mixtures, templates with answer-only labels, the collator.

Notable decisions:

- Records become ``Example``s first (``formats.py``); the mixture is drawn on Examples, so only what is
  used gets tokenised.
- Prompt and answer are tokenised separately (``add_special_tokens=False``) and concatenated, so the label
  boundary is exact: labels are -100 on the prompt; the answer's tokens and EOS are learned.
- Template: the tokenizer's chat template when it has one (``add_generation_prompt=True``); otherwise the
  reference's plain template ``[BOS] prompt EOS answer EOS`` (reference ``build_dataset.py``:
  ``PROMPT_TEMPLATE = "{instruction}</s>"``, target ``output + eos``, BOS from the tokenizer). BOS is added
  only where the tokenizer adds one itself, and never twice.
- Too long: the prompt is cut from the left (its end, next to the answer, stays); the answer is cut only when
  it does not fit beside one prompt token (then the prompt keeps ``max_length // 2`` tokens and the answer
  loses its tail and its EOS). The reference cut whole sequences from the right, which can leave no label.
- A source's ``task_type`` overrides the records' own ``task_type`` (logged when they differ).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

from loramoe.errors import ConfigError, DataError
from loramoe.formats import (
    DEFAULT_TASK_NAMES,
    FORMATS,
    RECORD_FIELDS,
    Example,
    check_task_names,
    dataset_rows,
    parse_records,
    read_records,
    resolve_task_type,
    valid_task_types,
)

logger = logging.getLogger("loramoe.data")

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or ok(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(config: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise ConfigError for the first field that fails its rule: ``field: (is_valid, what it must be)``."""
    for name, (ok, need) in rules.items():
        value = getattr(config, name)
        _check(ok(value), f"{type(config).__name__}.{name} must be {need}; got {value!r}")


def _from_dict(cls: type, d: Any) -> dict[str, Any]:
    _check(isinstance(d, Mapping), f"{cls.__name__} needs a mapping, not {type(d).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in d if k not in valid)
    _check(not unknown, f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    return dict(d)


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
        _validate(self, {
            "path": (_optional(_is_str), "a JSON or JSONL file"),
            "hf_dataset": (_optional(_is_str), "a datasets name or folder"),
            "hf_config": (_optional(_is_str), "a dataset configuration name or null"),
            "split": (_is_str, "a split name, e.g. 'train'"),
            "name": (_optional(_is_str), "a non-empty string or null"),
            "format": (lambda v: v in FORMATS, f"one of {', '.join(FORMATS)}"),
            "task_type": (_optional(lambda v: _is_str(v) or (_is_int(v) and v >= 0)),
                          "a task name or an int >= 0"),
            "num_samples": (_optional(lambda v: _is_int(v) and v > 0), "an int > 0 or null"),
            "ratio": (_optional(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                and 0 < v <= 1), "a share of total_samples in (0, 1], or null"),
            "columns": (_optional(lambda v: isinstance(v, Mapping) and all(k in RECORD_FIELDS and _is_str(c)
                                                                            for k, c in v.items())),
                        f"a mapping from fields ({', '.join(RECORD_FIELDS)}) to the records' keys"),
            "skip_invalid": (lambda v: isinstance(v, bool), "true or false"),
        })  # fmt: skip
        got = f"got path={self.path!r}, hf_dataset={self.hf_dataset!r}"
        _check(
            (self.path is None) != (self.hf_dataset is None),
            f"give exactly one of path and hf_dataset; {got}",
        )
        _check(self.num_samples is None or self.ratio is None, "give a source num_samples or ratio, not both")
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
        return cls(**_from_dict(cls, d))


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
    """

    sources: list[SourceConfig] = field(default_factory=list)
    max_length: int = 1024
    seed: int = 42
    template: str = "auto"
    val_size: int | float = 0
    total_samples: int | None = None

    def __post_init__(self) -> None:
        _validate(self, {
            "sources": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0,
                        "a non-empty list of sources, e.g. [{path: train.json, task_type: downstream}]"),
            "max_length": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
            "seed": (_is_int, "an int"),
            "template": (lambda v: v in TEMPLATES, f"one of {', '.join(TEMPLATES)}"),
            "val_size": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v < 1),
                         "a count >= 0 or a fraction in [0, 1)"),
            "total_samples": (_optional(lambda v: _is_int(v) and v > 0), "an int > 0 or null"),
        })  # fmt: skip
        self.sources = [
            s if isinstance(s, SourceConfig) else SourceConfig(path=s) if isinstance(s, (str, Path))
            else SourceConfig.from_dict(s) for s in self.sources
        ]  # fmt: skip
        labels = [s.label for s in self.sources]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        _check(not twice, f"several sources are named {twice}; give each a distinct name:")
        ratios = [s.ratio for s in self.sources if s.ratio is not None]
        _check(not ratios or self.total_samples is not None, "sources with ratio: need total_samples: (the "
               "mixture size the ratios are shares of); or give them num_samples:")  # fmt: skip
        _check(
            sum(ratios) <= 1 + 1e-9, f"the sources' ratios add up to {sum(ratios):g}; they must not exceed 1"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` of it gives an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a dict (a YAML/JSON mapping). Raises ConfigError on unknown keys or bad values."""
        return cls(**_from_dict(cls, d))


def examples_from_records(
    records: Iterable[Any],
    task_names: Sequence[str] = DEFAULT_TASK_NAMES,
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
    return _load(config, check_task_names(task_names), records=records)[0]


def load_examples(source: SourceConfig, task_names: Sequence[str] = DEFAULT_TASK_NAMES) -> list[Example]:
    """All Examples of one source (no sampling), in file order.

    Raises:
        DataError: unreadable file or invalid record (unless ``skip_invalid``); names file, line and field.
        ConfigError: the source's task_type is not one of ``task_names``.
    """
    return _load(source, check_task_names(task_names))[0]


def _load(
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
    _check(len(groups) == len(data_cfg.sources), "mix_examples needs one group of examples per source")
    counts = [len(g) if s.num_samples is None else s.num_samples for s, g in zip(data_cfg.sources, groups)]
    total = data_cfg.total_samples
    shares = {i: s.ratio * total for i, s in enumerate(data_cfg.sources) if s.ratio is not None}
    floors = {i: math.floor(x) for i, x in shares.items()}
    extra = round(sum(shares.values())) - sum(floors.values())
    for i in sorted(shares, key=lambda i: (floors[i] - shares[i], i))[:extra]:
        floors[i] += 1
    for i, c in floors.items():
        counts[i] = c
    mixed: list[Example] = []
    for i, (source, group, n) in enumerate(zip(data_cfg.sources, groups, counts)):
        rng = random.Random(f"{data_cfg.seed}/{i}")  # one stream per source: changing one leaves the others
        copies, rest = divmod(n, len(group))
        if copies > 1 or (copies == 1 and rest):
            logger.info("%s: %d samples drawn from %d records (repeated)", source.label, n, len(group))
        mixed += list(group) * copies + rng.sample(list(group), rest)
    random.Random(data_cfg.seed).shuffle(mixed)
    return mixed


class ExampleEncoder:
    """Example -> ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt) and ``task_types``.

    ``template``: "auto" (the chat template if the tokenizer has one, else "plain"), "chat" or "plain"; the
    resolved one is ``self.template``. Use ``prompt_ids`` for evaluation too, so prompts match training.
    """

    def __init__(self, tokenizer: Any, *, template: str = "auto", max_length: int = 1024) -> None:
        _check(
            tokenizer.eos_token_id is not None, "the tokenizer has no eos_token; set one (it ends answers)"
        )
        _check(_is_int(max_length) and max_length >= 2, f"max_length must be an int >= 2; got {max_length!r}")
        self.tokenizer, self.max_length = tokenizer, max_length
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        _check(template in TEMPLATES, f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
        _check(template != "chat" or has_chat, "template: chat needs a tokenizer with a chat template")
        self.template = template if template != "auto" else ("chat" if has_chat else "plain")
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # plain template: BOS only where the tokenizer adds it itself (as the reference's Llama tokenizer did)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.add_bos = self.template == "plain" and self.bos is not None and probe[:1] == [self.bos]

    def prompt_ids(self, example: Example) -> list[int]:
        """The prompt's tokens, ending where the answer starts (the chat template's generation prompt)."""
        if self.template == "chat":
            try:
                text = self.tokenizer.apply_chat_template(
                    example.chat_messages(), tokenize=False, add_generation_prompt=True
                )
            except Exception as e:  # jinja2's TemplateError from raise_exception(), or the template's own bug
                raise DataError(
                    f"the tokenizer's chat template rejected the record: {e}",
                    path=example.source,
                    line=example.line,
                ) from e
        else:
            text = example.prompt + self.tokenizer.eos_token
        # no special tokens added here: a chat template writes its own BOS, and the plain one gets it below
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos, *ids] if self.add_bos and ids[:1] != [self.bos] else ids

    def encode(self, example: Example) -> tuple[dict[str, Any], str | None]:
        """Tokenise one Example.

        Returns:
            The features (``input_ids``, ``attention_mask``, ``labels``: lists of length T <= max_length;
            ``task_types``: int), and what was truncated: None, "prompt" or "answer".
        """
        prompt = self.prompt_ids(example)
        answer = self.tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        if not answer:
            raise DataError("the answer has no tokens", path=example.source, line=example.line)
        target, cut, limit = [*answer, self.eos], None, self.max_length
        if len(prompt) + len(target) > limit and len(target) < limit:
            prompt, cut = prompt[len(prompt) - (limit - len(target)) :], "prompt"
        elif len(prompt) + len(target) > limit:
            keep = min(len(prompt), limit // 2)
            prompt, target, cut = prompt[len(prompt) - keep :], answer[: limit - keep], "answer"
        features = {
            "input_ids": prompt + target,
            "attention_mask": [1] * (len(prompt) + len(target)),
            "labels": [IGNORE_INDEX] * len(prompt) + target,
            "task_types": example.task_type,
        }
        return features, cut


class DataCollatorForLoRAMoE:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100); stacks ``task_types``.

    Works as a ``transformers.Trainer`` data_collator with ``remove_unused_columns=False`` (else the Trainer
    drops ``task_types`` before it gets here). A tokenizer without a pad token pads with EOS (masked out).
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        _check(pad is not None, "the tokenizer has neither a pad nor an eos token to pad with")
        _check(
            pad_to_multiple_of is None or (_is_int(pad_to_multiple_of) and pad_to_multiple_of > 0),
            f"pad_to_multiple_of must be an int > 0 or None; got {pad_to_multiple_of!r}",
        )
        self.pad_id, self.pad_to_multiple_of = pad, pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Samples -> ``input_ids``, ``attention_mask``, ``labels`` (B, T) and ``task_types`` (B,), long."""
        if any("task_types" not in f for f in features):
            raise DataError("a sample has no task_types; build samples with build_dataset or ExampleEncoder")
        lengths = [len(f["input_ids"]) for f in features]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), T), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(features), T), dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, (f, n) in enumerate(zip(features, lengths)):
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = torch.as_tensor(f.get("attention_mask", [1] * n), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        task_types = torch.as_tensor([int(f["task_types"]) for f in features], dtype=torch.long)  # (B,)
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_types=task_types)


@dataclass
class DataStats:
    """What ``build_dataset`` made: counts per source and task (training split), truncations, tokens."""

    examples: int = 0
    val_examples: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    per_task: dict[str, int] = field(default_factory=dict)
    skipped_invalid: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0
    template: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


class BuiltData(NamedTuple):
    """``build_dataset``'s result."""

    train: list[dict[str, Any]]  # samples as ExampleEncoder.encode makes them
    val: list[dict[str, Any]] | None
    stats: DataStats


def build_dataset(
    data_cfg: DataConfig, tokenizer: Any, task_names: Sequence[str] = DEFAULT_TASK_NAMES
) -> BuiltData:
    """Load every source, draw the mixture, tokenise with answer-only labels, hold out the validation split.

    Args:
        data_cfg: sources, mixture, template, max_length, seed, val_size.
        tokenizer: a Hugging Face tokenizer (needs an EOS token).
        task_names: names of the task types; index = task type (default: downstream=0, knowledge=1).

    Returns:
        ``BuiltData(train, val, stats)``: lists of samples (dicts of token lists and the int ``task_types``;
        a list serves as a map-style dataset for ``DataLoader`` and ``Trainer``); ``val`` is None when
        ``val_size`` is 0.

    Raises:
        DataError: unreadable or invalid data (names file, line and field).
        ConfigError: a bad source task_type, or val_size leaving no training data.
    """
    names = check_task_names(task_names)
    loaded = [_load(source, names) for source in data_cfg.sources]
    mixed = mix_examples([examples for examples, _ in loaded], data_cfg)
    n_val = data_cfg.val_size if _is_int(data_cfg.val_size) else round(data_cfg.val_size * len(mixed))
    _check(n_val < len(mixed), f"val_size {data_cfg.val_size} leaves no training examples of {len(mixed)}")
    encoder = ExampleEncoder(tokenizer, template=data_cfg.template, max_length=data_cfg.max_length)
    stats = DataStats(template=encoder.template, skipped_invalid=sum(skipped for _, skipped in loaded))
    features = []
    for example in mixed:
        f, truncated = encoder.encode(example)
        features.append(f)
        stats.prompt_truncated += truncated == "prompt"
        stats.answer_truncated += truncated == "answer"
        stats.tokens += len(f["input_ids"])
        stats.label_tokens += sum(label != IGNORE_INDEX for label in f["labels"])
    train_examples = mixed[: len(mixed) - n_val]
    stats.examples, stats.val_examples = len(train_examples), n_val
    stats.per_source = dict(Counter(e.source for e in train_examples))
    stats.per_task = {name: sum(e.task_type == t for e in train_examples) for t, name in enumerate(names)}
    logger.info("data: %s", stats.to_dict())
    if stats.prompt_truncated or stats.answer_truncated:
        logger.warning("data: %d prompts cut from the left, %d answers cut from the right (max_length=%d)",
                       stats.prompt_truncated, stats.answer_truncated, data_cfg.max_length)  # fmt: skip
    missing = [name for name, n in stats.per_task.items() if n == 0]
    if missing:
        logger.warning("data: no training examples of task type(s) %s for the balancing constraint", missing)
    cut = len(mixed) - n_val
    return BuiltData(features[:cut], features[cut:] if n_val else None, stats)
