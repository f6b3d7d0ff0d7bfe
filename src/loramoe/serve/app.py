"""The ASGI application (Starlette); ``server.serve`` runs it.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health``. Everything under ``/v1`` needs the API key when one is set; ``/health`` never does, so a load
balancer can probe it.

Design decisions:

- Work on the event loop is bounded and small (read at most ``max_body_bytes``, validate, tokenize); the model runs
  on the batcher's thread, so health checks and refusals (401, 4xx, 429) are answered while a batch decodes.
- The API key is compared with ``hmac.compare_digest`` (time independent of where the strings differ).
- A request's ``timeout`` covers waiting and decoding; past it the request leaves the batch, and the client gets a
  504 (or, when streaming, an error event).
- A client that hangs up gives up its request: a stream notices when its next event cannot be sent, a plain
  request by watching for the disconnect while it waits; either way the request leaves the queue or the batch.
- When the decoding thread has died, ``/health`` answers 503 and every request a 503 at once.
- SIGTERM (or Ctrl-C): the listening socket closes, requests still arriving on open connections get 503, admitted
  requests run to their end, then the decoding thread stops and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loramoe.inference.encoding import encode_chat, encode_prompt
from loramoe.inference.loop import Completion, TokenLoop
from loramoe.models.base import context_length
from loramoe.serve.batcher import Batcher, Failed, Job, Overloaded, ShuttingDown, Stopped
from loramoe.serve.config import ServeConfig
from loramoe.serve.protocol import APIError, ChatRequest, CompletionRequest, Reply, parse, sampling
from loramoe.serve.reading import read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes share: the model's tokenizer and limits, the batcher, and whether the server is draining."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ServeConfig):
        self.config, self.tokenizer = config, tokenizer
        self.model_name = config.model_name or _name_of(model)
        self.context = context_length(model)
        self.loop = TokenLoop(model.eval(), tokenizer)
        self.batcher = Batcher(
            self.loop,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.batch_wait_ms / 1000,
            max_queue=config.max_queue,
        )
        self.created = int(time.time())
        self.draining = False

    def authorize(self, request: Request) -> None:
        if not self.config.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.config.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key; send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )


def _name_of(model: Any) -> str:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return os.path.basename(str(name).rstrip("/")) or "loramoe"


def build_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ServeConfig) -> Starlette:
    """The ASGI app serving ``model``; its decoding thread starts now and stops when the app shuts down."""
    state = ServerState(model, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.draining = True
        await asyncio.to_thread(state.batcher.close)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", _endpoint(list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", _endpoint(get_model), methods=["GET"]),
            Route("/v1/chat/completions", _endpoint(chat_completions), methods=["POST"]),
            Route("/v1/completions", _endpoint(completions), methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.serve = state
    return app


def _endpoint(handler: Callable[[Request, ServerState], Awaitable[Response]]) -> Callable:
    """A route that checks the API key and answers ``APIError`` with an OpenAI-shaped body."""

    async def route(request: Request) -> Response:
        state: ServerState = request.app.state.serve
        try:
            state.authorize(request)
            return await handler(request, state)
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=_HEADERS.get(err.status))

    return route


_HEADERS = {
    429: {"Retry-After": "1"},
    503: {"Retry-After": "1"},
    # The body was not read to its end: the connection cannot carry another request.
    408: {"Connection": "close"},
    413: {"Connection": "close"},
}


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    err = APIError(exc.status_code, message.get(exc.status_code, exc.detail), code=None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s", request.url.path)
    err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    batcher = state.batcher
    status = "ok" if batcher.alive else "decoder stopped"
    body = {
        "status": "shutting down" if state.draining else status,
        "model": state.model_name,
        "running": batcher.running,
        "waiting": batcher.waiting,
        "abandoned": batcher.abandoned,
    }
    if batcher.failure is not None:
        body["error"] = batcher.failure
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "loramoe"}


async def list_models(request: Request, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request, state: ServerState) -> Response:
    _check_model(request.path_params["model_id"], state)
    return JSONResponse(_model_card(state))


def _check_model(name: str, state: ServerState) -> None:
    if name != state.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def chat_completions(request: Request, state: ServerState) -> Response:
    req: ChatRequest = parse(ChatRequest, await _body(request, state))
    _check_model(req.model, state)
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(
            400, "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    prompt_ids = encode_chat(state.tokenizer, req.chat_messages())
    return await _generate(request, state, req, "chat", prompt_ids, "messages")


async def completions(request: Request, state: ServerState) -> Response:
    req: CompletionRequest = parse(CompletionRequest, await _body(request, state))
    _check_model(req.model, state)
    return await _generate(request, state, req, "text", encode_prompt(state.tokenizer, req.text()), "prompt")


async def _body(request: Request, state: ServerState) -> Any:
    return await read_json(request, state.config.max_body_bytes, state.config.read_timeout)


async def _generate(
    request: Request,
    state: ServerState,
    req: ChatRequest | CompletionRequest,
    kind: str,
    prompt_ids: list[int],
    param: str,
) -> Response:
    if not prompt_ids:
        raise APIError(400, "the prompt has no tokens", param=param)
    if req.router_stats and state.loop.router is None:
        raise APIError(
            400, "router_stats needs a LoRAMoE model; this one has no LoRAMoE layers", param="router_stats"
        )
    if state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    config = state.config
    settings = sampling(
        req,
        len(prompt_ids),
        param=param,
        max_prompt_tokens=config.max_prompt_tokens,
        max_tokens=config.max_tokens,
        context=state.context,
        model=state.loop.model,
    )
    job = Job(
        prompt_ids, settings, req.router_stats, loop=asyncio.get_running_loop(), stream=bool(req.stream)
    )
    try:
        state.batcher.submit(job)
    except Overloaded as err:
        raise APIError(
            429, f"the server is busy: {err}", type="rate_limit_error", code="overloaded"
        ) from None
    except ShuttingDown:
        raise APIError(
            503, "the server is shutting down", type="server_error", code="shutting_down"
        ) from None
    except Stopped as err:
        raise APIError(503, str(err), type="server_error", code="decoder_stopped") from None
    reply = Reply(kind, state.model_name, token_ids=req.return_token_ids)
    deadline = job.arrived + config.timeout
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(state, job, reply, deadline, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        event = await _answer(request, job, deadline)
    except TimeoutError:
        raise APIError(504, f"the request took over {config.timeout:g} s", type="timeout_error") from None
    finally:
        # A no-op once the job finished; frees its place when the client left or timed out.
        state.batcher.cancel(job)
    if isinstance(event, Completion):
        return JSONResponse(reply.full(event))
    if isinstance(event, Failed):
        raise APIError(event.status, event.message, type=_error_type(event.status))
    return Response(status_code=499)  # the client hung up: nobody reads this


async def _answer(request: Request, job: Job, deadline: float) -> Completion | Failed | None:
    """A plain (not streamed) job's answer, or None when its client hangs up first; ``TimeoutError`` at the
    deadline."""
    # A plain job gets no text events: its first event is its answer.
    answer = asyncio.ensure_future(job.events.get())
    hangup = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait(
            (answer, hangup), timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        answer.cancel()
        hangup.cancel()
    if answer.done() and not answer.cancelled():
        return answer.result()
    if hangup.done() and not hangup.cancelled():
        return None
    raise TimeoutError


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(job: Job, deadline: float) -> AsyncIterator[str | Completion | Failed]:
    """The job's events until its ``Completion`` or ``Failed``; ``TimeoutError`` at the deadline."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
            raise TimeoutError from None
        yield event
        if not isinstance(event, str):
            return


async def _sse(
    state: ServerState, job: Job, reply: Reply, deadline: float, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    try:
        if reply.kind == "chat":
            yield _data(reply.chunk("", first=True))
        async for event in _events(job, deadline):
            if isinstance(event, str):
                yield _data(reply.chunk(event))
            elif isinstance(event, Completion):
                yield _data(reply.last_chunk(event))
                if include_usage:
                    yield _data(reply.usage_chunk(event))
                yield "data: [DONE]\n\n"
            else:
                yield _data(APIError(event.status, event.message, type=_error_type(event.status)).body())
    except TimeoutError:
        yield _data(
            APIError(504, f"the request took over {state.config.timeout:g} s", type="timeout_error").body()
        )
    finally:
        state.batcher.cancel(job)


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
