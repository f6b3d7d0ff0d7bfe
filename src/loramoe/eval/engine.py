"""The evaluation engine: score a model on fixed item sets, by generation or by log-likelihood choice.

The demo and the experiments call :func:`score_item_sets` on their own item sets; ``loramoe eval`` runs lm-eval, whose
model type (:mod:`loramoe.eval.lm_eval_model`) computes its log-likelihoods with :func:`continuation_logprobs`
and whose task hooks score answers with the metrics of :mod:`loramoe.eval.metrics`. So each job has one home:
answer normalisation and metrics in ``metrics``, the log-likelihood forward and the generation-or-choice
dispatch here, greedy generation in :func:`loramoe.inference.generate.complete` (the token loop that
``generate``, ``chat`` and ``serve`` share).

Design decisions:

- An item is a plain dict. A generation item has ``prompt`` and ``golds`` (aliases, patterns or a reference); a
  choice item has ``prompt``, ``choices`` and ``gold`` (the index of the right choice).
- A choice is scored by the summed log-probability of its tokens after the prompt (lm-eval's ``acc``: the first
  highest choice is the prediction). The prompt is the chat template's user turn, or plain text followed by a
  space and the choice; prompt and choice are tokenized separately, so every choice sees the same prompt ids.
- One forward pass per sequence, longest first, batched, right-padded with an attention mask, log-softmax in
  float32. Single-token choices of one item share one sequence: their log-prob is read at the last prompt
  position, which no later token can change in a causal model.
- Generation is greedy (``generate``'s defaults). Generation tasks with the same settings can be pooled into one
  ``generate`` call (``pool_generation``); pooling decides the batches, and so the padding, that each prompt sees.
- A task's score is the plain mean of its per-item values; ``metrics.mean_interval`` gives its standard error
  (lm-eval's for a mean) and a 95 % interval: Wilson's for accuracies, mean +/- 1.96 standard errors otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loramoe.errors import ConfigError
from loramoe.eval.metrics import GENERATION_METRICS, mean_interval
from loramoe.inference.encoding import encode_chat
from loramoe.inference.generate import complete
from loramoe.validation import boolean, check_fields, integer, one_of, optional

__all__ = ["Task", "TaskResult", "choice_ids", "continuation_logprobs", "predict_choices", "score_item_sets"]

Item = dict[str, Any]


# "acc": choice by log-likelihood; the others score generated text.
_TASK_RULES = {
    "metric": one_of(["acc", *sorted(GENERATION_METRICS)]),
    "chat_template": optional(boolean()),
    "max_new_tokens": integer(1),
}


@dataclass(frozen=True)
class Task:
    """How one item set is scored.

    Attributes:
        metric: ``"acc"`` to score choice items by log-likelihood, or a generation metric of
            :data:`loramoe.eval.metrics.GENERATION_METRICS` (``contains``, ``regex``, ``rougeL``, ...).
        chat_template: Wrap prompts in the tokenizer's chat template; None = when the tokenizer has one.
        max_new_tokens: Tokens generated per prompt (generation tasks).
    """

    metric: str
    chat_template: bool | None = True
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        check_fields(self, _TASK_RULES)

    @property
    def by_choice(self) -> bool:
        """True when the items are scored by log-likelihood choice rather than by generation."""
        return self.metric == "acc"


@dataclass
class TaskResult:
    """One task's outcome: the per-item values and predictions, their mean, and its interval.

    Attributes:
        values: One score per item, in item order.
        predictions: The generated text (generation) or the chosen index (choice) per item.
        seconds: Wall time; pooled generation tasks share their call's time in proportion to their items.
        token_ids: The generated token ids per item (generation tasks), the end token included.
    """

    values: list[float]
    predictions: list[Any]
    seconds: float = 0.0
    token_ids: list[list[int]] | None = None
    interval: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.interval = mean_interval(self.values)

    @property
    def score(self) -> float:
        """The mean of :attr:`values`."""
        return self.interval["mean"]


def score_item_sets(
    model: Any,
    tokenizer: Any,
    sets: dict[str, list[Item]],
    tasks: dict[str, Task],
    *,
    batch_size: int = 16,
    pool_generation: bool = False,
    progress: bool = False,
) -> dict[str, TaskResult]:
    """Score ``model`` on each item set with its task's method.

    Args:
        model: A causal LM (plain or adapted).
        tokenizer: Its tokenizer.
        sets: Task name -> items (see the module docstring for their keys).
        tasks: Task name -> how to score it; every name of ``sets`` needs one.
        batch_size: Sequences per forward pass and prompts per ``generate`` call.
        pool_generation: Generate the prompts of all generation tasks with equal settings in one call.
        progress: Show generation progress bars.

    Returns:
        Task name -> result, in the order of ``sets``.

    Raises:
        ConfigError: A set without a task, or an empty set.
    """
    for name, items in sets.items():
        if name not in tasks:
            raise ConfigError(f"no task given for item set {name!r}; known: {sorted(tasks)}")
        if not items:
            raise ConfigError(f"item set {name!r} is empty")
    results: dict[str, TaskResult] = {}
    for group in _schedule(sets, tasks, pool_generation):
        task = tasks[group[0]]
        start = time.perf_counter()
        if task.by_choice:
            preds = predict_choices(
                model, tokenizer, sets[group[0]], task.chat_template, batch_size=batch_size
            )
            outputs, ids = {group[0]: preds}, {}
        else:
            outputs, ids = _generate_group(
                model, tokenizer, {n: sets[n] for n in group}, task, batch_size, progress
            )
        seconds = time.perf_counter() - start
        total = sum(len(sets[n]) for n in group)
        for name in group:
            metric = GENERATION_METRICS.get(tasks[name].metric)
            values = [
                float(p == it["gold"]) if metric is None else metric(p, it["golds"])
                for p, it in zip(outputs[name], sets[name], strict=True)
            ]
            share = seconds * len(sets[name]) / total
            results[name] = TaskResult(values, outputs[name], share, token_ids=ids.get(name))
    return {name: results[name] for name in sets}


def _schedule(sets: dict[str, list[Item]], tasks: dict[str, Task], pool: bool) -> list[list[str]]:
    """Groups of task names run together: each choice task alone, generation tasks pooled by settings."""
    groups: list[list[str]] = []
    pooled: dict[tuple[bool | None, int], list[str]] = {}
    for name in sets:
        task = tasks[name]
        if task.by_choice or not pool:
            groups.append([name])
            continue
        key = (task.chat_template, task.max_new_tokens)
        if key not in pooled:
            pooled[key] = []
            groups.append(pooled[key])
        pooled[key].append(name)
    return groups


def _generate_group(
    model: Any, tokenizer: Any, sets: dict[str, list[Item]], task: Task, batch_size: int, progress: bool
) -> tuple[dict[str, list[str]], dict[str, list[list[int]]]]:
    """Per set: the generated texts and their token ids."""
    prompts = [it["prompt"] for items in sets.values() for it in items]
    done = complete(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size,
                    chat_template=task.chat_template, progress=progress)  # fmt: skip
    texts, ids, start = {}, {}, 0
    for name, items in sets.items():
        part, start = done[start : start + len(items)], start + len(items)
        texts[name], ids[name] = [c.text for c in part], [c.token_ids for c in part]
    return texts, ids


def choice_ids(
    tokenizer: Any, prompt: str, choices: Sequence[str], chat: bool
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of each choice (no special tokens added beyond the chat template's own).

    Args:
        tokenizer: The model's tokenizer.
        prompt: The question; the user turn when ``chat``.
        choices: The candidate answers.
        chat: Wrap the prompt in the chat template (the choices then follow the assistant cue directly); else
            the prompt is plain text and each choice follows it after a space.

    Returns:
        ``(prompt_ids, [choice_ids, ...])``.
    """
    if chat:
        context = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    else:
        context = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    conts = [list(tokenizer(c if chat else " " + c, add_special_tokens=False)["input_ids"]) for c in choices]
    return context, conts


def predict_choices(
    model: Any, tokenizer: Any, items: Sequence[Item], chat: bool | None, *, batch_size: int = 16
) -> list[int]:
    """The index of the highest-log-likelihood choice of each item (the first of equal ones).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        items: Choice items (``prompt``, ``choices``).
        chat: Use the chat template (None = when the tokenizer has one).
        batch_size: Sequences per forward pass.

    Returns:
        One index per item.
    """
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    encoded = [choice_ids(tokenizer, it["prompt"], it["choices"], use_chat) for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = continuation_logprobs(model, encoded, batch_size=batch_size, pad_id=pad)
    preds = []
    for per_choice in scored:
        logps = [logp for logp, _greedy in per_choice]
        preds.append(max(range(len(logps)), key=logps.__getitem__))
    return preds


def continuation_logprobs(
    model: Any,
    requests: Sequence[tuple[list[int], Sequence[list[int]]]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    share: str = "single",
) -> list[list[tuple[float, bool]]]:
    """Summed log-probability of each continuation after its context, and whether greedy decoding yields it.

    Continuations of one item that would run the same tokens share one sequence: a continuation's log-probs
    are read at the positions before its tokens, which later tokens cannot change in a causal model.

    Args:
        model: A causal LM returning ``logits`` of shape ``(B, T, V)``.
        requests: Per item, ``(context_ids, [continuation_ids, ...])``; every id list non-empty.
        batch_size: Sequences per forward pass.
        pad_id: The id padding the right end of shorter sequences (masked out).
        share: ``"single"``: single-token continuations share a sequence (the choice scoring of the demo and
            the experiments, whose batches, and so whose floats, depend on it); ``"prefix"``: continuations that
            are equal but for their last token share one (lm-eval's rule, which halves the passes for labels
            that tokenize as a common first token plus a word).

    Returns:
        Per item, per continuation: ``(log_prob, is_greedy)``.

    Raises:
        ConfigError: An empty context or continuation.
    """
    seqs, reads = _plan_sequences(requests, share)
    out: list[list[tuple[float, bool]]] = [[(0.0, False)] * len(conts) for _ctx, conts in requests]
    by_seq: dict[int, list[tuple[int, int, list[int]]]] = {}
    for item, choice, k, cont in reads:
        by_seq.setdefault(k, []).append((item, choice, cont))
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                logp = _forward(model, [seqs[k][0] for k in chunk], pad_id, device)  # (B, T, V)
                for row, k in enumerate(chunk):
                    n_ctx = seqs[k][1]
                    for item, choice, cont in by_seq[k]:
                        lp = logp[row, n_ctx - 1 : n_ctx - 1 + len(cont)]  # (C, V)
                        target = torch.tensor(cont, device=device)
                        greedy = bool((lp.argmax(-1) == target).all())
                        out[item][choice] = (lp.gather(1, target[:, None]).sum().item(), greedy)
    finally:
        model.train(was_training)
    return out


def _plan_sequences(
    requests: Sequence[tuple[list[int], Sequence[list[int]]]], share: str
) -> tuple[list[tuple[list[int], int]], list[tuple[int, int, int, list[int]]]]:
    """Sequences to run, ``(ids, n_context)``, and per continuation ``(item, choice, sequence, ids)`` to read."""
    if share not in ("single", "prefix"):
        raise ConfigError(f"share must be 'single' or 'prefix', got {share!r}")
    seqs: list[tuple[list[int], int]] = []
    reads: list[tuple[int, int, int, list[int]]] = []
    for i, (ctx, conts) in enumerate(requests):
        if not ctx or not conts or any(not c for c in conts):
            raise ConfigError(f"request {i} has an empty context or continuation; every one needs tokens")
        if share == "prefix":
            keys: dict[tuple[int, ...], int] = {}
            for j, cont in enumerate(conts):
                key = tuple(cont[:-1])
                if key not in keys:
                    keys[key] = len(seqs)
                    seqs.append((list(ctx) + list(cont), len(ctx)))
                reads.append((i, j, keys[key], list(cont)))
            continue
        # single: each multi-token continuation runs alone; single-token ones ride on the item's first sequence
        multi = [j for j, c in enumerate(conts) if len(c) > 1]
        first = len(seqs)
        for j in multi or [0]:
            seqs.append((list(ctx) + list(conts[j]), len(ctx)))
        for j, cont in enumerate(conts):
            reads.append((i, j, first + (multi.index(j) if j in multi else 0), list(cont)))
    return seqs, reads


def _forward(model: Any, seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Log-softmax of the logits of right-padded sequences, ``(B, T, V)`` in float32."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return torch.log_softmax(logits.float(), dim=-1)
