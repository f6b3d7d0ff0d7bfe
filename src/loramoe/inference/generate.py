"""Batched generation from prompts (``loramoe generate`` and the evaluation engine), on the token loop.

Design decisions:

- Prompts are sorted by length before batching (less padding); results come back in input order.
- Settings not given come from the model's generation config (``inference.sampling``); every prompt is a request
  of its own with the same seed, so a prompt's sampled answer does not depend on the others in its batch, and
  equals what ``loramoe serve`` answers to the same request and seed.
- An adapted model needs nothing special: its adapter layers are ordinary modules, and there are no task types at
  inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from loramoe.errors import ConfigError
from loramoe.inference.encoding import Message, check_text, encode_chat, encode_prompt
from loramoe.inference.loop import Completion, Request, TokenLoop
from loramoe.inference.sampling import sampling_for
from loramoe.models.base import context_length
from loramoe.validation import check_value, integer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate a completion for each prompt, in batches with left padding and the KV cache.

    The text of :func:`complete`'s completions; see there for the arguments.

    Returns:
        The new text of each prompt (without the prompt, special tokens or surrounding whitespace), in input order.
    """
    return [
        c.text
        for c in complete(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=stop,
            batch_size=batch_size,
            chat_template=chat_template,
            system_prompt=system_prompt,
            seed=seed,
            progress=progress,
        )  # fmt: skip
    ]


def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[Completion]:
    """Generate a completion (text, token ids, finish reason) for each prompt, on the token loop.

    The model is put in eval mode for the call and restored afterwards; the global RNG is not used.

    Args:
        model: A causal LM (plain or adapted).
        tokenizer: Its tokenizer.
        prompts: The prompts, as plain text (user messages when the chat template is used).
        max_new_tokens: Most tokens generated per prompt.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (> 0); None: the generation config's, else 1. Only used when sampling.
        top_p: Nucleus sampling mass in (0, 1]; None: the generation config's, else 1. Only used when sampling.
        top_k: Keep the k most probable tokens (0: all); None: the generation config's, else 0. Only when sampling.
        repetition_penalty: > 1 discourages repeating prompt or output tokens (greedy too); None: the generation
            config's, else 1.
        stop: Strings that end an answer (not included in it).
        batch_size: Prompts decoded together.
        chat_template: Wrap each prompt as a user message with the tokenizer's chat template; ``None`` uses it if the
            tokenizer has one.
        system_prompt: A system message put before each prompt; needs the chat template.
        seed: Seed of every prompt's sampler (each prompt its own stream); None draws one per prompt.
        progress: Show a progress bar over batches.

    Returns:
        One ``Completion`` per prompt, in input order.

    Raises:
        ConfigError: A bad setting, a chat template requested but missing, or a prompt with no tokens.
    """
    check_value("max_new_tokens", max_new_tokens, integer(1))
    check_value("batch_size", batch_size, integer(1))
    sampling = sampling_for(model, max_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                            stop=tuple(stop), seed=seed)  # fmt: skip
    encoded = _encode_prompts(model, tokenizer, prompts, max_new_tokens, chat_template, system_prompt)
    loop = TokenLoop(model, tokenizer)
    results: list[Completion | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    requests = [
        Request(encoded[i], sampling, on_finish=lambda c, i=i: results.__setitem__(i, c)) for i in order
    ]
    batches = range(0, len(requests), batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        loop.run(requests[start : start + batch_size], batch_size=batch_size)
    return results  # type: ignore[return-value]


def _encode_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    chat_template: bool | None,
    system_prompt: str | None,
) -> list[list[int]]:
    """``generate``'s prompts checked and encoded, each checked against the model's context."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a list of strings (one prompt each)")
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"prompt {i}")
    use_chat = _use_chat_template(tokenizer, chat_template)
    if system_prompt is not None and not use_chat:
        raise ConfigError(
            "system_prompt needs a chat template; the tokenizer has none or chat_template=False"
        )
    base: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    encoded = [_encode(tokenizer, prompt, i, base if use_chat else None) for i, prompt in enumerate(prompts)]
    context = context_length(model)
    for i, ids in enumerate(encoded):
        if context and len(ids) + max_new_tokens > context:
            raise ConfigError(
                f"prompt {i} is {len(ids)} tokens; with max_new_tokens {max_new_tokens} that is more than the "
                f"model's context ({context} positions); shorten the prompt or lower max_new_tokens"
            )
    return encoded


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, i: int, chat: list[Message] | None) -> list[int]:
    """Prompt ``i``'s token ids: as a user message after the ``chat`` messages, or plain text when None."""
    if chat is not None:
        ids = encode_chat(tokenizer, [*chat, {"role": "user", "content": prompt}])
    else:
        ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ConfigError(f"prompt {i} has no tokens; give it some text")
    return ids


def _use_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ConfigError(
            "chat_template=True but the tokenizer has no chat template; pass chat_template=False"
        )
    return chat_template
