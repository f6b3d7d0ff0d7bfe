"""Generation helpers on tiny real models: batching, chat templates, prompt files, the chat loop."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe.errors import ConfigError, DataError
from loramoe.inference.chat import chat_loop
from loramoe.inference.generate import generate
from loramoe.inference.prompts import read_prompts

from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Hello there", "A much longer prompt, to force left padding in a batch", "x", "What is 2+2?"]


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool) -> str:
    """Plain one-prompt Hugging Face greedy generation, the obvious way, for comparison."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[model.generation_config.eos_token_id, tokenizer.eos_token_id],
    )
    new = out[0, ids.shape[1] :].tolist()
    stops = {model.generation_config.eos_token_id, tokenizer.eos_token_id}
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def scripted(lines: list[str]):
    """An input_fn that returns the lines in turn, then raises EOFError like ``input`` at end of input."""
    it = iter(lines)
    asked: list[str] = []

    def input_fn(prompt: str) -> str:
        asked.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    input_fn.asked = asked
    return input_fn


def test_generate_returns_one_stripped_string_per_prompt():
    out = generate(tiny_model(), tiny_tokenizer(), PROMPTS, max_new_tokens=5, progress=False)
    assert len(out) == len(PROMPTS)
    assert all(isinstance(s, str) and s == s.strip() for s in out)


def test_generate_empty_list_returns_empty_list():
    assert generate(tiny_model(), tiny_tokenizer(), [], progress=False) == []


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chat", [False, True])
def test_batched_left_padded_greedy_equals_unbatched_reference(model_type, chat):
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    batched = generate(
        model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, chat_template=chat, progress=False
    )
    one_by_one = generate(
        model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1, chat_template=chat, progress=False
    )
    reference = [reference_greedy(model, tokenizer, p, 8, chat) for p in PROMPTS]
    assert batched == one_by_one == reference


def test_chat_template_is_used_when_the_tokenizer_has_one():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    default = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, progress=False)
    assert default == generate(
        model, tokenizer, PROMPTS[:2], max_new_tokens=6, chat_template=True, progress=False
    )
    plain = generate(
        tiny_model(), tiny_tokenizer(chat_template=False), PROMPTS[:2], max_new_tokens=6, progress=False
    )
    assert plain == generate(
        model, tokenizer, PROMPTS[:2], max_new_tokens=6, chat_template=False, progress=False
    )


def test_system_prompt_goes_through_the_chat_template(monkeypatch):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rendered: list[list[dict]] = []
    original = tokenizer.apply_chat_template
    monkeypatch.setattr(
        tokenizer, "apply_chat_template", lambda m, **kw: rendered.append(m) or original(m, **kw)
    )
    generate(model, tokenizer, ["hi"], max_new_tokens=2, system_prompt="Be brief.", progress=False)
    assert rendered == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]


def test_generation_stops_at_eos_and_drops_it():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    first_greedy = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first_greedy
    out = generate(model, tokenizer, ["Hello"], max_new_tokens=8, chat_template=False, progress=False)
    assert out == [""]


def test_generate_leaves_tokenizer_model_mode_and_rng_untouched():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    tokenizer.pad_token = None
    side = tokenizer.padding_side
    model.train()
    rng = torch.get_rng_state()
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=4, do_sample=True, seed=3, progress=False)
    assert len(out) == len(PROMPTS)
    assert tokenizer.pad_token is None and tokenizer.padding_side == side
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded_sampling_is_reproducible():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7, progress=False)
    assert generate(model, tokenizer, PROMPTS, **kwargs) == generate(model, tokenizer, PROMPTS, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chat_template=True), "no chat template"),
        (dict(system_prompt="sys"), "system_prompt needs a chat template"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_generate_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate(tiny_model(), tiny_tokenizer(chat_template=False), ["hi"], progress=False, **kwargs)


def test_generate_rejects_a_prompt_without_tokens():
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        generate(tiny_model(), tiny_tokenizer(), ["ok", ""], chat_template=False, progress=False)


# ---- read_prompts -------------------------------------------------------------------------------------------------


def test_read_txt_one_prompt_per_line_skipping_blanks(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  second  \r\n   \nthird")
    assert read_prompts(path) == ["first", "second", "third"]


def test_read_jsonl_prompt_instruction_input_question_and_strings(tmp_path):
    records = [
        {"prompt": "p", "instruction": "ignored"},
        {"instruction": "Translate", "input": "bonjour"},
        {"instruction": "Say hi", "input": ""},
        {"question": "Why?", "answer": "because"},
        "a bare string",
    ]
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in records[2:])
    )
    assert read_prompts(path) == ["p", "Translate\n\nbonjour", "Say hi", "Why?", "a bare string"]


def test_read_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": "q1"}, {"prompt": "q2"}]))
    assert read_prompts(str(path)) == ["q1", "q2"]


def test_jsonl_bad_json_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: invalid JSON") as err:
        read_prompts(path)
    assert err.value.line == 3


def test_missing_prompt_field_names_line_field_and_found_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "t", "label": 1}\n')
    with pytest.raises(
        DataError, match=r"p\.jsonl:2 field 'prompt': no prompt field.*found text, label"
    ) as err:
        read_prompts(path)
    assert (err.value.line, err.value.field) == (2, "prompt")


def test_non_string_prompt_names_the_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "ok"}, {"question": 42}]))
    with pytest.raises(DataError, match=r"p\.json:2 field 'question': must be a non-empty string"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("p.csv", "a,b", "unknown prompt file type"),
        ("p.json", '{"prompt": "x"}', "must hold a list"),
        ("p.txt", "\n  \n", "no prompts"),
        ("p.jsonl", "[1, 2]", "expected an object or a string"),
    ],
)
def test_read_prompts_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_prompts(path)


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        read_prompts(tmp_path / "absent.txt")
    assert err.value.path == str(tmp_path / "absent.txt")


# ---- chat_loop ----------------------------------------------------------------------------------------------------


def test_chat_loop_keeps_history_resets_and_exits(monkeypatch):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    rendered: list[list[dict]] = []
    original = tokenizer.apply_chat_template
    monkeypatch.setattr(
        tokenizer,
        "apply_chat_template",
        lambda m, **kw: rendered.append([dict(x) for x in m]) or original(m, **kw),
    )
    input_fn = scripted(["hello", "", "again", "/reset", "fresh", "/exit", "never read"])
    printed: list[str] = []
    history = chat_loop(
        model, tokenizer, max_new_tokens=4, system_prompt="sys", input_fn=input_fn, print_fn=printed.append
    )

    assert [len(m) for m in rendered] == [2, 4, 2]  # system+user; +assistant+user; after /reset: system+user
    assert [m["content"] for m in rendered[1] if m["role"] == "user"] == ["hello", "again"]
    assert rendered[2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "fresh"}]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "fresh"
    assert "(history cleared)" in printed
    assert len(input_fn.asked) == 6  # stopped at /exit


def test_chat_loop_first_reply_equals_generate_and_eof_ends():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    printed: list[str] = []
    history = chat_loop(
        model, tokenizer, max_new_tokens=6, input_fn=scripted(["Hi!"]), print_fn=printed.append
    )
    expected = generate(model, tokenizer, ["Hi!"], max_new_tokens=6, progress=False)[0]
    assert history == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": expected}]
    assert expected in printed


def test_chat_loop_streams_through_print_fn():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    chunks: list[tuple[str, dict]] = []
    history = chat_loop(
        model,
        tokenizer,
        max_new_tokens=6,
        stream=True,
        input_fn=scripted(["Hi!"]),
        print_fn=lambda *args, **kwargs: chunks.append((" ".join(map(str, args)), kwargs)),
    )
    streamed = "".join(text for text, kwargs in chunks if "flush" in kwargs)
    assert history[-1]["content"] in streamed
    assert history[-1]["content"] == streamed.strip() or streamed.strip().startswith(history[-1]["content"])


def test_chat_loop_drops_oldest_turns_to_fit_the_context():
    model, tokenizer = tiny_model(max_position_embeddings=64), tiny_tokenizer()
    printed: list[str] = []
    # ~30 byte tokens per turn with the template: 64 positions fit one turn and its reply, not two
    lines = ["a" * 12, "b" * 12, "c" * 12]
    history = chat_loop(model, tokenizer, max_new_tokens=8, input_fn=scripted(lines), print_fn=printed.append)
    assert any("dropped" in p for p in printed)
    assert history[0] == {"role": "user", "content": "c" * 12}


def test_chat_loop_needs_a_chat_template():
    with pytest.raises(ConfigError, match="chat template"):
        chat_loop(
            tiny_model(), tiny_tokenizer(chat_template=False), input_fn=scripted([]), print_fn=lambda *a: None
        )
