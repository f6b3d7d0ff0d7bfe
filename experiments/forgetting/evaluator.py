"""The forgetting experiment's lean evaluator: log-likelihood choice ranking and greedy generation on fixed items.

Prompts are wrapped in the model's chat template, as ``loramoe.data`` formats the SFT records, except the ROME /
LAMA ranking probes, which score plain-text cloze continuations (format-free knowledge probes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

KNOWLEDGE = ["trec", "efficientqa", "rome", "lama", "facts"]  # suites NOT in the SFT mixture
DOWNSTREAM = ["sst2", "rte", "boolq", "agnews", "xsum"]
MAX_NEW_TOKENS = 16
XSUM_NEW_TOKENS = 32

log = logging.getLogger("forgetting")


def _chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def _choice_scores(model, tok, items: list[dict], chat: bool, batch: int = 16) -> list[int]:
    """Index of the highest summed log-likelihood choice per item (lm-eval's ``acc``).

    Single-token choices share one forward pass per item (their log-prob is read at the last context position);
    each multi-token choice gets its own sequence.
    """
    import torch

    seqs = []  # (item, ids, n_ctx)
    need = []  # per item: list of (choice, seq index, n continuation tokens)
    for i, it in enumerate(items):
        ctx = (
            _chat_ids(tok, it["prompt"]) if chat else tok(it["prompt"], add_special_tokens=False)["input_ids"]
        )
        conts = [tok(c if chat else " " + c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
        multi = [j for j, c in enumerate(conts) if len(c) > 1]
        first = len(seqs)
        for j in multi or [0]:
            seqs.append((i, ctx + conts[j], len(ctx)))
        need.append([(j, first + (multi.index(j) if j in multi else 0), c) for j, c in enumerate(conts)])
    logps: list[Any] = [None] * len(seqs)
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
    preds = []
    for choices in need:
        scores = []
        for _j, k, cont in choices:
            n_ctx = seqs[k][2]
            lp = logps[k][n_ctx - 1 : n_ctx - 1 + len(cont)]
            scores.append(lp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def evaluate(model, tok, sets: dict[str, list[dict]]) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    from loramoe.eval.metrics import alias_contained, regex_match
    from loramoe.inference.generate import generate

    model.eval()
    out: dict[str, Any] = {"scores": {}, "seconds": {}, "samples": {}}
    for task, items in sets.items():
        t0 = time.time()
        if task in ("trec", "efficientqa", "facts", "xsum"):
            new = XSUM_NEW_TOKENS if task == "xsum" else MAX_NEW_TOKENS
            preds = generate(model, tok, [it["prompt"] for it in items], max_new_tokens=new, batch_size=16,
                             chat_template=True, progress=False)  # fmt: skip
            if task == "trec":
                vals = [regex_match(p, it["golds"]) for p, it in zip(preds, items, strict=True)]
            elif task in ("efficientqa", "facts"):
                vals = [alias_contained(p, it["golds"]) for p, it in zip(preds, items, strict=True)]
            else:
                sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
                vals = [
                    sc.score(it["golds"][0], p)["rougeL"].fmeasure for p, it in zip(preds, items, strict=True)
                ]
            out["samples"][task] = [
                [it["prompt"][-80:], p] for it, p in zip(items[:3], preds[:3], strict=False)
            ]
        else:
            pred = _choice_scores(model, tok, items, chat=task not in ("rome", "lama"))
            vals = [float(p == it["gold"]) for p, it in zip(pred, items, strict=True)]
            if task in DOWNSTREAM:
                out.setdefault("pred_dist", {})[task] = [
                    pred.count(k) for k in range(len(items[0]["choices"]))
                ]
        out["scores"][task] = sum(vals) / len(vals)
        out["seconds"][task] = round(time.time() - t0, 1)
        log.info("  %-12s %.3f  (%.0fs)", task, out["scores"][task], out["seconds"][task])
    return out
