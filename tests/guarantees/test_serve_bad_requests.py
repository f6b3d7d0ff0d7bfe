"""``loramoe serve`` auth and bad requests: the API key (given or from the environment), and every malformed,
out-of-range or unsupported request gets a clear OpenAI-shaped 4xx while the server keeps serving. Shared setup:
``serve_helpers.py``."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from loramoe.serve.config import ServeConfig
from loramoe.serve.protocol import MAX_STOP_CHARS

from serve_helpers import USER, chat, running


@pytest.fixture(scope="module")
def guarded(adapters):
    with running(adapters["plain"], api_key="s3cret-key") as running_server:
        yield running_server


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


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, None, "must be a JSON object"),
    "NaN": (b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, None, "NaN"),
    "a key twice": (
        b'{"model": "tiny", "messages": [], "max_tokens": 2, "max_tokens": 9}',
        400,
        "max_tokens",
        "given twice",
    ),
    "a 500-digit integer": (
        b'{"model": "tiny", "messages": [], "seed": ' + b"9" * 500 + b"}",
        400,
        "seed",
        "an integer of 500 digits",
    ),
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
    "a stop string too long": (
        {"messages": USER, "stop": ["a", "x" * (MAX_STOP_CHARS + 1)]},
        400,
        "stop",
        f"a string of {MAX_STOP_CHARS + 1} characters; at most {MAX_STOP_CHARS}",
    ),
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


def test_a_stop_string_at_the_length_limit_is_accepted(strict):
    body = {"messages": USER, "max_tokens": 2, "stop": ["\u00e9" * MAX_STOP_CHARS, "x" * MAX_STOP_CHARS]}
    response = chat(strict.url, body)
    assert response.status_code == 200, response.text


def test_unknown_routes_and_methods_get_openai_shaped_errors(strict):
    missing = httpx.post(strict.url + "/v1/embeddings", json={})
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    wrong = httpx.get(strict.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_a_completion_prompt_list_of_several_is_refused(strict):
    body = {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2}
    response = httpx.post(strict.url + "/v1/completions", json=body)
    assert response.status_code == 400 and "one per request" in response.json()["error"]["message"]


def test_integers_past_pythons_limit_are_a_400_naming_the_field():
    """5,000 digits would make ``json`` raise a bare ValueError (Python's 4,300-digit limit); the body's
    strict decoder names the field instead, as it does for a nested one."""
    from loramoe.serve.protocol import APIError
    from loramoe.serve.reading import parse_json

    for body, param in [
        (b'{"seed": ' + b"9" * 5000 + b"}", "seed"),
        (b'{"messages": [{"role": "user", "n": -' + b"1" * 5000 + b"}]}", "messages[0].n"),
    ]:
        with pytest.raises(APIError) as info:
            parse_json(body)
        assert info.value.status == 400 and info.value.param == param, info.value.message
        assert "an integer of 5000 digits" in info.value.message
