"""Every answer metric of the project (QA, cloze, ranking, summaries, exact formats) and the mean's interval.

The one home of answer normalisation and scoring: lm-eval's task hooks (``eval/tasks/utils.py``) and the
evaluation engine (``eval/engine.py``, used by the demo and the experiments) both score with these functions.

Design decisions:

- Normalisation is SQuAD's (lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace), so
  ``exact_match`` and ``token_f1`` agree with the numbers reported in the QA literature.
- Every QA metric takes a *list* of gold aliases and returns the best score over them (WebQuestions and NQ-open
  list several acceptable answers).
- ``alias_contained`` exists because a chat model answers in a sentence ("The capital of France is Paris."): exact
  match would call that wrong. It matches on token boundaries, so the gold "us" is not found inside "bus".
- TREC answers are regular expressions written for raw text ("20,?320 f(ee|oo)t"), so ``regex_match`` searches the
  raw answer case-insensitively instead of the normalised one.
- ``verbatim_match`` compares the stripped answer with the gold as written, for tasks whose format is the answer.
- A generation is scored on its first non-empty line (``first_line``) by lm-eval's task hooks; the engine scores
  the whole (short, greedy) generation, as the demo and the experiments always did.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "GENERATION_METRICS",
    "alias_contained",
    "exact_match",
    "first_line",
    "mean_interval",
    "normalize_answer",
    "prefix_match",
    "rank_of_gold",
    "ranking_accuracy",
    "regex_match",
    "rouge_l",
    "token_f1",
    "verbatim_match",
    "wilson_interval",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise an answer the SQuAD way.

    Lowercases, removes ASCII punctuation, removes the articles ``a``/``an``/``the`` and collapses runs of
    whitespace to one space (stripping both ends).

    Args:
        text: A model answer or a gold alias.

    Returns:
        The normalised string, for example ``"The  Eiffel-Tower!"`` -> ``"eiffeltower"``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0.

    Args:
        prediction: The model's answer.
        golds: One gold answer or a list of aliases.

    Returns:
        1.0 or 0.0 (0.0 when ``golds`` is empty).
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # Both empty is agreement; one empty is a miss (SQuAD v2 convention).
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    n_same = sum(common.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Iterable[str]) -> float:
    """Bag-of-tokens F1 between the normalised prediction and the best-matching gold alias.

    Args:
        prediction: The model's answer.
        golds: One gold answer or a list of aliases.

    Returns:
        The maximum F1 over the aliases, in [0, 1] (0.0 when ``golds`` is empty).
    """
    pred_tokens = normalize_answer(prediction).split()
    return max((_f1(pred_tokens, normalize_answer(g).split()) for g in _as_list(golds)), default=0.0)


def alias_contained(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if some normalised gold alias occurs in the normalised prediction on token boundaries.

    Meant for chat-style generations that wrap the answer in a sentence. A gold alias that normalises to the
    empty string (for example ``"The"``) never matches.

    Args:
        prediction: The model's answer, possibly a full sentence.
        golds: One gold answer or a list of aliases.

    Returns:
        1.0 or 0.0.
    """
    padded = f" {normalize_answer(prediction)} "
    return _any_alias(golds, lambda norm: f" {norm} " in padded)


def prefix_match(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction starts with some normalised gold alias (on a token boundary).

    The natural score for a cloze continuation: ``"Antarctica. It is the largest"`` starts with ``"Antarctica"``.

    Args:
        prediction: The model's continuation.
        golds: One gold answer or a list of aliases.

    Returns:
        1.0 or 0.0.
    """
    padded = f"{normalize_answer(prediction)} "
    return _any_alias(golds, lambda norm: padded.startswith(f"{norm} "))


def _any_alias(golds: str | Iterable[str], found: Callable[[str], bool]) -> float:
    """1.0 if ``found`` holds for some gold alias, normalised; an alias that normalises to "" never matches."""
    return float(any((norm := normalize_answer(g)) and found(norm) for g in _as_list(golds)))


def regex_match(prediction: str, patterns: str | Iterable[str]) -> float:
    """1.0 if any pattern matches a substring of the raw prediction, case-insensitively.

    A pattern that is not a valid regular expression is matched literally instead of raising, since gold
    files are data, not code.

    Args:
        prediction: The model's answer (not normalised: TREC patterns expect raw text).
        patterns: One regular expression or several.

    Returns:
        1.0 or 0.0.
    """
    for pattern in _as_list(patterns):
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error:
            compiled = re.compile(re.escape(pattern), re.IGNORECASE)
        if compiled.search(prediction):
            return 1.0
    return 0.0


def rank_of_gold(logliks: Sequence[float], gold: int) -> int:
    """1-based rank of the gold choice when choices are sorted by log-likelihood, ties counted against gold.

    A tie with a distractor ranks the gold below it, so a model that gives every choice the same score gets
    the worst rank rather than a lucky first place.

    Args:
        logliks: One log-likelihood per choice, shape ``(C,)``.
        gold: Index of the correct choice.

    Returns:
        The rank, 1 = the gold choice scored strictly highest.

    Raises:
        ValueError: If ``gold`` is out of range or a score is NaN.
    """
    if not 0 <= gold < len(logliks):
        raise ValueError(f"gold index {gold} is out of range for {len(logliks)} choices")
    if any(math.isnan(x) for x in logliks):
        raise ValueError("a log-likelihood is NaN; check the model's outputs")
    target = logliks[gold]
    return 1 + sum(1 for i, x in enumerate(logliks) if i != gold and x >= target)


def ranking_accuracy(logliks: Sequence[float], gold: int) -> float:
    """1.0 if the gold choice has the strictly highest log-likelihood, else 0.0 (see :func:`rank_of_gold`).

    Args:
        logliks: One log-likelihood per choice, shape ``(C,)``.
        gold: Index of the correct choice.

    Returns:
        1.0 or 0.0.
    """
    return float(rank_of_gold(logliks, gold) == 1)


def verbatim_match(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if the stripped prediction equals a gold exactly: case, punctuation and spacing count.

    For tasks whose format is the answer (the demo's ``#N#`` sums, its code words), where normalising would
    accept a wrong format.

    Args:
        prediction: The model's answer.
        golds: One gold answer or a list of them.

    Returns:
        1.0 or 0.0.
    """
    pred = prediction.strip()
    return float(any(pred == g for g in _as_list(golds)))


def rouge_l(prediction: str, references: str | Iterable[str]) -> float:
    """ROUGE-L F-measure with stemming (Google's ``rouge-score``), best over the references.

    Args:
        prediction: The model's summary.
        references: One reference summary or several.

    Returns:
        The F-measure in [0, 1] (0.0 when there is no reference).

    Raises:
        ImportError: ``rouge-score`` is not installed; the message names the extra.
    """
    scorer = _rouge_scorer()
    return max(
        (scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_list(references)), default=0.0
    )


@functools.cache
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ROUGE needs the rouge-score package: pip install 'loramoe[eval]'") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def first_line(text: str) -> str:
    """The first non-empty line of a generation, stripped ("" when there is none).

    An answer, a completion or a summary is one line; what a model adds after it (a new "Question:", an
    explanation) is not part of the answer.
    """
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


GENERATION_METRICS: dict[str, Callable[[str, Any], float]] = {
    "contains": alias_contained,
    "em": exact_match,
    "f1": token_f1,
    "prefix": prefix_match,
    "regex": regex_match,
    "rougeL": rouge_l,
    "verbatim": verbatim_match,
}
"""Metric name -> ``f(prediction, golds)``: every metric that scores a generated answer against its golds."""


Z95 = 1.959964
"""The two-sided 95 % quantile of the standard normal distribution."""


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (stays inside [0, 1], sound near 0 and 1).

    Args:
        successes: Items scored 1.
        n: Items scored.
        z: Interval half-width in standard normal quantiles (:data:`Z95`: 95 %).

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` when no item was scored.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def mean_interval(values: Sequence[float], z: float = Z95) -> dict[str, float | None]:
    """The mean of per-item scores, its standard error and a confidence interval.

    The mean is ``sum / n``, so it equals a plain average of the same floats bit for bit. The standard error is
    the one lm-eval reports for a mean: the sample standard deviation (n - 1) over sqrt(n). The interval is the
    Wilson interval when every value is 0 or 1 (an accuracy), else mean +/- z standard errors.

    Args:
        values: One score per item (at least one).
        z: Interval half-width in standard normal quantiles (:data:`Z95`: 95 %).

    Returns:
        ``{"mean", "stderr", "low", "high", "n"}``; for one item ``stderr`` is None, and so are ``low`` and
        ``high`` unless the value is 0 or 1.

    Raises:
        ValueError: No values.
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to average; score at least one item")
    mean = sum(values) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n) if n > 1 else None
    if all(x in (0.0, 1.0) for x in values):
        low, high = wilson_interval(sum(values), n, z)
    elif stderr is not None:
        low, high = mean - z * stderr, mean + z * stderr
    else:
        low = high = None
    return {"mean": mean, "stderr": stderr, "low": low, "high": high, "n": n}
