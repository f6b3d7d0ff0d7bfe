"""``loramoe serve`` never waits forever: a plain request whose client hangs up leaves its batch, slow headers and
slow bodies time out, a stream whose client stops reading is given up, so is an idle connection with responses
unread, idle sockets cannot starve ``/health``, every flag is checked before the model loads, and a
dead decoding thread fails ``/health`` and every request at once. Shared setup: ``serve_helpers.py``."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loramoe.cli import main

from serve_helpers import USER, Gate, chat, running, save_tiny_adapter


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing ``sock``; fails when it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:  # closed with bytes of ours unread
        pass
    return received


def test_a_plain_request_whose_client_hangs_up_leaves_its_batch(adapters):
    with running(adapters["endless"], max_batch_size=1) as server:
        batcher = server.state.batcher
        sock = _connect(server.url)
        body = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}'
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        gate = Gate(server.state.loop.model)
        assert batcher.wait_for(lambda b: b.running == 1, 30)  # it is decoding
        gate.close()  # the batch stands still at its next forward
        steps = batcher.steps
        sock.close()
        assert batcher.wait_for(
            lambda b: b.running == 0, 30
        )  # the server saw the hang-up and gave up the job
        gate.open()
        assert batcher.wait_for(lambda b: b.abandoned == 1, 30)  # and the job left the batch
        assert batcher.steps - steps <= 2  # the step in flight when the gate closed, and the one it held
        assert httpx.get(server.url + "/health").json()["abandoned"] == 1


def test_slow_headers_and_slow_bodies_time_out(adapters):
    with running(adapters["plain"], read_timeout=0.5) as server:
        silent, dripping, slow_body = (_connect(server.url) for _ in range(3))
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s: never a whole header
            try:
                dripping.sendall(bytes([byte]))
            except OSError:  # the server closed it
                break
            time.sleep(0.1)
        assert time.monotonic() - started < 2.5  # sending every byte would take 3.1 s
        assert _closed_within(silent, 5) == b""
        assert _closed_within(dripping, 5) == b""
        answer = _closed_within(slow_body, 5)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer
        assert time.monotonic() - started < 5
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_stream_whose_client_stops_reading_is_given_up_after_the_write_timeout(tmp_path):
    # Greedy answers run to max_tokens, one printable character a token: one event a token, which the longest model
    # name makes about 470 bytes. With both kernel buffers this small, about 72 KB (asyncio's 64 KiB above them)
    # fill what lies between the stream and the client, some 160 tokens, well before max_tokens; with the kernel's
    # own buffers (autotuned up to 4 MB on loopback) it would take megabytes.
    adapter = save_tiny_adapter(tmp_path, "long", end_scale=0.0, readable=True, positions=2048)
    name, max_tokens = "x" * 256, 2000
    settings = dict(model_name=name, max_batch_size=1, max_tokens=max_tokens, write_timeout=0.5)
    with running(adapter, send_buffer=4096, **settings) as server:
        batcher = server.state.batcher
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: it sets the window
        sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        body = {"model": name, "messages": USER, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        content = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(content), content)
        )
        assert batcher.wait_for(lambda b: b.running == 1, 30)  # it is decoding; the client never reads
        # The server closes the connection and gives up the job, which leaves the batch unanswered (abandoned
        # counts only those: a job that ran to max_tokens would not count).
        assert batcher.wait_for(lambda b: b.abandoned == 1 and b.running == 0, 30), batcher.steps
        assert batcher.steps < max_tokens
        _closed_within(sock, 5)
        health = httpx.get(server.url + "/health").json()
        assert health["abandoned"] == 1 and health["running"] == 0
        ok = chat(server.url, {"model": name, "messages": USER, "max_tokens": 2})
        assert ok.status_code == 200


def test_an_idle_connection_closed_with_responses_unread_is_aborted_after_the_write_timeout(adapters):
    # Pipelined requests whose responses the client never reads, about 40 KB: more than both kernel buffers hold at
    # 4096 bytes, less than asyncio's 64 KiB high-water mark, so writing never pauses and only the idle timeout
    # closes the connection; closing waits for unsent bytes, which this client never takes.
    with running(adapters["plain"], send_buffer=4096, read_timeout=0.5, write_timeout=0.5) as server:
        connections = server.server.server_state.connections
        one = httpx.get(server.url + "/health")
        size = len(one.content) + sum(len(k) + len(v) + 4 for k, v in one.headers.raw) + 20
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * (40_000 // size))
        deadline = time.monotonic() + 10
        while connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not connections  # read_timeout, then write_timeout: about 1 s
        assert httpx.get(server.url + "/health").status_code == 200
        sock.close()


def test_idle_sockets_do_not_starve_health(adapters):
    """Three times ``max_connections`` sockets that never finish a request: each new connection closes the one
    that waited longest, so the health probe, which sends its request at once, is answered."""
    with running(adapters["plain"], max_connections=20) as server:
        idle = [_connect(server.url) for _ in range(60)]
        for sock in idle[::2]:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # half a request
        started = time.monotonic()
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200 and time.monotonic() - started < 5
        assert chat(server.url, {"messages": USER, "max_tokens": 2}).status_code == 200
        assert all(_closed_within(sock, 5) == b"" for sock in idle[:40])  # never more than 20 open
        for sock in idle:
            sock.close()


def test_a_new_connection_gets_503_when_every_connection_has_a_request_in_hand(adapters):
    with running(adapters["plain"], max_connections=2) as server:
        gate = Gate(server.state.loop.model)
        gate.close()  # the requests stay in hand
        body = {"messages": USER, "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(chat, server.url, body) for _ in range(2)]
            assert server.state.batcher.wait_for(lambda b: b.running + b.waiting == 2, 30)
            refused = httpx.get(server.url + "/health")
            gate.open()
            assert [f.result().status_code for f in held] == [200, 200]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
        assert httpx.get(server.url + "/health").status_code == 200  # answered: room again


BAD_FLAGS = {
    "a batch wait that overflows a wait": (
        ["--batch-wait-ms", "1e13"],
        "--batch-wait-ms must be a number in",
    ),
    "a queue that refuses everything": (["--max-queue", "0"], "--max-queue must be an integer in 1.."),
    "a blank key": (["--api-key", "  "], "--api-key must be printable ASCII without spaces"),
    "a key with a space": (["--api-key", "my key"], "--api-key must be printable ASCII without spaces"),
    "an address of another machine": (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:0 (Cannot assign"),
    "a host name with spaces": (["--host", "no such host"], "host 'no such host': not an address"),
    "an endless timeout": (["--timeout", "inf"], "--timeout must be a number in (0, 86400]"),
    "no read timeout": (["--read-timeout", "0"], "--read-timeout must be a number in [0.1, 3600]"),
    "no write timeout": (["--write-timeout", "0"], "--write-timeout must be a number in [0.1, 3600]"),
    "a body limit no request fits in": (
        ["--max-body-bytes", "10"],
        "--max-body-bytes must be an integer in 1024..",
    ),
    "a model name with a newline": (["--model-name", "a\nb"], "--model-name must be printable text"),
    "more connections than files": (["--max-connections", "999999"], "more connections than this process"),
    "a port out of range": (["--port", "70000"], "--port must be an integer in 0..65535"),
    "a batch of none": (["--max-batch-size", "0"], "--max-batch-size must be an integer in 1..4096"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_each_bad_flag_is_one_line_and_exit_2_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_API_KEY", raising=False)
    flags, words = BAD_FLAGS[case]
    # The adapter does not exist: an error about anything but the flag would mean the model was loaded first.
    assert main(["serve", "--adapter", str(tmp_path / "missing"), "--port", "0", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "missing" not in lines[0], lines


def test_a_blank_key_in_the_environment_and_a_busy_port_are_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("LORAMOE_API_KEY", " ")
    assert main(["serve", "--adapter", str(tmp_path / "missing")]) == 2
    assert "$LORAMOE_API_KEY must be printable ASCII" in capsys.readouterr().err
    monkeypatch.delenv("LORAMOE_API_KEY")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--adapter", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


class _Fatal(BaseException):
    """Escapes every ``except Exception``, as a bug in the decoding thread itself would."""


def test_a_dead_decoding_thread_fails_health_and_every_request_at_once(adapters):
    with running(adapters["plain"], timeout=300.0) as server:
        fault: list[BaseException] = []

        def forward_fails(module, args, kwargs):
            if fault:
                raise fault.pop()

        server.state.loop.model.register_forward_pre_hook(forward_fails, with_kwargs=True)
        # A forward that raises fails the requests it ran, and the server carries on.
        fault.append(RuntimeError("out of memory"))
        failed = chat(server.url, {"messages": USER, "max_tokens": 2})
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 200
        assert chat(server.url, {"messages": USER, "max_tokens": 2}).status_code == 200
        # Something that ends the thread: the request in flight and every later one get 503 at once.
        fault.append(_Fatal("the decoder broke"))
        started = time.monotonic()
        in_flight = chat(server.url, {"messages": USER, "max_tokens": 2})
        assert in_flight.status_code == 503 and "the decoding thread stopped" in in_flight.text
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "decoder stopped"
        assert "_Fatal: the decoder broke" in health.json()["error"]
        later = chat(server.url, {"messages": USER, "max_tokens": 2})
        assert later.status_code == 503 and later.json()["error"]["code"] == "decoder_stopped"
        assert time.monotonic() - started < 10  # not the 300 s timeout
        assert not server.state.batcher.alive
