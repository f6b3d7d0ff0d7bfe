"""What the ``test_serve_*`` modules share: a tiny LoRAMoE adapter pair saved to disk, a uvicorn server on a free
loopback port serving one of them (loaded the way ``loramoe generate`` loads it), and raw HTTP helpers.

Those modules test ``loramoe serve`` against real clients (the official ``openai`` client and raw HTTP, httpx):
``test_serve_clients`` (the OpenAI client, server-sent events), ``test_serve_batching`` (batching and equality with
``loramoe generate``) and ``test_serve_decoding`` (text streaming and the batched decoder) in ``unit/``;
``test_serve_bad_requests`` (auth and bad requests), ``test_serve_isolation`` (one request never harms its batch),
``test_serve_overload`` (overload, timeouts, SIGTERM, the load benchmark) and ``test_serve_never_waits`` (hang-ups,
slow clients, idle sockets, bad flags, a dead decoder) in ``guarantees/``. The server runs with ``serve``'s own
uvicorn settings (``uvicorn_config``: its protocol, timeouts and connection limit).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import torch
import uvicorn

from loramoe import LoRAMoEConfig, adapted_modules, inject, save_adapter
from loramoe.inference.encoding import stop_token_ids
from loramoe.models.base import load_base
from loramoe.models.trained import load_trained
from loramoe.serve.app import build_app
from loramoe.serve.config import ServeConfig
from loramoe.serve.server import uvicorn_config

from tiny import tiny_model, tiny_tokenizer

USER = [{"role": "user", "content": "Hi"}]
PROMPTS = ["Hello there", "A much longer prompt, to force left padding in a batch", "x", "What is 2+2?"]


def save_tiny_adapter(
    root: Path,
    name: str,
    *,
    end_scale: float,
    model_type: str = "llama",
    readable: bool = False,
    positions: int = 512,
) -> Path:
    """A tiny base of ``model_type`` and a LoRAMoE adapter with random experts and routers. ``end_scale`` scales
    the end tokens' rows of the output layer: 2 makes some answers end early, 0 makes every answer run to
    ``max_tokens``. ``readable`` zeroes the output rows of every other token that is not one printable ASCII
    character, so answers are text (not replacement characters) and a stop string can be taken from them.
    ``positions`` is the model's context."""
    base = root / f"{name}-base"
    context = {"n_positions" if model_type == "gpt2" else "max_position_embeddings": positions}
    model = tiny_model(model_type, **context)
    tokenizer = tiny_tokenizer()
    with torch.no_grad():
        stops = stop_token_ids(model, tokenizer)
        if readable:
            vocab = model.lm_head.weight.shape[0]
            unreadable = [i for i in range(vocab) if i not in stops and not _printable(tokenizer, i)]
            model.lm_head.weight[unreadable] = 0.0
        model.lm_head.weight[stops] *= end_scale
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, _ = load_base(str(base))
    torch.manual_seed(1)
    inject(model, LoRAMoEConfig(num_experts=4, rank=2, dropout=0.0))
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            layer.loramoe_B.normal_(std=0.3)
            layer.loramoe_router.normal_(std=1.0)
    return save_adapter(model, root / name)


def _printable(tokenizer, token_id: int) -> bool:
    text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
    return len(text) == 1 and text.isascii() and text.isprintable()


def make_adapters(tmp_path_factory) -> dict[str, Path]:
    """``plain`` (some answers end early) and ``endless`` (every answer runs to ``max_tokens``), on their bases.
    The ``adapters`` fixture (``conftest.py``) builds them once for every serving test."""
    root = tmp_path_factory.mktemp("serve")
    return {
        "plain": save_tiny_adapter(root, "plain", end_scale=2.0),
        "endless": save_tiny_adapter(root, "endless", end_scale=0.0),
    }


class Gate:
    """Holds a model's forwards while closed, so a test can act on the server while its batch stands still (the
    decoding thread waits in its next forward; nothing else is held)."""

    def __init__(self, model):
        self._open = threading.Event()
        self._open.set()
        model.register_forward_pre_hook(self._wait)

    def _wait(self, module, args) -> None:
        self._open.wait(60)

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


class Running:
    """A server started on a background thread; ``url`` is its base URL."""

    def __init__(self, app, sock: socket.socket):
        self.app, self.state = app, app.state.serve
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def running(
    adapter: Path | None,
    base: str | None = None,
    quantization: str | None = None,
    send_buffer: int | None = None,
    **settings,
):
    """A server with ``settings`` (``ServeConfig``'s); ``send_buffer`` sets the kernel's send buffer of each
    connection it accepts (the listening socket's, which they inherit), so a test can fill it with little data."""
    model, tokenizer = load_trained(adapter, base=base, quantization=quantization)
    config = ServeConfig(**{"model_name": "tiny", "batch_wait_ms": 100.0, **settings})
    sock = socket.socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    server = Running(build_app(model, tokenizer, config), sock)
    server.thread.start()
    deadline = time.monotonic() + 30
    while not server.server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.server.should_exit = True
        server.thread.join(30)


def chat(url: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=60, **kwargs)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            events.append(line[len("data: ") :])
    return events
