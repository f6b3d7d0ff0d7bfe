"""``loramoe serve`` against real clients: a uvicorn server on a free loopback port, the official ``openai`` client
and raw HTTP (httpx), on a tiny LoRAMoE adapter saved to disk and loaded the way ``loramoe generate`` loads it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from loramoe import LoRAMoEConfig, adapted_modules, inject, save_adapter
from loramoe.cli import main
from loramoe.inference.generate import encode_chat, encode_prompt, stop_token_ids
from loramoe.models.base import load_base
from loramoe.models.trained import load_trained
from loramoe.serve.app import build_app
from loramoe.serve.config import ServeConfig
from loramoe.serve.decode import TextStream

from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Hello there", "A much longer prompt, to force left padding in a batch", "x", "What is 2+2?"]


def _save_adapter(root: Path, name: str, *, end_scale: float) -> Path:
    """A tiny llama base and a LoRAMoE adapter with random experts and routers. ``end_scale`` scales the end
    tokens' rows of the output layer: 2 makes some answers end early, 0 makes every answer run to ``max_tokens``."""
    base = root / f"{name}-base"
    model = tiny_model("llama", max_position_embeddings=512)
    tokenizer = tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[stop_token_ids(model, tokenizer)] *= end_scale
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


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {
        "plain": _save_adapter(root, "plain", end_scale=2.0),
        "endless": _save_adapter(root, "endless", end_scale=0.0),
    }


class Running:
    """A server started on a background thread; ``url`` is its base URL."""

    def __init__(self, app, sock: socket.socket):
        self.app, self.state = app, app.state.serve
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def running(adapter: Path | None, base: str | None = None, **settings):
    model, tokenizer = load_trained(adapter, base=base)
    config = ServeConfig(model_name="tiny", **{"batch_wait_ms": 100.0, **settings})
    sock = socket.socket()
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


@pytest.fixture(scope="module")
def server(adapters):
    with running(adapters["plain"]) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def guarded(adapters):
    with running(adapters["plain"], api_key="s3cret-key") as running_server:
        yield running_server


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


# ---- the OpenAI client -------------------------------------------------------------------------------------------


def test_chat_completion_with_the_openai_client(server):
    tokenizer = server.state.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reply = server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(encode_chat(tokenizer, messages))
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_with_the_openai_client(server):
    reply = server.client().completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and isinstance(reply.choices[0].text, str)
    assert reply.usage.prompt_tokens == len(encode_prompt(server.state.tokenizer, "Once upon"))
    assert reply.usage.completion_tokens <= 6


def test_streamed_chat_joins_to_the_same_answer_as_unstreamed(server):
    client = server.client()
    kwargs = dict(
        model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=12, temperature=0
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert (
        chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    )  # include_usage: a last usage-only chunk
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_format_of_a_streamed_completion(server):
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    plain = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["usage"] == plain["usage"]


# ---- batching and equality with `loramoe generate` ----------------------------------------------------------------


async def _concurrently(
    url: str, bodies: list[dict], path: str = "/v1/chat/completions"
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_concurrent_greedy_answers_equal_loramoe_generate(server, adapters, capsys):
    argv = ["generate", "--adapter", str(adapters["plain"]), "--jsonl", "--max-new-tokens", "16"]
    assert main([*argv, *(arg for p in PROMPTS for arg in ("--prompt", p))]) == 0
    expected = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    batches_before = server.state.batcher.batches
    bodies = [
        {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 16, "temperature": 0}
        for p in PROMPTS
    ]
    responses = asyncio.run(_concurrently(server.url, bodies))
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected
    assert server.state.batcher.batches - batches_before < len(PROMPTS)  # some requests shared a forward
    reasons = {r.json()["choices"][0]["finish_reason"] for r in responses}
    assert reasons == {
        "stop",
        "length",
    }  # the batch had rows ending at an end token and rows running to the limit


def test_streaming_and_plain_requests_in_one_batch_each_stop_on_their_own(server):
    """Different lengths, stop strings and stream modes share a batch; each answer equals the one it gets alone."""
    long_prompt = [{"role": "user", "content": PROMPTS[1]}]  # runs to max_tokens on this model
    short_prompt = [{"role": "user", "content": PROMPTS[0]}]  # ends at an end token on this model
    alone = chat(server.url, {"messages": long_prompt, "max_tokens": 12, "temperature": 0}).json()
    text = alone["choices"][0]["message"]["content"]
    assert alone["choices"][0]["finish_reason"] == "length" and len(text) > 6
    stop = text[4:6]
    bodies = [
        {"messages": long_prompt, "max_tokens": 12, "temperature": 0},
        {"messages": long_prompt, "max_tokens": 3, "temperature": 0},
        {"messages": long_prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]},
        {"messages": short_prompt, "max_tokens": 12, "temperature": 0, "stream": True},
    ]
    responses = asyncio.run(_concurrently(server.url, [{"model": "tiny", **b} for b in bodies]))
    full, short, stopped = (r.json()["choices"][0] for r in responses[:3])
    assert full["message"]["content"] == text
    assert short["finish_reason"] == "length" and responses[1].json()["usage"]["completion_tokens"] == 3
    assert (
        stopped["finish_reason"] == "stop"
        and stopped["message"]["content"] == text[: text.index(stop)].strip()
    )
    events = [
        json.loads(line[6:]) for line in responses[3].text.splitlines() if line and line != "data: [DONE]"
    ]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    alone_short = chat(server.url, {"messages": short_prompt, "max_tokens": 12, "temperature": 0}).json()
    assert events[-1]["choices"][0]["finish_reason"] == alone_short["choices"][0]["finish_reason"] == "stop"
    assert streamed == alone_short["choices"][0]["message"]["content"]


def test_a_seed_makes_sampling_repeatable(server):
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 10,
        "temperature": 1.0,
        "top_p": 0.9,
    }
    first, second = (chat(server.url, {**body, "seed": 7}).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_a_tiny_temperature_samples_like_greedy(server):
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8}
    greedy = chat(server.url, {**body, "temperature": 0}).json()["choices"][0]["message"]["content"]
    nearly = chat(server.url, {**body, "temperature": 1e-40, "seed": 3})
    assert nearly.status_code == 200 and nearly.json()["choices"][0]["message"]["content"] == greedy


def test_router_stats_on_demand(server):
    client = server.client()
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0)
    assert "router_stats" not in (client.chat.completions.create(**kwargs).model_extra or {})
    stats = client.chat.completions.create(**kwargs, extra_body={"router_stats": True}).model_extra[
        "router_stats"
    ]
    assert stats["groups"] == ["downstream", "knowledge"] and stats["layers"] == 6  # 2 blocks x 3 FFN linears
    for part in ("prompt", "completion"):
        assert sum(stats[part]["group_mass"].values()) == pytest.approx(1.0, abs=1e-5)
        assert len(stats[part]["expert_mass"]) == 4 and sum(stats[part]["expert_mass"]) == pytest.approx(
            1.0, abs=1e-5
        )
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body={"router_stats": True}))
    assert chunks[-1].model_extra["router_stats"]["groups"] == ["downstream", "knowledge"]


def test_a_base_model_alone_is_served_and_router_stats_need_an_adapter(adapters):
    with running(None, base=str(adapters["plain"].parent / "plain-base")) as plain:
        body = {"messages": USER, "max_tokens": 3, "temperature": 0}
        assert chat(plain.url, body).json()["usage"]["completion_tokens"] <= 3
        refused = chat(plain.url, {**body, "router_stats": True})
        assert refused.status_code == 400 and "no LoRAMoE layers" in refused.json()["error"]["message"]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


# ---- auth and bad requests ------------------------------------------------------------------------------------------


def test_api_key_is_required_when_set(guarded):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong-key").chat.completions.create(**kwargs)
    anonymous = chat(guarded.url, {"messages": [{"role": "user", "content": "Hi"}]})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert guarded.client("s3cret-key").chat.completions.create(**kwargs).choices[0].message is not None
    assert httpx.get(guarded.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(guarded.url + "/v1/models").status_code == 401


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAMOE_API_KEY", "from-env")
    assert ServeConfig().api_key == "from-env"
    assert ServeConfig(api_key="given").api_key == "given"


USER = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, None, "must be a JSON object"),
    "NaN": (b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, None, "NaN"),
    "missing messages": ({}, 400, "messages", "required"),
    "empty messages": ({"messages": []}, 400, "messages", "at least 1"),
    "messages not a list": ({"messages": "Hi"}, 400, "messages", "valid list"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages", "valid string"),
    "unknown role": ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages", "'user'"),
    "temperature a string": ({"messages": USER, "temperature": "hot"}, 400, "temperature", "valid number"),
    "temperature too high": (
        {"messages": USER, "temperature": 3},
        400,
        "temperature",
        "less than or equal to 2",
    ),
    "max_tokens a float": ({"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", "valid integer"),
    "max_tokens a boolean": ({"messages": USER, "max_tokens": True}, 400, "max_tokens", "valid integer"),
    "max_tokens zero": ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    "max_tokens over the limit": ({"messages": USER, "max_tokens": 100}, 400, "max_tokens", "at most 64"),
    "unknown field": (
        {"messages": USER, "tempreature": 0.5},
        400,
        "tempreature",
        "Unrecognized request argument",
    ),
    "n above 1": ({"messages": USER, "n": 2}, 400, "n", "Input should be 1"),
    "tools": ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    "a penalty": ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    "too many stops": ({"messages": USER, "stop": list("abcde")}, 400, "stop", "at most 4"),
    "prompt over the limit": (
        {"messages": [{"role": "user", "content": "x" * 300}]},
        400,
        "messages",
        "at most 200",
    ),
    "unknown model": ({"model": "gpt-4", "messages": USER}, 404, "model", "does not exist"),
    "body too large": ({"messages": [{"role": "user", "content": "x" * 5000}]}, 413, None, "over 4000 bytes"),
}


@pytest.fixture(scope="module")
def strict(adapters):
    with running(
        adapters["plain"], max_tokens=64, max_prompt_tokens=200, max_body_bytes=4000
    ) as running_server:
        yield running_server


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(strict, case):
    body, status, param, words = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps({"model": "tiny", **body}).encode()
    response = httpx.post(
        strict.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    ok = chat(strict.url, {"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_routes_and_methods_get_openai_shaped_errors(strict):
    missing = httpx.post(strict.url + "/v1/embeddings", json={})
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    wrong = httpx.get(strict.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_a_completion_prompt_list_of_several_is_refused(strict):
    body = {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2}
    response = httpx.post(strict.url + "/v1/completions", json=body)
    assert response.status_code == 400 and "one per request" in response.json()["error"]["message"]


# ---- overload, timeout -----------------------------------------------------------------------------------------------


def test_overload_gets_429_and_no_request_is_lost(adapters):
    with running(adapters["endless"], max_batch_size=1, max_queue=1, batch_wait_ms=0.0) as busy:
        client = openai.AsyncOpenAI(base_url=busy.url + "/v1", api_key="none", max_retries=0, timeout=60)
        kwargs = dict(model="tiny", messages=USER, max_tokens=40, temperature=0)

        async def load():
            return await asyncio.gather(
                *(client.chat.completions.create(**kwargs) for _ in range(8)), return_exceptions=True
            )

        results = asyncio.run(load())
        answered = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(answered) >= 2 and refused and all(isinstance(e, openai.RateLimitError) for e in refused)
        assert all(r.usage.completion_tokens == 40 for r in answered)
        error = refused[0].response
        assert error.json()["error"]["type"] == "rate_limit_error" and error.headers["retry-after"] == "1"
        assert chat(busy.url, {"messages": USER, "max_tokens": 2}).status_code == 200  # and it keeps serving


def test_a_stream_whose_client_leaves_is_dropped_from_its_batch(adapters):
    with running(adapters["endless"], max_batch_size=1) as server:
        body = {"model": "tiny", "messages": USER, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            next(response.iter_lines())
            deadline = time.monotonic() + 60
            while (
                not server.state.batcher._batch and time.monotonic() < deadline
            ):  # wait until its batch runs
                time.sleep(0.01)
            job = server.state.batcher._batch[0]
        while server.state.batcher._batch and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.cancelled and not job.done  # it left the batch without running to its 400 tokens


def test_a_request_past_its_timeout_gets_504(adapters):
    with running(adapters["endless"], timeout=0.05, batch_wait_ms=300.0) as slow:
        response = chat(slow.url, {"messages": USER, "max_tokens": 5})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        assert slow.state.batcher.waiting == 0  # the timed-out request left the queue


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


# ---- text streaming ------------------------------------------------------------------------------------------------


class _CharTokenizer:
    """Decodes ids as characters (for TextStream tests without a real vocabulary)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("  Hello world  ", (), "Hello world"),
        ("Hello\nUser: hi", ("\nUser:",), "Hello"),
        ("a ab abc", ("abc",), "a ab"),
    ],
)
def test_text_stream_deltas_join_to_the_final_text(text, stop, expected):
    stream, sent = TextStream(_CharTokenizer(), stop), []
    ids = [ord(c) for c in text]
    for k in range(1, len(ids) + 1):
        sent.append(stream.update(ids[:k], final=k == len(ids)))
        if stream.stopped:
            break
    assert "".join(sent) == stream.text == expected


def test_a_cancelled_sequence_leaves_its_batch_and_the_others_finish(adapters):
    from loramoe.inference.generate import padding_id
    from loramoe.serve.decode import Decoder, Generation, Sampling

    model, tokenizer = load_trained(adapters["endless"])
    stops = stop_token_ids(model, tokenizer)
    decoder = Decoder(model, tokenizer, stops, padding_id(tokenizer, stops))
    finished = {}
    gens = [
        Generation(
            encode_chat(tokenizer, [{"role": "user", "content": prompt}]),
            Sampling(max_tokens=20),
            on_text=lambda text: None,
            on_finish=lambda f, i=i: finished.setdefault(i, f),
        )
        for i, prompt in enumerate(PROMPTS[:2])
    ]
    gens[0].cancelled = lambda: len(gens[0].ids) >= 3  # its client leaves after three tokens
    decoder.run(gens)
    assert 0 not in finished and len(gens[0].ids) == 3
    assert finished[1].completion_tokens == 20 and finished[1].reason == "length"


@pytest.mark.slow
def test_the_load_benchmark_runs_and_loses_nothing(tmp_path):
    """The benchmark's own smoke test (two server starts, so slow): tiny model, few clients, every phase clean."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "benchmarks" / "serve_bench.py"),
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


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mistral", "gemma3_text", "phi3"])
def test_batched_decoding_equals_generate_on_each_architecture(model_type):
    """Left padding, the KV cache and rows leaving the batch early, against ``generate`` on the same prompts."""
    from loramoe.inference.generate import generate, padding_id
    from loramoe.serve.decode import Decoder, Generation, Sampling

    model = inject(tiny_model(model_type), LoRAMoEConfig(num_experts=2, rank=2, dropout=0.0))
    tokenizer = tiny_tokenizer()
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=10, progress=False)
    short = generate(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    stops = stop_token_ids(model, tokenizer)
    decoder = Decoder(model, tokenizer, stops, padding_id(tokenizer, stops))
    got = {}
    decoder.run(
        [
            Generation(
                encode_chat(tokenizer, [{"role": "user", "content": prompt}]),
                Sampling(max_tokens=4 if i % 2 else 10),  # every second row leaves the batch early
                on_text=lambda text: None,
                on_finish=lambda f, i=i: got.setdefault(i, f.text),
            )
            for i, prompt in enumerate(PROMPTS)
        ]
    )
    assert [got[i] for i in range(len(PROMPTS))] == [
        short[i] if i % 2 else expected[i] for i in range(len(PROMPTS))
    ]
