"""``loramoe serve`` under load and shutdown: overload gets 429 and loses no request, a stream whose client leaves
is dropped from its batch, a request past its timeout gets 504, ``loramoe serve`` drains in-flight requests on
SIGTERM, and the load benchmark runs and loses nothing (slow). Shared setup: ``serve_helpers.py``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_helpers import USER, Gate, chat, running


def test_overload_gets_429_and_no_request_is_lost(adapters):
    with running(adapters["endless"], max_batch_size=1, max_queue=1, batch_wait_ms=0.0) as busy:
        client = openai.AsyncOpenAI(base_url=busy.url + "/v1", api_key="none", max_retries=0, timeout=60)
        # long enough that the first request still holds the only batch slot while the other seven arrive
        kwargs = dict(model="tiny", messages=USER, max_tokens=200, temperature=0)

        async def load():
            first = asyncio.create_task(client.chat.completions.create(**kwargs))
            # the first request is running: the queue's one slot is free
            assert await asyncio.to_thread(busy.state.batcher.wait_for, lambda b: b.running == 1, 60)
            rest = await asyncio.gather(
                *(client.chat.completions.create(**kwargs) for _ in range(7)), return_exceptions=True
            )
            return [await first, *rest]

        results = asyncio.run(load())
        answered = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(answered) >= 2 and refused and all(isinstance(e, openai.RateLimitError) for e in refused)
        assert all(r.usage.completion_tokens == 200 for r in answered)
        error = refused[0].response
        assert error.json()["error"]["type"] == "rate_limit_error" and error.headers["retry-after"] == "1"
        assert chat(busy.url, {"messages": USER, "max_tokens": 2}).status_code == 200  # and it keeps serving


def test_a_stream_whose_client_leaves_is_dropped_from_its_batch(adapters):
    with running(adapters["endless"], max_batch_size=1) as server:
        batcher = server.state.batcher
        body = {"model": "tiny", "messages": USER, "max_tokens": 400, "temperature": 0, "stream": True}
        gate = Gate(server.state.loop.model)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            next(lines)  # the role chunk
            assert next(lines).startswith("data: ")  # the first text: the request is decoding
            gate.close()  # the batch stands still at its next forward
            steps_at_leave = batcher.steps
        # the client left: the server gives up the job, which leaves the batch at the next step
        assert batcher.wait_for(lambda b: b.running == 0, 60)
        gate.open()
        assert batcher.wait_for(lambda b: b.abandoned == 1, 60)
        assert batcher.steps - steps_at_leave <= 2


def test_a_request_past_its_timeout_gets_504(adapters):
    with running(adapters["endless"], timeout=0.05, batch_wait_ms=300.0) as slow:
        response = chat(slow.url, {"messages": USER, "max_tokens": 5})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        assert slow.state.batcher.waiting == 0 and slow.state.batcher.abandoned == 1  # it left the queue


# ---- the command line and SIGTERM ------------------------------------------------------------------------------------


def test_serve_command_drains_in_flight_requests_on_sigterm(adapters):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LORAMOE_API_KEY": "k"}
    command = [sys.executable, "-m", "loramoe", "serve", "--adapter", str(adapters["endless"]), "--port", "0"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server did not start"
        url = f"http://127.0.0.1:{port}"
        body = {"model": "endless", "messages": USER, "max_tokens": 150, "temperature": 0, "stream": True}
        headers = {"Authorization": "Bearer k"}
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the request is in flight
            proc.send_signal(signal.SIGTERM)
            refused_at = None
            for _ in range(100):
                try:
                    httpx.get(url + "/health", timeout=1)
                except httpx.TransportError:
                    refused_at = time.monotonic()
                    break
                time.sleep(0.05)
            rest = [line for line in lines if line]
        assert refused_at is not None, "new connections were still accepted after SIGTERM"
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 150
        assert proc.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal after draining
        log = proc.stderr.read()
        assert "Waiting for connections to close" in log  # the stream was still open when shutdown began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_load_benchmark_runs_and_loses_nothing(tmp_path):
    """The benchmark's own smoke test (two server starts, so slow): tiny model, few clients, every phase clean."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"),
        "--tiny",
    ]
    command += [
        "--clients",
        "4",
        "--requests",
        "2",
        "--max-tokens",
        "4",
        "--batch-sizes",
        "1,4",
        "--out",
        str(out),
    ]
    subprocess.run(
        command, check=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    phases = json.loads(out.read_text())["phases"]
    assert [p["answered"] for p in phases] == [8, 8]
    assert all(not p["errors"] and not p["lost"] and not p["left_in_server"] for p in phases)
