"""The OpenAI wire format: request models and their validation, response and chunk bodies, error bodies.

Design decisions:

- Requests are validated strictly (pydantic strict mode: ``"5"`` is not a number, ``true`` is not an integer) and
  unknown fields are rejected with OpenAI's own wording, so a typo is an error rather than a silently ignored
  setting. OpenAI parameters this server cannot honour (tools, logprobs, penalties...) are rejected with a message
  saying so, unless they carry their neutral value.
- ``router_stats`` is the one extension field (``extra_body={"router_stats": True}`` in the ``openai`` client); the
  response then carries a ``router_stats`` object.
- Every error body has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from loramoe.errors import ConfigError
from loramoe.inference.loop import Completion
from loramoe.inference.sampling import SEED_RANGE, Sampling, float32_positive, sampling_for

MAX_STOP_STRINGS = 4  # OpenAI's limit
# Longest stop string, in characters. Every decoding step looks for each stop string in the text and for the end of
# the text that begins one (``inference.text.TextStream``), at a cost that grows with the stop string's length, on
# the thread that decodes the whole batch. Stop strings are markers ("\nUser:", "</answer>"); 256 characters holds
# any of them and bounds the search for four to about 0.2 ms a step at worst, 1-2 us usually
# (``benchmarks/stop_scan_bench.py``).
MAX_STOP_CHARS = 256
# OpenAI parameters this server does not implement; refused unless absent or null.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
)
# Known OpenAI parameters accepted only with a value that changes nothing (the first one is named in the error).
NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "response_format": ({"type": "text"},),
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
}


class APIError(Exception):
    """An error answered with an OpenAI-shaped body and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _in_float32(value: float) -> float:
    """Decoding runs in float32: a value that rounds to 0 or overflows there is refused, not decoded."""
    if value != 0 and not float32_positive(value):
        raise PydanticCustomError(
            "float32",
            "Input should be a number that float32 holds ({value} rounds to {to} in float32, the precision "
            "decoding uses)",
            {"value": value, "to": "0" if abs(value) < 1 else "infinity"},
        )
    return value


# Sampling values as decoding will use them: in range, and still in range once rounded to float32.
_Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(_in_float32)]
_TopP = Annotated[float, Field(gt=0, le=1), AfterValidator(_in_float32)]
_Penalty = Annotated[float, Field(gt=0), AfterValidator(_in_float32)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])  # what torch.Generator takes
    n: Literal[1] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    router_stats: bool = False  # extension: mass on each expert group, for the prompt and the completion
    # Extensions (vLLM's names): sampling settings OpenAI lacks, and the generated token ids in the response.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: _Penalty | None = None
    return_token_ids: bool = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as chat-template input (``developer`` is OpenAI's newer name for ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(
                400, f"prompt holds {len(self.prompt)} prompts; send one per request", param="prompt"
            )
        return self.prompt[0]


def parse(model: type[_Request], body: Any) -> Any:
    """Validate a decoded JSON body into ``model``.

    Raises:
        APIError: 400 naming the first bad field and what it should be.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise APIError(
                400, f"{name!r} is not supported by this server", param=name, code="unsupported_parameter"
            )
    body = {k: v for k, v in body.items() if not (k in UNSUPPORTED and v is None)}
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        raise _api_error(err) from None
    for name, neutral in NEUTRAL.items():
        value = getattr(req, name, None)
        if value is not None and value not in neutral:
            raise APIError(
                400,
                f"{name}={value!r} is not supported by this server (leave it out or use {neutral[0]!r})",
                param=name,
                code="unsupported_parameter",
            )
    return req


def _api_error(err: ValidationError) -> APIError:
    """The first bad field of a validation error, in words (a union's alternatives joined by "or")."""
    errors = err.errors()
    first = errors[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    path = _path(first["loc"])
    if first["type"] == "missing":
        return APIError(400, f"{path}: a required field is missing", param=param)
    messages = list(dict.fromkeys(e["msg"] for e in errors if _path(e["loc"]).startswith(path.split(".")[0])))
    return APIError(400, f"{path}: {' or '.join(messages[:3])}", param=param)


def _path(loc: tuple) -> str:
    """``messages.0.content`` from a pydantic location, without the union alternatives' type tags."""
    return ".".join(str(part) for part in loc if isinstance(part, int) or not _is_type_tag(part))


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "none") or part.startswith("literal")


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def sampling(
    req: ChatRequest | CompletionRequest,
    prompt_tokens: int,
    *,
    param: str,
    max_prompt_tokens: int,
    max_tokens: int,
    context: int | None,
    model: Any = None,
) -> Sampling:
    """The decoding settings of a request, checked against the server's limits and the model's context.

    Args:
        req: the validated request.
        prompt_tokens: length of its prompt in tokens.
        param: the field that holds the prompt (named in errors).
        max_prompt_tokens: the server's prompt limit.
        max_tokens: the server's output limit (also the default when the request names none).
        context: the model's context length, if known.
        model: the served model, whose generation config gives the settings a request leaves out.

    Raises:
        APIError: 400 for a prompt or output over a limit, a bad stop list, or a value decoding cannot use.
    """
    if prompt_tokens > max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; this server accepts at most {max_prompt_tokens}. Shorten it",
            param=param,
            code="context_length_exceeded",
        )
    asked = req.requested_max_tokens()
    if asked is not None and asked > max_tokens:
        raise APIError(
            400, f"max_tokens is {asked}; this server allows at most {max_tokens}", param="max_tokens"
        )
    room = context - prompt_tokens if context else max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked or 1}) exceeds the model's context of "
            f"{context} tokens; shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(
            400, f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop"
        )
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise APIError(
            400,
            f"stop holds a string of {longest} characters; at most {MAX_STOP_CHARS} are allowed per stop string",
            param="stop",
        )
    try:
        return sampling_for(
            model,
            max_tokens=asked if asked is not None else min(max_tokens, room),
            do_sample=req.temperature
            != 0,  # absent: OpenAI samples, at the generation config's temperature or 1
            temperature=req.temperature or None,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            stop=stop,
            seed=req.seed,
        )
    except ConfigError as err:  # a value the decoder cannot use (a seed past 2**64, a float32 underflow...)
        field = str(err).split(" ", 1)[0]
        raise APIError(400, str(err), param=field if field in type(req).model_fields else None) from None


class Reply:
    """Builds the response bodies of one request: the full response, or its stream of chunks."""

    def __init__(self, kind: Literal["chat", "text"], model: str, *, token_ids: bool = False):
        self.kind, self.model, self.token_ids = kind, model, token_ids
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(
        self, text: str | None, finish_reason: str | None, *, delta: bool, role: bool = False
    ) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "text":
            choice["text"] = text or ""
        elif delta:
            choice["delta"] = ({"role": "assistant"} if role else {}) | (
                {"content": text} if text is not None else {}
            )
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        return choice

    def full(self, finish: Completion) -> dict[str, Any]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        body = self._envelope(obj, [self._choice(finish.text, finish.reason, delta=False)])
        self._add_token_ids(body, finish)
        body["usage"] = usage(finish)
        if finish.router_stats is not None:
            body["router_stats"] = finish.router_stats
        return body

    def _add_token_ids(self, body: dict[str, Any], finish: Completion) -> None:
        if self.token_ids:  # every generated id, the end token included (the stream sends them at the end)
            body["choices"][0]["token_ids"] = finish.token_ids

    def chunk(self, text: str | None, *, first: bool = False) -> dict[str, Any]:
        return self._envelope(self._chunk_object(), [self._choice(text, None, delta=True, role=first)])

    def last_chunk(self, finish: Completion) -> dict[str, Any]:
        """The chunk with the finish reason; it also carries the usage (and router statistics if asked for)."""
        body = self._envelope(self._chunk_object(), [self._choice(None, finish.reason, delta=True)])
        self._add_token_ids(body, finish)
        body["usage"] = usage(finish)
        if finish.router_stats is not None:
            body["router_stats"] = finish.router_stats
        return body

    def usage_chunk(self, finish: Completion) -> dict[str, Any]:
        """OpenAI's ``stream_options.include_usage`` chunk: no choices, the usage."""
        return self._envelope(self._chunk_object(), []) | {"usage": usage(finish)}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


def usage(finish: Completion) -> dict[str, int]:
    """Token counts; ``completion_tokens`` counts every generated token, the end token included."""
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }
