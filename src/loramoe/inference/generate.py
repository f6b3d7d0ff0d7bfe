"""Generation helpers: batched generation from prompts, reading prompt files, and an interactive chat.

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
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import TextStreamer

from loramoe.errors import ConfigError, DataError
from loramoe.layer import cached_stacking

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
PROMPT_FIELDS = (
    "prompt",
    "instruction",
    "question",
)  # in order of preference; "input" is appended to "instruction"


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
    _check_settings(max_new_tokens, do_sample, temperature, top_p)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    use_chat = _use_chat_template(tokenizer, chat_template)
    if system_prompt is not None and not use_chat:
        raise ConfigError(
            "system_prompt needs a chat template; the tokenizer has none or chat_template=False"
        )
    base: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []

    encoded = []
    for i, prompt in enumerate(prompts):
        ids = (
            encode_chat(tokenizer, [*base, {"role": "user", "content": prompt}])
            if use_chat
            else encode_prompt(tokenizer, prompt)
        )
        if not ids:
            raise ConfigError(f"prompt {i} has no tokens; give it some text")
        encoded.append(ids)

    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = padding_id(tokenizer, stop_ids)
    gen_kwargs = _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, stop_ids, pad_id)
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results = [""] * len(encoded)
    with _inference(model, seed):
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id, device)  # (B, T) each
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs
            )  # (B, T + new)
            for row, i in enumerate(batch):
                results[i] = _decode_new(tokenizer, out[row, input_ids.shape[1] :], stop_ids)
    return results


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a file.

    Formats, by extension:

    - ``.txt``: one prompt per line; surrounding whitespace stripped, blank lines skipped.
    - ``.jsonl``: one JSON object (or string) per line, blank lines skipped.
    - ``.json``: a list of objects (or strings).

    An object's prompt is its ``prompt`` field, else ``instruction`` (followed by a blank line and ``input`` when
    that is non-empty), else ``question``.

    Args:
        path: The file.

    Returns:
        The prompts, in file order.

    Raises:
        DataError: Missing or unreadable file, unknown extension, bad JSON, a record without a usable prompt field
            (the error names the line, or for ``.json`` the 1-based record number, and the field), or no prompts.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise DataError(
            "unknown prompt file type; use .txt (one prompt per line), .jsonl or .json", path=str(path)
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read: {e}", path=str(path)) from e

    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path=str(path), line=number) from None
            prompts.append(_record_prompt(record, str(path), number))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", path=str(path), line=e.lineno) from None
        if not isinstance(records, list):
            raise DataError(
                f"a .json prompt file must hold a list, found {type(records).__name__}", path=str(path)
            )
        prompts = [
            _record_prompt(record, str(path), number) for number, record in enumerate(records, start=1)
        ]
    if not prompts:
        raise DataError("no prompts in the file", path=str(path))
    return prompts


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    seed: int | None = None,
    stream: bool | None = None,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., Any] = print,
) -> list[Message]:
    """Chat with the model, keeping the conversation as chat-template messages.

    Type ``/reset`` to clear the history (the system prompt stays) and ``/exit`` (or end of input) to quit. When the
    conversation outgrows the model's context, the oldest turns are dropped.

    Args:
        model: A causal LM (plain or adapted).
        tokenizer: Its tokenizer; it must have a chat template.
        max_new_tokens: Most tokens per reply.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (> 0); only used when sampling.
        top_p: Nucleus sampling mass in (0, 1]; only used when sampling.
        system_prompt: A system message at the start of every conversation.
        seed: Seed for sampling; the global RNG state is restored afterwards.
        stream: Print replies token by token through ``print_fn`` (which must then accept ``print``'s ``end`` and
            ``flush`` keywords); ``None`` streams only when ``print_fn`` is ``print``.
        input_fn: Reads a user line given a prompt string, like ``input``; raising ``EOFError`` ends the chat.
        print_fn: Shows output, like ``print``.

    Returns:
        The conversation's messages when the chat ended (since the last ``/reset``).

    Raises:
        ConfigError: A bad setting or a tokenizer without a chat template.
    """
    _check_settings(max_new_tokens, do_sample, temperature, top_p)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat needs a tokenizer with a chat template")
    stream = print_fn is print if stream is None else stream
    base: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages = list(base)
    stop_ids = stop_token_ids(model, tokenizer)
    gen_kwargs = _generation_kwargs(
        max_new_tokens, do_sample, temperature, top_p, stop_ids, padding_id(tokenizer, stop_ids)
    )
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    device = model_device(model)

    print_fn("Chat with the model. /reset clears the history; /exit or Ctrl-D quits.")
    with _inference(model, seed):
        while True:
            try:
                line = input_fn("> ")
            except (EOFError, KeyboardInterrupt):
                print_fn("")
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                messages = list(base)
                print_fn("(history cleared)")
                continue
            messages.append({"role": "user", "content": text})
            ids = encode_chat(tokenizer, messages)
            dropped = 0
            while (
                max_positions and len(ids) + max_new_tokens > max_positions and len(messages) - len(base) > 1
            ):
                del messages[len(base) : len(base) + 2]  # the oldest user + assistant pair
                dropped += 1
                ids = encode_chat(tokenizer, messages)
            if dropped:
                print_fn(f"(dropped the {dropped} oldest turn(s) to fit the context)")
            if max_positions and len(ids) + max_new_tokens > max_positions:
                messages.pop()
                print_fn(
                    f"(message too long: {len(ids)} tokens + {max_new_tokens} new > {max_positions}; not sent)"
                )
                continue
            input_ids = torch.tensor([ids], device=device)  # (1, T)
            streamer = _PrintFnStreamer(tokenizer, print_fn) if stream else None
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                **gen_kwargs,
            )
            reply = _decode_new(tokenizer, out[0, input_ids.shape[1] :], stop_ids)
            if not stream:
                print_fn(reply)
            messages.append({"role": "assistant", "content": reply})
    return messages


class _PrintFnStreamer(TextStreamer):
    """``TextStreamer`` that prints through an injected ``print_fn`` instead of the builtin."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, print_fn: Callable[..., Any]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._print_fn = print_fn

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._print_fn(text, end="\n" if stream_end else "", flush=True)


def _check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ConfigError(
            f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy"
        )
    if do_sample and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


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


def _generation_kwargs(
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, stop_ids: list[int], pad_id: int
) -> dict[str, Any]:
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


def _decode_new(tokenizer: PreTrainedTokenizerBase, new_ids: torch.Tensor, stop_ids: list[int]) -> str:
    ids = new_ids.tolist()
    for k, token_id in enumerate(ids):
        if token_id in stop_ids:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@contextlib.contextmanager
def _inference(model: torch.nn.Module, seed: int | None) -> Iterator[None]:
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


def _record_prompt(record: object, path: str, line: int) -> str:
    if isinstance(record, str):
        if not record.strip():
            raise DataError("empty prompt", path=path, line=line)
        return record
    if not isinstance(record, dict):
        raise DataError(
            f"expected an object or a string, found {type(record).__name__}", path=path, line=line
        )
    field = next((name for name in PROMPT_FIELDS if name in record), None)
    if field is None:
        raise DataError(
            f"no prompt field; expected one of {', '.join(PROMPT_FIELDS)}, found {', '.join(map(str, record)) or 'none'}",
            path=path,
            line=line,
            field="prompt",
        )
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError("must be a non-empty string", path=path, line=line, field=field)
    if field == "instruction":
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError("must be a string", path=path, line=line, field="input")
        if extra and extra.strip():
            return f"{value}\n\n{extra}"
    return value
