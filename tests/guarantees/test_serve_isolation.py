"""One request never harms its batch: sampling values that decoding cannot use (a seed past torch's range, a
temperature or top-p that rounds to 0 in float32, a penalty that overflows it), text that is not valid Unicode and
JSON nested without end are 400s naming the field, while the requests decoded beside them get the tokens they get
alone; in the token loop, a row whose sampling or answering fails ends alone. Shared setup: ``serve_helpers.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx

from loramoe.inference.encoding import encode_chat
from loramoe.inference.loop import Request, RequestFailed, TokenLoop
from loramoe.inference.sampling import Sampling
from loramoe.models.trained import load_trained

from serve_helpers import PROMPTS, running


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _body(prompt: str, **settings) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "return_token_ids": True,
        **settings,
    }


# Each passes the JSON types and the documented ranges, and would break sampling if it reached the decoder.
BAD_SAMPLING = {
    "seed past 2**64": ({"seed": 2**64, "temperature": 1.0}, "seed", "less than or equal to"),
    "seed below -2**63": ({"seed": -(2**63) - 1, "temperature": 1.0}, "seed", "greater than or equal to"),
    "temperature under float32": ({"temperature": 1e-50}, "temperature", "rounds to 0 in float32"),
    "top_p under float32": ({"temperature": 1.0, "top_p": 1e-50}, "top_p", "rounds to 0 in float32"),
    "penalty over float32": ({"repetition_penalty": 1e300}, "repetition_penalty", "rounds to infinity"),
    "penalty under float32": ({"repetition_penalty": 1e-300}, "repetition_penalty", "rounds to 0"),
}
NOT_JSON_WE_TAKE = {
    "nested past the parser": (b"[" * 100_000 + b"]" * 100_000, None, "nested deeper than 32 levels"),
    "nested in a field": (
        json.dumps(_body("x") | {"response_format": {"type": _nested(40)}}),
        None,
        "nested deeper than 32 levels (at response_format.type.0.0",
    ),
    "lone surrogate in a message": (
        json.dumps(_body("a\ud800b")),
        "messages",
        "messages.0.content: the text holds a lone surrogate (\\ud800)",
    ),
    "lone surrogate in a key": (
        json.dumps(_body("x") | {"\udfff": 1}),
        "\\udfff",
        "lone surrogate (\\udfff)",
    ),
}


def test_bad_requests_in_a_batch_get_400_and_the_others_their_own_tokens(adapters):
    good = [
        _body(PROMPTS[0], temperature=0.9, top_p=0.95, seed=11),
        _body(PROMPTS[1], temperature=0),
        _body(PROMPTS[3], temperature=1.3, top_k=5, repetition_penalty=1.2, seed=2**64 - 1),
        _body(PROMPTS[2], temperature=0.7, top_k=10**30, seed=-3),  # a top_k past the vocabulary keeps all
    ]
    bad = [_body(PROMPTS[2], **settings) for settings, _, _ in BAD_SAMPLING.values()]
    raw = [content for content, _, _ in NOT_JSON_WE_TAKE.values()]
    with running(adapters["plain"], batch_wait_ms=300.0) as server:
        alone = [httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60).json() for b in good]

        async def together():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                sends = [client.post("/v1/chat/completions", json=b) for b in [*good, *bad]]
                sends += [
                    client.post(
                        "/v1/chat/completions", content=c, headers={"content-type": "application/json"}
                    )
                    for c in raw
                ]
                return await asyncio.gather(*sends)

        joins = server.state.batcher.joins
        responses = asyncio.run(together())
        assert server.state.batcher.joins - joins < len(good)  # the good ones shared a batch
    for response, expected in zip(responses, alone):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]
    refusals = list(BAD_SAMPLING.values()) + list(NOT_JSON_WE_TAKE.values())
    for response, (_, param, words) in zip(responses[len(good) :], refusals):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error"
        assert param is None or error["param"] == param


def _requests(tokenizer, settings: list[Sampling]) -> tuple[list[Request], dict, dict]:
    finished, failed = {}, {}
    requests = [
        Request(
            encode_chat(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]),
            s,
            on_finish=lambda f, i=i: finished.setdefault(i, f.token_ids),
            on_error=lambda err, i=i: failed.setdefault(i, err),
        )
        for i, s in enumerate(settings)
    ]
    return requests, finished, failed


def _raise(text: str) -> None:
    raise ConnectionResetError("the client is gone")


def test_a_row_whose_sampling_or_answering_fails_ends_alone_in_the_token_loop(adapters):
    """Faults injected past validation: a temperature that is not a number (as if it had escaped the checks) and
    an answer callback that raises. The other rows, sampled with their seeds, keep the tokens they get alone."""
    model, tokenizer = load_trained(adapters["endless"])
    loop = TokenLoop(model, tokenizer)
    settings = [
        Sampling(max_tokens=12, temperature=0.8, seed=5),
        Sampling(max_tokens=12, temperature=0.8, seed=6),
        Sampling(max_tokens=12, temperature=1.1, top_p=0.9, seed=7),
        Sampling(max_tokens=12, temperature=1.0, seed=8),
        Sampling(max_tokens=12),
    ]
    object.__setattr__(settings[1], "temperature", "hot")  # frozen and validated: only a fault gets this in
    requests, finished, failed = _requests(tokenizer, settings)
    requests[3].on_text = _raise
    loop.run(requests, batch_size=len(requests))
    assert sorted(failed) == [1, 3] and all(isinstance(e, RequestFailed) for e in failed.values())
    assert "choosing this request's next token failed" in str(failed[1])
    assert "ConnectionResetError" in str(failed[3])
    for i in (0, 2, 4):
        single, alone, _ = _requests(tokenizer, [dataclasses.replace(settings[i])])
        single[0].prompt_ids = requests[i].prompt_ids
        loop.run(single, batch_size=1)
        assert finished[i] == alone[0] and len(alone[0]) == 12
