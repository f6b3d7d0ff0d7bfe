"""Special tokens of a tokenizer written out as text in training data (``<|im_end|>`` quoted in an answer).

A tokenizer reads such text as the special token itself, so the sample is trained on a control token where its
writer may have meant characters. Both training paths find them here and say the same thing about them:
``build_dataset`` (the Trainer, ``data.special_tokens_in_text``) and ``LoRAMoESFTTrainer`` (TRL,
``special_tokens_in_text=``). The modes are ``sources.SPECIAL_TOKENS_IN_TEXT``: warn (count, and warn naming the first),
refuse (stop at the first, naming it) or allow (count only). The default warns rather than refuses because data
written in a chat format on purpose holds such tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def special_tokens_pattern(tokenizer: Any) -> re.Pattern | None:
    """A pattern matching any special token of ``tokenizer`` (its named ones and added tokens marked special);
    None when it has none."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens |= {str(t) for t in added.values() if getattr(t, "special", False)}
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)  # the longest first: "<s>" inside "<s>x"
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def first_special_token(
    pattern: re.Pattern | None, texts: Iterable[tuple[str, str]]
) -> tuple[str, str] | None:
    """The first special token written in ``texts`` (``(where, text)`` pairs, searched in order) and the ``where``
    it is in; None when there is none."""
    if pattern is None:
        return None
    for where, text in texts:
        found = pattern.search(text)
        if found:
            return found.group(0), where
    return None


def refusal(where: str, token: str, setting: str) -> str:
    """The error for ``token`` found at ``where`` under "refuse"; ``setting`` is how the user sets a mode, with
    ``{}`` for it (``"set data.special_tokens_in_text: {}"``)."""
    return (
        f"{where} holds {token!r}, a special token of the tokenizer, written as text; it would be trained as that "
        f"token. Edit the text, or {setting.format('allow')} (or warn) to train it so"
    )


def warning(which: str, first: str, setting: str) -> str:
    """The warning for ``which`` ("3 samples") holding a special token, the first at ``first``."""
    return (
        f"{which} hold a special token of the tokenizer written as text (the first: {first}); each is "
        f"trained as that token, not as its characters. Edit the text, or {setting.format('refuse')} to stop at "
        "such records, or allow to train them as they are without this warning"
    )
