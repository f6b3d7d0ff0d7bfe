"""The decoding under ``loramoe serve``, without a server: ``TextStream`` deltas join to the final text, a cancelled
sequence leaves its batch while the others finish, and batched decoding equals ``generate`` on each architecture.
Shared setup: ``serve_helpers.py``."""

from __future__ import annotations

import pytest

from loramoe import LoRAMoEConfig, inject
from loramoe.inference.encoding import encode_chat
from loramoe.inference.loop import Request, TokenLoop
from loramoe.inference.sampling import Sampling
from loramoe.inference.text import TextStream
from loramoe.models.trained import load_trained

from serve_helpers import PROMPTS
from tiny import tiny_model, tiny_tokenizer


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


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """The definition: the longest end of ``text`` that is a proper prefix of some stop string."""
    ends = [
        k for s in stop for k in range(1, min(len(s) - 1, len(text)) + 1) if text[len(text) - k :] == s[:k]
    ]
    return max(ends, default=0)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello\nUs", ("\nUser:",), 3),
        ("abcab", ("abcabd",), 5),  # the whole text begins the stop string
        ("xabab", ("abac",), 2),  # "abab" is no prefix of "abac", "ab" is
        ("aaaa", ("a" * 255 + "b",), 4),
        ("xaab", ("aab!", "b?"), 3),  # several stop strings: the longest held back
        ("xaab", ("b?", "aab!"), 3),  # in either order
        ("ab", ("ab",), 0),  # a whole stop string is found, not held back: only its proper prefixes count
        ("x", ("y",), 0),
        ("", ("ab",), 0),
        ("héllo wö", ("wörld",), 2),
        ("ok \U0001f642", ("\U0001f642\U0001f643",), 1),  # one character beyond the BMP
        ("a" * 300, ("a" * 256,), 255),
        ("a" * 400, ("a" * 300 + "b",), 300),  # over 256 characters: prefixes sliced when compared, not kept
    ],
)
def test_text_stream_holds_back_the_end_that_may_begin_a_stop_string(text, stop, expected):
    assert TextStream(_CharTokenizer(), stop)._stop_prefix_len(text) == held_back(text, stop) == expected


def test_text_stream_held_back_length_matches_its_definition_on_random_text():
    import random

    rng = random.Random(0)
    alphabet = "ab\u00e9\U0001f642"
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randrange(0, 12)))
        stop = tuple(
            "".join(rng.choices(alphabet, k=rng.randrange(1, 9))) for _ in range(rng.randrange(1, 5))
        )
        assert TextStream(_CharTokenizer(), stop)._stop_prefix_len(text) == held_back(text, stop), (
            text,
            stop,
        )


class _PieceTokenizer:
    """Decodes ids as pieces of text of several characters, so a stop string can span tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_holds_a_stop_string_split_across_tokens_until_it_is_settled():
    pieces = ["Hi", " there", "\nUs", "ed", "\nU", "ser", ": next"]
    stream = TextStream(_PieceTokenizer(pieces), ("\nUser:", "###"))
    deltas = [stream.update(list(range(k))) for k in range(1, len(pieces) + 1)]
    # "\nUs" is held until "ed" shows it is not the stop string; "\nU" + "ser" + ":" completes it
    assert deltas == ["Hi", " there", "", "\nUsed", "", "", ""]
    assert stream.stopped and stream.text == "Hi there\nUsed"


def test_a_cancelled_sequence_leaves_its_batch_and_the_others_finish(adapters):
    model, tokenizer = load_trained(adapters["endless"])
    loop = TokenLoop(model, tokenizer)
    finished = {}
    gens = [
        Request(
            encode_chat(tokenizer, [{"role": "user", "content": prompt}]),
            Sampling(max_tokens=20),
            on_text=lambda text: None,
            on_finish=lambda f, i=i: finished.setdefault(i, f),
        )
        for i, prompt in enumerate(PROMPTS[:2])
    ]
    gens[0].cancelled = lambda: len(gens[0].ids) >= 3  # its client leaves after three tokens
    loop.run(gens, batch_size=2)
    assert 0 not in finished and len(gens[0].ids) == 3
    assert finished[1].completion_tokens == 20 and finished[1].reason == "length"


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mistral", "gemma3_text", "phi3"])
def test_batched_decoding_equals_generate_on_each_architecture(model_type):
    """Left padding, the KV cache and rows leaving the batch early, against ``generate`` on the same prompts."""
    from loramoe.inference.generate import generate

    model = inject(tiny_model(model_type), LoRAMoEConfig(num_experts=2, rank=2, dropout=0.0))
    tokenizer = tiny_tokenizer()
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=10, progress=False)
    short = generate(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    got = {}
    TokenLoop(model, tokenizer).run(
        [
            Request(
                encode_chat(tokenizer, [{"role": "user", "content": prompt}]),
                Sampling(max_tokens=4 if i % 2 else 10),  # every second row leaves the batch early
                on_text=lambda text: None,
                on_finish=lambda f, i=i: got.setdefault(i, f.text),
            )
            for i, prompt in enumerate(PROMPTS)
        ],
        batch_size=len(PROMPTS),
    )
    assert [got[i] for i in range(len(PROMPTS))] == [
        short[i] if i % 2 else expected[i] for i in range(len(PROMPTS))
    ]
