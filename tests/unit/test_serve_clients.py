"""``loramoe serve`` with the official ``openai`` client: chat and text completions, a streamed chat that joins to
the unstreamed answer, and the raw server-sent event format of a streamed completion. Shared setup:
``serve_helpers.py``."""

from __future__ import annotations

import json

import httpx
import pytest

from loramoe.inference.encoding import encode_chat, encode_prompt

from serve_helpers import running, sse_events


@pytest.fixture(scope="module")
def server(adapters):
    with running(adapters["plain"]) as running_server:
        yield running_server


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
