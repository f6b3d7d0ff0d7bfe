"""The interactive chat (``loramoe chat``): a conversation kept as chat-template messages, trimmed to fit the
model's context, each reply generated (and optionally streamed) from the whole conversation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from loramoe.errors import ConfigError
from loramoe.inference.encoding import Message, check_text, encode_chat
from loramoe.inference.loop import Completion, Request, TokenLoop
from loramoe.inference.sampling import Sampling, sampling_for
from loramoe.models.base import context_length

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    system_prompt: str | None = None,
    seed: int | None = None,
    stream: bool | None = None,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., Any] = print,
    on_reply: Callable[[Completion], None] | None = None,
) -> list[Message]:
    """Chat with the model, keeping the conversation as chat-template messages.

    Type ``/reset`` to clear the history (the system prompt stays) and ``/exit`` (or end of input) to quit. When the
    conversation outgrows the model's context, the oldest turns are dropped.

    Args:
        model: A causal LM (plain or adapted).
        tokenizer: Its tokenizer; it must have a chat template.
        max_new_tokens: Most tokens per reply.
        do_sample: Sample instead of greedy decoding.
        temperature, top_p, top_k, repetition_penalty, stop: as for ``inference.generate.complete`` (unset ones
            come from the model's generation config).
        system_prompt: A system message at the start of every conversation.
        seed: Seed of every reply's sampler (each reply its own stream, as a server request with that seed).
        stream: Print replies token by token through ``print_fn`` (which must then accept ``print``'s ``end`` and
            ``flush`` keywords); ``None`` streams only when ``print_fn`` is ``print``.
        input_fn: Reads a user line given a prompt string, like ``input``; raising ``EOFError`` ends the chat.
        print_fn: Shows output, like ``print``.
        on_reply: Called with each reply's ``Completion`` (text, token ids, finish reason).

    Returns:
        The conversation's messages when the chat ended (since the last ``/reset``).

    Raises:
        ConfigError: A bad setting or a tokenizer without a chat template.
    """
    sampling = sampling_for(model, max_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=tuple(stop),
                            seed=seed)  # fmt: skip
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat needs a tokenizer with a chat template")
    stream = print_fn is print if stream is None else stream
    chat = _Conversation(TokenLoop(model, tokenizer), system_prompt, sampling, stream, print_fn, on_reply)

    print_fn("Chat with the model. /reset clears the history; /exit or Ctrl-D quits.")
    chat.run(input_fn)
    return chat.messages


class _Conversation:
    """The messages of one chat, fitting them into the model's context, and generating the next reply."""

    def __init__(
        self,
        loop: TokenLoop,
        system_prompt: str | None,
        sampling: Sampling,
        stream: bool,
        print_fn: Callable[..., Any],
        on_reply: Callable[[Completion], None] | None,
    ) -> None:
        self.loop, self.tokenizer, self.sampling = loop, loop.tokenizer, sampling
        self.stream, self.print_fn, self.on_reply = stream, print_fn, on_reply
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        self.base: list[Message] = system
        self.messages = list(self.base)
        self.max_positions = context_length(loop.model)

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
        done: list[Completion] = []
        on_text = (lambda delta: self.print_fn(delta, end="", flush=True)) if self.stream else None
        self.loop.run([Request(ids, self.sampling, on_finish=done.append, on_text=on_text)], batch_size=1)
        reply = done[0]
        self.print_fn("" if self.stream else reply.text)
        if self.on_reply is not None:
            self.on_reply(reply)
        self.messages.append({"role": "assistant", "content": reply.text})

    def _fit(self) -> list[int] | None:
        """The conversation's token ids, after dropping the oldest turns until it and a reply fit the context;
        None (and the new message removed) when the new message alone does not fit."""
        new, limit = self.sampling.max_tokens, self.max_positions
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
