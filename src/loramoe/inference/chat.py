"""The interactive chat (``loramoe chat``): a conversation kept as chat-template messages, trimmed to fit the
model's context, each reply generated (and optionally streamed) from the whole conversation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import TextStreamer

from loramoe.errors import ConfigError
from loramoe.inference.generate import (
    Message,
    check_sampling,
    check_text,
    context_length,
    decode_new,
    encode_chat,
    generation_kwargs,
    inference_context,
    model_device,
    padding_id,
    stop_token_ids,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    check_sampling(max_new_tokens, do_sample, temperature, top_p)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat needs a tokenizer with a chat template")
    stop_ids = stop_token_ids(model, tokenizer)
    gen_kwargs = generation_kwargs(
        max_new_tokens, do_sample, temperature, top_p, stop_ids, padding_id(tokenizer, stop_ids)
    )
    stream = print_fn is print if stream is None else stream
    chat = _Conversation(model, tokenizer, system_prompt, gen_kwargs, stop_ids, stream, print_fn)

    print_fn("Chat with the model. /reset clears the history; /exit or Ctrl-D quits.")
    with inference_context(model, seed):
        chat.run(input_fn)
    return chat.messages


class _Conversation:
    """The messages of one chat, fitting them into the model's context, and generating the next reply."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None,
        gen_kwargs: dict[str, Any],
        stop_ids: list[int],
        stream: bool,
        print_fn: Callable[..., Any],
    ) -> None:
        self.model, self.tokenizer, self.gen_kwargs, self.stop_ids = model, tokenizer, gen_kwargs, stop_ids
        self.stream, self.print_fn = stream, print_fn
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        self.base: list[Message] = system
        self.messages = list(self.base)
        self.max_positions = context_length(model)

    def run(self, input_fn: Callable[[str], str]) -> None:
        """Read lines and answer them until ``/exit`` or the end of input; ``/reset`` clears the history."""
        while True:
            try:
                text = input_fn("> ").strip()
                check_text(text, "the message")
            except (EOFError, KeyboardInterrupt):
                self.print_fn("")
                return
            except UnicodeDecodeError as err:  # the terminal sent bytes that are not text in its encoding
                self.print_fn(f"(input is not valid {err.encoding} text; not sent)")
                continue
            except ConfigError as err:
                self.print_fn(f"({err}; not sent)")
                continue
            if text == "/exit":
                return
            if text == "/reset":
                self.messages = list(self.base)
                self.print_fn("(history cleared)")
            elif text:
                self.reply(text)

    def reply(self, text: str) -> None:
        """Add the user's message, answer it (printed or streamed) and add the answer; a message that cannot fit
        the context even alone is not sent."""
        self.messages.append({"role": "user", "content": text})
        ids = self._fit()
        if ids is None:
            return
        input_ids = torch.tensor([ids], device=model_device(self.model))  # (1, T)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=_PrintFnStreamer(self.tokenizer, self.print_fn) if self.stream else None,
            **self.gen_kwargs,
        )
        reply = decode_new(self.tokenizer, out[0, input_ids.shape[1] :], self.stop_ids)
        if not self.stream:
            self.print_fn(reply)
        self.messages.append({"role": "assistant", "content": reply})

    def _fit(self) -> list[int] | None:
        """The conversation's token ids, after dropping the oldest turns until it and a reply fit the context;
        None (and the new message removed) when the new message alone does not fit."""
        new, limit = self.gen_kwargs["max_new_tokens"], self.max_positions
        ids = encode_chat(self.tokenizer, self.messages)
        dropped = 0
        while limit and len(ids) + new > limit and len(self.messages) - len(self.base) > 1:
            del self.messages[len(self.base) : len(self.base) + 2]  # the oldest user + assistant pair
            dropped += 1
            ids = encode_chat(self.tokenizer, self.messages)
        if dropped:
            self.print_fn(f"(dropped the {dropped} oldest turn(s) to fit the context)")
        if limit and len(ids) + new > limit:
            self.messages.pop()
            self.print_fn(f"(message too long: {len(ids)} tokens + {new} new > {limit}; not sent)")
            return None
        return ids


class _PrintFnStreamer(TextStreamer):
    """``TextStreamer`` that prints through an injected ``print_fn`` instead of the builtin."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, print_fn: Callable[..., Any]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._print_fn = print_fn

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._print_fn(text, end="\n" if stream_end else "", flush=True)
