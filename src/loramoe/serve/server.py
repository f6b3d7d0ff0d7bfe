"""Running the app: uvicorn over h11 with the connection limits uvicorn lacks, and a graceful shutdown (``serve``).

Design decisions:

- The HTTP protocol is uvicorn's h11 one, named explicitly rather than "auto", so the limits below hold whichever
  optional packages are installed.
- A client has ``read_timeout`` seconds to send a request's headers, counted from when its connection opens or its
  previous response ends; past it the connection is closed. uvicorn has no such timeout (its keep-alive timer stops
  at the first byte), so a client sending one byte now and then held its connection forever. The same timeout
  closes a connection still sending a body the server has already answered (a 401, a 413); the body of a request
  being read has its own (``reading``).
- A response waits at most ``write_timeout`` seconds for its client to read it: a client that keeps its connection
  open but stops reading fills the send buffers, and the transport pauses writing (asyncio's 64 KiB above the
  kernel's buffers); if it has not resumed by then, the connection is aborted (not closed: closing waits for the
  unsent bytes forever), which the app sees as a hang-up, so a stream gives up its request and its batch slot. A
  connection the server closes itself (an idle one, one making room, a refused one) gets the same ``write_timeout``
  for whatever its client has not read yet, however little.
- At most ``max_connections`` connections are open. A new one beyond the limit closes the open connection that has
  waited longest for its client to send a request (headers or body), so idle or slow sockets cannot starve a client
  that sends its request at once, such as a health probe; when every connection has a request in hand, the new one
  gets a 503. The process's open-file limit is checked against ``max_connections`` at start (``ServeConfig``).
- SIGTERM (or Ctrl-C): the app is marked as draining at once (new requests get 503), the listening socket closes,
  and uvicorn waits for the admitted requests.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from loramoe.serve.app import ServerState, build_app
from loramoe.serve.config import ServeConfig
from loramoe.serve.protocol import APIError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_BUSY_BODY = json.dumps(
    APIError(
        503, "the server has its most connections open, each with a request in hand; retry later",
        type="server_error", code="too_many_connections",
    ).body()
).encode()  # fmt: skip
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with header and write timeouts and a connection limit (set by ``protocol_class``)."""

    read_timeout: float
    write_timeout: float
    max_connections: int

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._timer: Any = None
        self._stall: Any = None  # the write timeout, while writing is paused
        self._refused = False
        self._wait()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's request is not read, let alone run
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._stall):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        logger.info(
            "closing a connection whose client has not read its response for %g s", self.write_timeout
        )
        self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._wait()

    def receiving(self) -> bool:
        """Whether the connection waits for its client to send a request (its headers, or a body)."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _wait(self) -> None:
        """The client's turn begins: it has ``read_timeout`` seconds for what it is sending."""
        if self._timer is not None:
            self._timer.cancel()
        self.since = self.loop.time()
        self._timer = self.loop.call_later(self.read_timeout, self._late)

    def _late(self) -> None:
        self._timer = None
        answered = self.cycle is not None and self.cycle.response_complete
        if self.conn.their_state is h11.IDLE or (self.conn.their_state is h11.SEND_BODY and answered):
            logger.info("closing a connection whose client sent no request in %g s", self.read_timeout)
            self._close()

    def _make_room(self) -> None:
        others = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(others) < self.max_connections:
            return
        waiting = [c for c in others if isinstance(c, _LimitedH11) and c.receiving()]
        if waiting:
            oldest = min(waiting, key=lambda c: c.since)
            logger.info(
                "%d connections open: closing the one that waited longest for its request", len(others)
            )
            oldest._close()
        else:
            logger.warning(
                "%d connections open, each with a request in hand: refusing a new one", len(others)
            )
            self._refuse()

    def _refuse(self) -> None:
        """Answer 503 and close gracefully: closing with the client's request unread would reset the connection,
        and the client could lose the answer. The client closes when it has read it, or the timeout does."""
        self._refused = True
        self.transport.write(_BUSY)
        self.transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.read_timeout, self._close)

    def _close(self) -> None:
        """Close once the unsent bytes are sent. A client that does not take them within ``write_timeout`` is aborted:
        a closing transport waits for its buffer to empty, and below asyncio's high-water mark nothing else would
        ever time that wait out, so a client that never reads would hold the socket for good."""
        self.transport.close()
        if self.transport.get_write_buffer_size() and self._stall is None:
            self._stall = self.loop.call_later(self.write_timeout, self._stalled)


def protocol_class(config: ServeConfig) -> type[H11Protocol]:
    """The HTTP protocol with ``config``'s ``read_timeout``, ``write_timeout`` and ``max_connections``."""
    return type("LimitedH11", (_LimitedH11,), {"read_timeout": config.read_timeout,
                                                "write_timeout": config.write_timeout,
                                                "max_connections": config.max_connections})  # fmt: skip


def uvicorn_config(app: Starlette, **settings: Any) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (built by ``build_app``): its protocol, limits and shutdown timeout."""
    config: ServeConfig = app.state.serve.config
    return uvicorn.Config(
        app,
        http=protocol_class(config),
        timeout_graceful_shutdown=int(config.timeout) + 5,
        **{"log_level": "info", **settings},
    )


def serve(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: ServeConfig,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``model`` over HTTP until SIGTERM or Ctrl-C, then finish the admitted requests and return.

    Args:
        model: a causal LM (plain, LoRAMoE-adapted or PEFT) and
        tokenizer: its tokenizer.
        config: the server's settings.
        sock: a socket already bound by ``config.bind()`` (the command line binds it before loading the model);
            None binds one now.
    """
    sock = sock if sock is not None else config.bind()
    app = build_app(model, tokenizer, config)
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    # uvicorn's own words (it logs none for a socket it is given), which scripts read to find a --port 0 server
    logger.info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", f"[{host}]" if ":" in host else host, port
    )
    _Server(uvicorn_config(app), app.state.serve).run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, which also marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: Any, state: ServerState):
        super().__init__(config)
        self.serve_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.serve_state.draining = True
        super().handle_exit(sig, frame)
