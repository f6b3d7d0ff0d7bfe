"""Batched generation from prompts, and the pieces the chat and the server share (encoding, stopping, decoding).

Design decisions:

- Prompts are tokenized one by one and left-padded here, so the tokenizer is never mutated (no ``padding_side`` or
  ``pad_token`` changes) and a tokenizer without a pad token works.
- Prompts are sorted by length before batching (less padding); results come back in input order.
- Chat prompts are rendered to text by the tokenizer's chat template, then tokenized without extra special tokens:
  the template already has them, and a tokenizer that adds BOS would otherwise double it.
- Generation stops at any eos id of the model's generation config or the tokenizer; the new text is cut at the first.
- An adapted model needs nothing special: its adapter layers are ordinary modules, and there are no task types at
  inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from loramoe.errors import ConfigError
from loramoe.layer import cached_stacking

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate a completion for each prompt, in batches with left padding and the KV cache.

    Settings not named here (``top_k``, repetition penalty...) come from ``model.generation_config``. The model is
    put in eval mode for the call and restored afterwards.

    Args:
        model: A causal LM with ``generate`` (plain or adapted).
        tokenizer: Its tokenizer.
        prompts: The prompts, as plain text (user messages when the chat template is used).
        max_new_tokens: Most tokens generated per prompt.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (> 0); only used when sampling.
        top_p: Nucleus sampling mass in (0, 1]; only used when sampling.
        batch_size: Prompts per ``generate`` call.
        chat_template: Wrap each prompt as a user message with the tokenizer's chat template; ``None`` uses it if the
            tokenizer has one.
        system_prompt: A system message put before each prompt; needs the chat template.
        seed: Seed for sampling; the global RNG state is restored afterwards.
        progress: Show a progress bar over batches.

    Returns:
        The new text of each prompt (without the prompt, special tokens or surrounding whitespace), in input order.

    Raises:
        ConfigError: A bad setting, a chat template requested but missing, or a prompt with no tokens.
    """
    check_sampling(max_new_tokens, do_sample, temperature, top_p)
    encoded = _encode_prompts(
        model, tokenizer, prompts, max_new_tokens, batch_size, chat_template, system_prompt
    )

    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = padding_id(tokenizer, stop_ids)
    gen_kwargs = generation_kwargs(max_new_tokens, do_sample, temperature, top_p, stop_ids, pad_id)
    with inference_context(model, seed):
        return _generate_batched(model, tokenizer, encoded, batch_size, gen_kwargs, progress)


def _encode_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool | None,
    system_prompt: str | None,
) -> list[list[int]]:
    """``generate``'s arguments checked and its prompts encoded, each checked against the model's context."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
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


def _generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    batch_size: int,
    gen_kwargs: dict[str, Any],
    progress: bool,
) -> list[str]:
    """The new text of each encoded prompt, longest prompts batched first (less padding), in input order."""
    stop_ids, device = gen_kwargs["eos_token_id"] or [], model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results = [""] * len(encoded)
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        input_ids, attention_mask = left_pad([encoded[i] for i in batch], gen_kwargs["pad_token_id"], device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)  # (B, T + new)
        for row, i in enumerate(batch):
            results[i] = decode_new(tokenizer, out[row, input_ids.shape[1] :], stop_ids)
    return results


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    """Raise ``ConfigError`` for a setting ``generate`` would reject late or misuse."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ConfigError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ConfigError(
            f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy"
        )
    if do_sample and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def check_text(text: str, what: str) -> None:
    """Refuse text holding undecodable bytes (lone surrogates, as Python decodes them from a command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{what} holds bytes that are not UTF-8 text (at character {err.start}); give it as UTF-8"
        ) from None


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings`` or ``n_positions``), if its config says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


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


def generation_kwargs(
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, stop_ids: list[int], pad_id: int
) -> dict[str, Any]:
    """The ``model.generate`` keywords of these settings (sampling ones only when sampling)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "use_cache": True,
        "pad_token_id": pad_id,
        "eos_token_id": stop_ids or None,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, each ``(B, T)``."""
    width = max(len(ids) for ids in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(seqs):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decode_new(tokenizer: PreTrainedTokenizerBase, new_ids: torch.Tensor, stop_ids: list[int]) -> str:
    """The text of generated ids, cut at the first stop id, without special tokens or surrounding whitespace."""
    ids = new_ids.tolist()
    for k, token_id in enumerate(ids):
        if token_id in stop_ids:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@contextlib.contextmanager
def inference_context(model: torch.nn.Module, seed: int | None) -> Iterator[None]:
    """Eval mode, the experts' stacked weights built once, and, with a seed, a forked RNG; all undone on exit."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), cached_stacking(model):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)
