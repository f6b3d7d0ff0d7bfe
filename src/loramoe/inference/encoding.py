"""Prompts to token ids, and the ids that end or pad a generation, shared by every command that generates.

Design decisions:

- Prompts are tokenized one by one and left-padded here, so the tokenizer is never mutated (no ``padding_side`` or
  ``pad_token`` changes) and a tokenizer without a pad token works.
- Chat prompts are rendered to text by the tokenizer's chat template, then tokenized without extra special tokens:
  the template already has them, and a tokenizer that adds BOS would otherwise double it.
- Generation stops at any eos id of the model's generation config or the tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loramoe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


def check_text(text: str, what: str) -> None:
    """Refuse text holding undecodable bytes (lone surrogates, as Python decodes them from a command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{what} holds bytes that are not UTF-8 text (at character {err.start}); give it as UTF-8"
        ) from None


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a plain prompt (with the special tokens the tokenizer adds, e.g. BOS)."""
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of chat messages rendered by the tokenizer's template, ending with the assistant cue.

    The template already holds the special tokens, so none are added (a tokenizer that adds BOS would double them).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends generation: the generation config's eos ids and the tokenizer's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = config_eos if isinstance(config_eos, list) else [config_eos]
    ids: list[int] = []
    for token_id in [*candidates, tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def padding_id(tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> int:
    """The id left padding uses: the pad token, else the first stop id."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return stop_ids[0] if stop_ids else 0  # masked out anyway; any valid id will do


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, each ``(B, T)``."""
    width = max(len(ids) for ids in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(seqs):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)
