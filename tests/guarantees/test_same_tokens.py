"""Every command that generates gives the same tokens for the same request and seed: ``generate``
(``inference.generate.complete``), ``chat`` (``chat_loop``), ``serve`` (over HTTP, ``return_token_ids``) and the
evaluation engine (``score_item_sets``), compared on token ids (on the tiny models the text is mostly replacement
characters, so equal text says little), on several architectures, each with a LoRAMoE adapter attached.

Greedy ids are also checked against plain one-prompt ``model.generate``, so a wrong token in the shared loop fails
too; a stop string is taken from the middle of the full answer (its first occurrence, never at index 0), so the
stopped answer must be a proper prefix of it. The evaluation engine decodes greedily without stop strings, so it
takes part in the greedy comparison only. Shared setup: ``serve_helpers.py``.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from loramoe import disable_adapters
from loramoe.eval.engine import Task, score_item_sets
from loramoe.inference.chat import chat_loop
from loramoe.inference.encoding import encode_chat
from loramoe.inference.generate import complete
from loramoe.inference.loop import Completion, Request, TokenLoop
from loramoe.inference.sampling import Sampling, sampling_for
from loramoe.models.trained import load_trained

from serve_helpers import PROMPTS, running, save_tiny_adapter

MAX_TOKENS = 16
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "seed": 1234}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def served(request, tmp_path_factory):
    """(model, tokenizer, running server) for a tiny base of one architecture with an adapter."""
    adapter = save_tiny_adapter(tmp_path_factory.mktemp(request.param), "adapter", end_scale=1.4, readable=True,
                                model_type=request.param)  # fmt: skip
    model, tokenizer = load_trained(adapter)
    with running(adapter, max_batch_size=len(PROMPTS)) as server:
        yield model, tokenizer, server


def _generate(model, tokenizer, prompts, **settings) -> list[Completion]:
    return complete(model, tokenizer, prompts, max_new_tokens=MAX_TOKENS, batch_size=len(prompts),
                    chat_template=True, progress=False, **settings)  # fmt: skip


def _chat(model, tokenizer, prompts, **settings) -> list[Completion]:
    """One conversation per prompt, each with one user turn."""
    replies: list[Completion] = []
    for prompt in prompts:
        lines = iter([prompt])
        chat_loop(model, tokenizer, max_new_tokens=MAX_TOKENS, input_fn=lambda _, lines=lines: _next(lines),
                  print_fn=lambda *a, **k: None, on_reply=replies.append, **settings)  # fmt: skip
    return replies


def _next(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


def _serve(url: str, prompts, **settings) -> list[dict]:
    """The choices of concurrent chat requests (some share a batch), with their token ids."""
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "return_token_ids": True}
    if settings.get("do_sample"):
        body |= {k: v for k, v in settings.items() if k != "do_sample"}
    else:
        body |= {"temperature": 0, **{k: v for k, v in settings.items() if k != "do_sample"}}

    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": p}]}
                    )
                    for p in prompts
                )  # fmt: skip
            )

    responses = asyncio.run(send())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["choices"][0] for r in responses]


def _reference_greedy_ids(model, tokenizer, prompt: str) -> list[int]:
    """Plain one-prompt ``model.generate``, cut after the first end token."""
    ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": prompt}])])
    stops = {model.generation_config.eos_token_id, tokenizer.eos_token_id}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stops))  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
    return new[:end]


def test_greedy_ids_are_the_same_from_every_command(served):
    model, tokenizer, server = served
    reference = [_reference_greedy_ids(model, tokenizer, p) for p in PROMPTS]
    generated = [c.token_ids for c in _generate(model, tokenizer, PROMPTS)]
    chatted = [c.token_ids for c in _chat(model, tokenizer, PROMPTS)]
    served_ids = [choice["token_ids"] for choice in _serve(server.url, PROMPTS)]
    items = {"items": [{"prompt": p, "golds": ["-"]} for p in PROMPTS]}
    engine = score_item_sets(model, tokenizer, items, {"items": Task("contains", max_new_tokens=MAX_TOKENS)},
                             batch_size=len(PROMPTS))["items"].token_ids  # fmt: skip
    assert generated == reference
    assert chatted == reference
    assert served_ids == reference
    assert engine == reference
    assert {len(ids) for ids in reference} != {
        MAX_TOKENS
    }  # some answers end at an end token, before the limit


def test_seeded_sampled_ids_are_the_same_from_every_command(served):
    model, tokenizer, server = served
    generated = [c.token_ids for c in _generate(model, tokenizer, PROMPTS, do_sample=True, **SAMPLED)]
    chatted = [c.token_ids for c in _chat(model, tokenizer, PROMPTS, do_sample=True, **SAMPLED)]
    served_ids = [choice["token_ids"] for choice in _serve(server.url, PROMPTS, do_sample=True, **SAMPLED)]
    assert chatted == generated
    assert served_ids == generated
    greedy = [c.token_ids for c in _generate(model, tokenizer, PROMPTS)]
    reseeded = [
        c.token_ids for c in _generate(model, tokenizer, PROMPTS, do_sample=True, **SAMPLED | {"seed": 5})
    ]
    assert generated != greedy and generated != reseeded  # the settings and the seed are in effect


def _mid_answer_stop(text: str) -> tuple[str, int]:
    """A one-character stop string whose first occurrence in ``text`` is after its start and before its end (the
    one nearest the middle), and where it occurs."""
    for k in sorted(range(1, len(text) - 1), key=lambda k: abs(2 * k - len(text))):
        if not text[k].isspace() and text.find(text[k]) == k and text[:k].strip():
            return text[k], k
    raise AssertionError(f"no usable stop string in {text!r}; lengthen the answer")


def test_a_stop_string_in_mid_answer_is_honoured_the_same_by_every_command(served):
    model, tokenizer, server = served
    full = _generate(model, tokenizer, PROMPTS)
    longest = max(range(len(PROMPTS)), key=lambda i: len(full[i].text))
    stop, at = _mid_answer_stop(full[longest].text)
    generated = _generate(model, tokenizer, PROMPTS, stop=[stop])
    stopped = generated[longest]
    assert stopped.reason == "stop" and stopped.text == full[longest].text[:at].strip()
    assert stopped.token_ids == full[longest].token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full[longest].token_ids)
    chatted = _chat(model, tokenizer, PROMPTS, stop=[stop])
    choices = _serve(server.url, PROMPTS, stop=[stop])
    assert [c.token_ids for c in chatted] == [c.token_ids for c in generated]
    assert [c["token_ids"] for c in choices] == [c.token_ids for c in generated]
    assert [c["message"]["content"] for c in choices] == [c.text for c in generated]
    assert [c["finish_reason"] for c in choices] == [c.reason for c in generated]


def test_requests_joining_a_running_batch_get_the_tokens_they_get_alone(served):
    """The server's join path, run deterministically: rows added between steps of a running batch (their cache
    re-aligned to the batch's width) decode the ids they decode alone."""
    model, tokenizer, _ = served
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    for sampling in (sampling_for(model, max_tokens=MAX_TOKENS), Sampling(max_tokens=MAX_TOKENS, **SAMPLED)):
        alone = [c.token_ids for c in _each_alone(model, tokenizer, prompts, sampling)]
        order = sorted(range(len(prompts)), key=lambda i: -len(alone[i]))  # the longest answer runs first
        joined = _joining(model, tokenizer, [prompts[i] for i in order], sampling)
        assert joined == [alone[i] for i in order]


def _joining(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """The ids of ``prompts`` when the first runs alone, the second joins it two steps later, the rest two more
    steps later (the first must run for more than four steps)."""
    got: dict[int, list[int]] = {}
    requests = [Request(ids, sampling, on_finish=lambda c, i=i: got.setdefault(i, c.token_ids))
                for i, ids in enumerate(prompts)]  # fmt: skip
    loop = TokenLoop(model, tokenizer)
    with loop.session():
        loop.add(requests[:1])
        for joining in ([requests[1]], requests[2:]):
            loop.step()
            loop.step()
            assert loop.active, "the running batch ended before the next requests joined"
            loop.add(joining)
        while loop.active:
            loop.step()
    return [got[i] for i in range(len(prompts))]


def _each_alone(model, tokenizer, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
    done: list[Completion] = []
    loop = TokenLoop(model, tokenizer)
    for ids in prompts:
        loop.run([Request(ids, sampling, on_finish=done.append)], batch_size=1)
    return done


def test_the_adapter_changes_the_greedy_ids(served):
    """The comparisons above run with an adapter that matters: without it the greedy ids differ."""
    model, tokenizer, _ = served
    adapted = [c.token_ids for c in _generate(model, tokenizer, PROMPTS)]
    with disable_adapters(model):
        plain = [c.token_ids for c in _generate(model, tokenizer, PROMPTS)]
    assert adapted != plain
