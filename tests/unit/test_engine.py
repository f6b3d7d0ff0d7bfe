"""The evaluation engine: its log-likelihoods against a direct computation, and its scores against the two lean
evaluators it replaced (the forgetting experiment's and the demo's), kept below as references, on tiny models."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from loramoe.errors import ConfigError
from loramoe.eval.engine import Task, choice_ids, continuation_logprobs, predict_choices, score_item_sets
from loramoe.eval.metrics import alias_contained, regex_match

from tiny import tiny_model, tiny_tokenizer

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "forgetting"


def _experiment(module: str):
    """A module of experiments/forgetting, which imports its siblings by bare name."""
    sys.path.insert(0, str(EXPERIMENT))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(EXPERIMENT))


# --------------------------------------------------------------------------------------------------------------
# The replaced evaluators, verbatim in what they compute (the experiments' results were produced with these)


def _reference_choice_scores(model, tok, items, chat, batch=16):
    """experiments/forgetting/evaluator.py's ``_choice_scores``, also returning the per-choice scores."""
    seqs, need = [], []
    for i, it in enumerate(items):
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": it["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            ctx = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ctx = tok(it["prompt"], add_special_tokens=False)["input_ids"]
        conts = [tok(c if chat else " " + c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
        multi = [j for j, c in enumerate(conts) if len(c) > 1]
        first = len(seqs)
        for j in multi or [0]:
            seqs.append((i, ctx + conts[j], len(ctx)))
        need.append([(j, first + (multi.index(j) if j in multi else 0), c) for j, c in enumerate(conts)])
    logps = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            width = max(len(seqs[k][1]) for k in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, k in enumerate(chunk):
                ids[r, : len(seqs[k][1])] = torch.tensor(seqs[k][1])
                mask[r, : len(seqs[k][1])] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, k in enumerate(chunk):
                logps[k] = logp[r, : len(seqs[k][1])]
    preds, all_scores = [], []
    for choices in need:
        scores = []
        for _j, k, cont in choices:
            n_ctx = seqs[k][2]
            lp = logps[k][n_ctx - 1 : n_ctx - 1 + len(cont)]
            scores.append(lp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        all_scores.append(scores)
    return preds, all_scores


def _reference_forgetting_scores(model, tok, sets):
    """experiments/forgetting/evaluator.py's ``evaluate``: scores, samples and prediction counts."""
    from rouge_score import rouge_scorer

    from loramoe.inference.generate import generate

    model.eval()
    out = {"scores": {}, "samples": {}, "pred_dist": {}}
    for task, items in sets.items():
        if task in ("trec", "efficientqa", "facts", "xsum"):
            new = 32 if task == "xsum" else 16
            preds = generate(model, tok, [it["prompt"] for it in items], max_new_tokens=new, batch_size=16,
                             chat_template=True, progress=False)  # fmt: skip
            if task == "trec":
                vals = [regex_match(p, it["golds"]) for p, it in zip(preds, items)]
            elif task in ("efficientqa", "facts"):
                vals = [alias_contained(p, it["golds"]) for p, it in zip(preds, items)]
            else:
                sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
                vals = [sc.score(it["golds"][0], p)["rougeL"].fmeasure for p, it in zip(preds, items)]
            out["samples"][task] = [[it["prompt"][-80:], p] for it, p in zip(items[:3], preds[:3])]
        else:
            pred, _ = _reference_choice_scores(model, tok, items, chat=task not in ("rome", "lama"))
            vals = [float(p == it["gold"]) for p, it in zip(pred, items)]
            if task in ("sst2", "rte", "boolq", "agnews", "xsum"):
                out["pred_dist"][task] = [pred.count(k) for k in range(len(items[0]["choices"]))]
        out["scores"][task] = sum(vals) / len(vals)
    return out


def _reference_demo_scores(model, tokenizer, data, max_new_tokens):
    """The demo's ``evaluate_demo``: one pooled generate call, alias containment for facts, exact stripped match."""
    from loramoe.inference.generate import generate

    tasks = list(data["tasks"])
    groups = {"facts_heldout": data["facts"]["heldout"]} | {t: data["tasks"][t]["test"] for t in tasks}
    prompts = [item.get("question") or item["prompt"] for items in groups.values() for item in items]
    outputs = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=64, progress=False
    )
    scores, samples, i = {}, {}, 0
    for name, items in groups.items():
        outs, i = outputs[i : i + len(items)], i + len(items)
        if name.startswith("facts"):
            hits = [alias_contained(o, item["answers"]) for o, item in zip(outs, items)]
        else:
            hits = [float(o.strip() == item["completion"]) for o, item in zip(outs, items)]
        scores[name] = sum(hits) / len(hits)
        samples[name] = [
            {"prompt": p.get("question") or p["prompt"], "output": o} for p, o in zip(items[:3], outs)
        ]
    scores["downstream_mean"] = sum(scores[t] for t in tasks) / len(tasks)
    return {"scores": scores, "samples": samples}


# --------------------------------------------------------------------------------------------------------------
# Item sets shaped like the experiment's, sized for the tiny model's 128 positions


def _choice_items(n, choices, stem):
    return [
        {"prompt": f"{stem} {i}: is it {i % 3}?", "choices": choices, "gold": i % len(choices)}
        for i in range(n)
    ]


def _sets():
    return {
        "trec": [{"prompt": f"Who wrote book {i}?", "golds": [f"{chr(97 + i)}|x"]} for i in range(6)],
        "facts": [{"prompt": f"Capital of land {i}?", "golds": [chr(97 + i), "the b"]} for i in range(5)],
        # plain-text ranking of multi-token choices, more sequences than one batch holds
        "rome": _choice_items(21, ["Paris", "Rome is", "Oslo", "Bern and", "Lima"], "Where"),
        # chat, single-token choices (bytes): they share one forward pass per item
        "boolq": _choice_items(18, ["y", "n"], "Q"),
        # chat, one single-token and two multi-token choices
        "rte": _choice_items(7, ["y", "no", "maybe"], "Pair"),
        "xsum": [
            {"prompt": f"Summarise: text {i} about things.", "golds": [f"things {i}"]} for i in range(3)
        ],
    }


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama"), tiny_tokenizer()


def test_forgetting_evaluator_reproduces_the_replaced_one_exactly(model_and_tokenizer) -> None:
    forgetting_evaluate = _experiment("evaluator").evaluate
    model, tok = model_and_tokenizer
    sets = _sets()
    want = _reference_forgetting_scores(model, tok, sets)
    got = forgetting_evaluate(model, tok, sets)
    assert got["scores"] == want["scores"]  # exact: the same floats, not approximately
    assert got["samples"] == want["samples"]
    assert got["pred_dist"] == want["pred_dist"]


@pytest.mark.parametrize("chat", [True, False])
def test_choice_log_likelihoods_are_the_replaced_ones_bit_for_bit(model_and_tokenizer, chat: bool) -> None:
    model, tok = model_and_tokenizer
    items = _sets()["rome"] + _sets()["rte"] + _sets()["boolq"]
    want_preds, want_scores = _reference_choice_scores(model, tok, items, chat)
    encoded = [choice_ids(tok, it["prompt"], it["choices"], chat) for it in items]
    got = continuation_logprobs(model, encoded, batch_size=16, pad_id=tok.pad_token_id)
    assert [[logp for logp, _ in row] for row in got] == want_scores
    assert predict_choices(model, tok, items, chat) == want_preds


def test_log_likelihoods_match_one_unbatched_sequence_each(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    items = _sets()["rte"][:3]
    encoded = [choice_ids(tok, it["prompt"], it["choices"], True) for it in items]
    got = continuation_logprobs(model, encoded, batch_size=2, pad_id=tok.pad_token_id)
    for (ctx, conts), row in zip(encoded, got, strict=True):
        for cont, (logp, greedy) in zip(conts, row, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0].float()  # (T, V)
            steps = torch.log_softmax(logits, dim=-1)[len(ctx) - 1 : -1]  # (C, V)
            want = steps.gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert logp == pytest.approx(want, abs=1e-4)
            assert greedy == bool((steps.argmax(-1) == torch.tensor(cont)).all())


def test_demo_scores_are_the_replaced_ones(model_and_tokenizer) -> None:
    from loramoe.demo.evaluation import evaluate_demo

    model, tok = model_and_tokenizer
    data = {
        "facts": {"heldout": [{"question": f"What is {i}?", "answers": [chr(97 + i)]} for i in range(5)]},
        "tasks": {t: {"test": [{"prompt": f"{t} {i}", "completion": f"#{i}#"} for i in range(4)]}
                  for t in ("review_code", "sort_words", "sum_format")},
    }  # fmt: skip
    want = _reference_demo_scores(model, tok, data, max_new_tokens=6)
    assert evaluate_demo(model, tok, data, max_new_tokens=6, progress=False) == want


def test_evaluate_reports_values_predictions_and_an_interval(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    sets = {
        "pick": [{"prompt": "2+2?", "choices": ["4", "5"], "gold": 0}] * 3,
        "say": [{"prompt": "hi", "golds": ["x"]}],
    }
    got = score_item_sets(model, tok, sets, {"pick": Task("acc"), "say": Task("contains", max_new_tokens=2)})
    assert list(got) == ["pick", "say"]
    pick = got["pick"]
    assert len(pick.values) == 3 and pick.score == sum(pick.values) / 3 and pick.predictions[0] in (0, 1)
    assert pick.interval["stderr"] == 0.0  # the same item three times
    assert got["say"].interval["stderr"] is None  # one item: no spread to estimate


def test_bad_tasks_are_refused_by_name(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(ConfigError, match=r"metric must be one of \['acc', .*\], got 'bleu'"):
        Task("bleu")
    with pytest.raises(ConfigError, match="no task given for item set 'x'"):
        score_item_sets(model, tok, {"x": [{"prompt": "a", "golds": ["b"]}]}, {})
    with pytest.raises(ConfigError, match="empty"):
        score_item_sets(model, tok, {"x": []}, {"x": Task("contains")})


@pytest.mark.slow  # converts or loads SmolLM2 and scores ~60 real items: about a minute on an idle core
def test_forgetting_scores_are_unchanged_on_smollm2_and_the_real_eval_sets() -> None:
    """The running experiment's numbers depend on this: the bundled model, its real suites, the same floats."""
    pytest.importorskip("rouge_score")
    forgetting_evaluate = _experiment("evaluator").evaluate
    mixture = _experiment("mixture")
    DATA, eval_sets = mixture.DATA, mixture.eval_sets
    if not DATA.is_dir():
        pytest.skip(f"shared data {DATA} not found")
    from loramoe.models.base import load_base

    model, tok = load_base("smollm2-135m-instruct")
    sizes = {"trec": 4, "efficientqa": 3, "facts": 4, "rome": 12, "lama": 12, "sst2": 8, "rte": 6, "boolq": 6,
             "agnews": 6, "xsum": 2}  # fmt: skip
    sets = eval_sets(sizes)
    want = _reference_forgetting_scores(model, tok, sets)
    got = forgetting_evaluate(model, tok, sets)
    assert got["scores"] == want["scores"]
    assert got["samples"] == want["samples"] and got["pred_dist"] == want["pred_dist"]
    for task in ("rome", "lama", "sst2", "agnews"):
        chat = task not in ("rome", "lama")
        _, want_scores = _reference_choice_scores(model, tok, sets[task], chat)
        encoded = [choice_ids(tok, it["prompt"], it["choices"], chat) for it in sets[task]]
        got_scores = continuation_logprobs(model, encoded, pad_id=tok.pad_token_id or 0)
        assert [[logp for logp, _ in row] for row in got_scores] == want_scores


def test_the_forgetting_evaluators_choice_helper_is_the_replaced_one(model_and_tokenizer) -> None:
    """``_choice_scores`` stays importable for the knowledge-retention experiment, with the same predictions."""
    _choice_scores = _experiment("evaluator")._choice_scores
    model, tok = model_and_tokenizer
    items = _sets()["rome"]
    assert (
        _choice_scores(model, tok, items, chat=False) == _reference_choice_scores(model, tok, items, False)[0]
    )


def test_sharing_by_prefix_gives_the_same_log_likelihoods_in_fewer_sequences(model_and_tokenizer) -> None:
    """lm-eval's rule (continuations equal but for their last token share a pass) against one pass each."""
    from loramoe.eval.engine import _plan_sequences

    model, tok = model_and_tokenizer
    ctx = tok("Pick one:", add_special_tokens=False)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in (" ab", " ac", " b", " abc")]
    requests = [(ctx, conts), (ctx[:-1], conts[:2])]
    assert (
        len(_plan_sequences(requests, "prefix")[0]) == 4
    )  # " a?" x2 share, " b", " abc"; then " a?" x2 share
    shared = continuation_logprobs(model, requests, share="prefix")
    alone = continuation_logprobs(model, [(c, [x]) for c, xs in requests for x in xs], batch_size=1)
    flat = [pair for row in shared for pair in row]
    for (logp, greedy), [(want, want_greedy)] in zip(flat, alone, strict=True):
        assert logp == pytest.approx(want, abs=1e-5) and greedy == want_greedy
    with pytest.raises(ConfigError, match="share must be"):
        continuation_logprobs(model, requests, share="all")
