"""``loramoe serve`` batching: concurrent greedy answers equal ``loramoe generate``, a request arriving mid-batch
joins it and streams while the batch runs, streaming and plain requests of different lengths and stops share a batch and each stop on their own, seeded and near-greedy sampling, router
statistics on demand (and refused without an adapter), the model list and health. Shared setup:
``serve_helpers.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from loramoe.cli import main

from serve_helpers import PROMPTS, USER, chat, running, save_tiny_adapter


@pytest.fixture(scope="module")
def server(adapters):
    with running(adapters["plain"]) as running_server:
        yield running_server


async def _concurrently(
    url: str, bodies: list[dict], path: str = "/v1/chat/completions"
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_concurrent_greedy_answers_equal_loramoe_generate(server, adapters, capsys):
    argv = ["generate", "--adapter", str(adapters["plain"]), "--jsonl", "--max-new-tokens", "16"]
    assert main([*argv, *(arg for p in PROMPTS for arg in ("--prompt", p))]) == 0
    expected = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    joins_before = server.state.batcher.joins
    bodies = [
        {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 16, "temperature": 0}
        for p in PROMPTS
    ]
    responses = asyncio.run(_concurrently(server.url, bodies))
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected
    assert server.state.batcher.joins - joins_before < len(PROMPTS)  # some requests were prefilled together
    reasons = {r.json()["choices"][0]["finish_reason"] for r in responses}
    assert reasons == {
        "stop",
        "length",
    }  # the batch had rows ending at an end token and rows running to the limit


def test_a_request_arriving_mid_batch_gets_its_first_token_while_the_batch_runs(tmp_path):
    """Continuous batching: a request sent while another decodes joins its batch and streams its first token while
    the first one is still unanswered (it runs to 4,000 tokens on this model unless its client leaves)."""
    long = save_tiny_adapter(tmp_path, "long", end_scale=0.0, positions=4096)
    with running(long, max_batch_size=4, max_tokens=4000) as server:
        batcher = server.state.batcher
        body = {"model": "tiny", "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as first:
            assert first.status_code == 200
            assert batcher.wait_for(lambda b: b.running == 1 and b.steps > 0, 60)  # the first one is decoding
            joins = batcher.joins
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as second:
                assert second.status_code == 200
                second_lines = second.iter_lines()  # kept: an abandoned line iterator closes its connection
                assert _first_text(second_lines)
                assert batcher.running == 2 and batcher.joins == joins + 1  # joined the batch still running
            assert _first_text(first.iter_lines())  # and the first one carries on
        assert batcher.wait_for(lambda b: b.running == 0, 60)  # both clients left; their rows left the batch


def _first_text(lines: Iterator[str]) -> str:
    """The first non-empty content delta of a chat stream's lines."""
    for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended without content")


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
