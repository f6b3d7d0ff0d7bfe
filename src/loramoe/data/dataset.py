"""Task-typed training data: templates with answer-only labels, the collator, and ``build_dataset``.

Sources and mixtures live in ``sources.py`` and record formats in ``formats.py``.

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
- A special token of the tokenizer written out in a record's text (``<|im_end|>`` quoted in an answer) becomes
  that token, as the tokenizer reads it; such samples are counted (``DataStats.special_token_samples``) and,
  per ``data.special_tokens_in_text``, warned about (default), refused or allowed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from loramoe.config import BINARY_TASK_NAMES
from loramoe.data.formats import Example, check_task_names, resolve_task_type, valid_task_types
from loramoe.data.sources import TEMPLATES, DataConfig, load_source, mix_examples
from loramoe.data.special_tokens import first_special_token, refusal, special_tokens_pattern, warning
from loramoe.errors import DataError
from loramoe.validation import check_value, integer, is_int, optional, require

logger = logging.getLogger("loramoe.data")

IGNORE_INDEX = -100
# More characters than any token of real text covers: bounds the text tokenised per record.
CHARS_PER_TOKEN = 32
_SETTING = "set data.special_tokens_in_text: {}"  # how a run changes what special tokens in its text do


class ExampleEncoder:
    """Example -> ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt) and ``task_types``.

    ``template``: "auto" (the chat template if the tokenizer has one, else "plain"), "chat" or "plain"; the
    resolved one is ``self.template``. Use ``prompt_ids`` for evaluation too, so prompts match training.
    """

    def __init__(self, tokenizer: Any, *, template: str = "auto", max_length: int = 1024) -> None:
        require(
            tokenizer.eos_token_id is not None, "the tokenizer has no eos_token; set one (it ends answers)"
        )
        check_value("max_length", max_length, integer(2))
        self.tokenizer, self.max_length = tokenizer, max_length
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        require(template in TEMPLATES, f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
        require(template != "chat" or has_chat, "template: chat needs a tokenizer with a chat template")
        self.template = template if template != "auto" else ("chat" if has_chat else "plain")
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # plain template: BOS only where the tokenizer adds it itself (as the reference's Llama tokenizer did)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.add_bos = self.template == "plain" and self.bos is not None and probe[:1] == [self.bos]
        self._specials = special_tokens_pattern(tokenizer)

    def special_token_in(self, example: Example) -> tuple[str, str] | None:
        """The first special token of the tokenizer written as text in what ``encode`` tokenises of ``example``,
        and where ("answer" or "prompt"); None when there is none."""
        if self._specials is None:
            return None
        example, _ = self._bounded(example)
        prompts = (
            [m["content"] for m in example.chat_messages()] if self.template == "chat" else [example.prompt]
        )
        return first_special_token(
            self._specials, [("answer", example.answer), *(("prompt", p) for p in prompts)]
        )

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
        example, answer_cut = self._bounded(example)
        prompt = self.prompt_ids(example)
        answer = self.tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        if not answer:
            raise DataError("the answer has no tokens", path=example.source, line=example.line)
        target, cut, limit = [*answer, self.eos], None, self.max_length
        # The answer's text was longer than any max_length tokens of it: no EOS, it does not end.
        if answer_cut:
            target, cut = answer, "answer"
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

    def _bounded(self, example: Example) -> tuple[Example, bool]:
        """The example with each text cut to ``max_length * CHARS_PER_TOKEN`` characters before tokenising (the
        prompt and earlier chat turns keep their ends, the answer its start), so one huge record costs no more
        than a long one; and whether the answer was cut. A token covers far fewer characters than that, so the
        kept text still gives more than ``max_length`` tokens and the result equals cutting the tokens."""
        chars = self.max_length * CHARS_PER_TOKEN
        answer_cut = len(example.answer) > chars
        messages = example.messages
        if messages is not None:
            lead = [m for m in messages[:1] if m.get("role") == "system"]
            rest = messages[len(lead) :][-(2 * self.max_length + 1) :]  # more turns than tokens cannot fit
            messages = [{**m, "content": str(m.get("content", ""))[-chars:]} for m in (*lead, *rest)]
        if not answer_cut and len(example.prompt) <= chars and messages == example.messages:
            return example, False
        return dataclasses.replace(
            example, prompt=example.prompt[-chars:], answer=example.answer[:chars], messages=messages
        ), answer_cut


class DataCollatorForLoRAMoE:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100); stacks ``task_types``.

    Works as a ``transformers.Trainer`` data_collator with ``remove_unused_columns=False`` (else the Trainer
    drops ``task_types`` before it gets here). A tokenizer without a pad token pads with EOS (masked out).
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        require(pad is not None, "the tokenizer has neither a pad nor an eos token to pad with")
        check_value("pad_to_multiple_of", pad_to_multiple_of, optional(integer(1)))
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


class TaskTypeCollator:
    """Any collator plus ``task_types``: each sample's task type column is taken out, the rest collated by
    ``collator``, and the types added to the batch as ``task_types`` (B,) long, the way the loss reads them.

    For pipelines that tokenise and collate their own way (TRL's ``SFTTrainer``); run with
    ``remove_unused_columns=False`` so the Trainer keeps the column.

    Args:
        collator: the pipeline's own collator (samples -> batch dict).
        task_names: the adapter's task names (``LoRAMoEConfig.task_names``); a type is a name or its index.
        column: the samples' task type column.
    """

    def __init__(self, collator: Any, task_names: Sequence[str], column: str = "task_type") -> None:
        self.collator, self.task_names, self.column = collator, tuple(task_names), column

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if any(self.column not in f for f in features):
            raise DataError(
                f"a sample has no {self.column!r} column; give every sample its task type "
                f"({valid_task_types(self.task_names)}), or name the column that holds it"
            )
        types = [resolve_task_type(f[self.column], self.task_names) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch["task_types"] = torch.tensor(types, dtype=torch.long)  # (B,)
        return batch


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
    special_token_samples: int = 0
    special_token_first: str | None = None  # "train.jsonl:7 answer '<|im_end|>'"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


class BuiltData(NamedTuple):
    """``build_dataset``'s result."""

    train: list[dict[str, Any]]  # samples as ExampleEncoder.encode makes them
    val: list[dict[str, Any]] | None
    stats: DataStats


def build_dataset(
    data_cfg: DataConfig, tokenizer: Any, task_names: Sequence[str] = BINARY_TASK_NAMES
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
    loaded = [load_source(source, names) for source in data_cfg.sources]
    mixed = mix_examples([examples for examples, _ in loaded], data_cfg)
    n_val = data_cfg.val_size if is_int(data_cfg.val_size) else round(data_cfg.val_size * len(mixed))
    require(n_val < len(mixed), f"val_size {data_cfg.val_size} leaves no training examples of {len(mixed)}")
    encoder = ExampleEncoder(tokenizer, template=data_cfg.template, max_length=data_cfg.max_length)
    stats = DataStats(template=encoder.template, skipped_invalid=sum(skipped for _, skipped in loaded))
    features = []
    for example in mixed:
        _check_special_tokens(encoder, example, stats, data_cfg.special_tokens_in_text)
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
    if stats.special_token_samples and data_cfg.special_tokens_in_text == "warn":
        message = warning(f"{stats.special_token_samples} samples", stats.special_token_first, _SETTING)
        logger.warning("data: %s", message)
    missing = [name for name, n in stats.per_task.items() if n == 0]
    if missing:
        logger.warning("data: no training examples of task type(s) %s for the balancing constraint", missing)
    cut = len(mixed) - n_val
    return BuiltData(features[:cut], features[cut:] if n_val else None, stats)


def _check_special_tokens(encoder: ExampleEncoder, example: Example, stats: DataStats, mode: str) -> None:
    """Count a sample whose text holds a special token; under ``refuse``, stop at it naming the record."""
    found = encoder.special_token_in(example)
    if found is None:
        return
    token, where = found
    if mode == "refuse":
        raise DataError(refusal(f"the {where}", token, _SETTING), path=example.source, line=example.line)
    stats.special_token_samples += 1
    if stats.special_token_first is None:
        at = f"{example.source}:{example.line}" if example.line is not None else example.source
        stats.special_token_first = f"{at} {where} {token!r}"
