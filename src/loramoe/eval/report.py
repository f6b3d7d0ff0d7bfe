"""Reports of evaluation runs: the results file, its Markdown table, and comparisons between runs.

Design decisions:

- One JSON per run (``results.json``, schema ``loramoe.eval/1``) is the interface: ``compare`` reads only these
  files, so runs made on different machines or days can be put side by side.
- Knowledge retention is a ratio of means (mean knowledge score after / before), not a mean of per-task ratios,
  which a task where the base scores near zero would dominate.
- Every file is written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramoe.errors import ConfigError
from loramoe.files import atomic_path, atomic_write_text, not_regular, read_json
from loramoe.validation import is_int, is_number, shown

__all__ = ["RESULTS_JSON", "RESULTS_MD", "SCHEMA", "compare", "results_markdown", "write_results"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCHEMA = "loramoe.eval/1"


def write_results(result: dict[str, Any], output_dir: str | Path) -> Path:
    """Write ``results.json`` and ``results.md`` into ``output_dir`` atomically; return the JSON's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_JSON, json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / RESULTS_MD, results_markdown(result))
    return out / RESULTS_JSON


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _fmt1(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def results_markdown(result: dict[str, Any]) -> str:
    """One run as a Markdown table: suite, task, primary metric, score ± stderr, other metrics, n, seconds."""
    cfg = result["config"]
    lines = [
        f"# Evaluation: {result['label']}",
        "",
        f"- model: `{result.get('model_info', {}).get('base_model') or cfg.get('model')}`, "
        f"adapter: `{cfg.get('adapter')}`, chat template: {cfg.get('chat_template')}",
        f"- limit: {cfg.get('limit') if cfg.get('limit') is not None else 'per-task default'}, "
        f"batch size {cfg.get('batch_size')}, total {result['seconds']:.0f} s, created {result['created']}",
        "",
        "| suite | task | metric | score | ± | other metrics | n | seconds | CPU seconds |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for task, r in result["tasks"].items():
        others = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if k != r["metric"])
        lines.append(
            f"| {r['suite']} | {task} | {r['metric']} | {r['score']:.3f} | {_fmt(r['stderr'].get(r['metric']))} "
            f"| {others} | {r['n']} | {r['seconds']:.1f} | {_fmt1(r.get('cpu_seconds'))} |"
        )
    return "\n".join(lines) + "\n"


def _suite_mean(run: dict[str, Any], tasks: list[str], suite: str) -> float | None:
    scores = [
        run["tasks"][t]["score"] for t in tasks if t in run["tasks"] and run["tasks"][t]["suite"] == suite
    ]
    return sum(scores) / len(scores) if scores else None


def compare(
    result_paths: list[str | Path], out_dir: str | Path, *, base: int | str | None = None, plot: bool = True
) -> str:
    """Put several runs side by side, with deltas against a base run and the knowledge-retention ratio.

    Args:
        result_paths: ``results.json`` files (or folders holding one) written by :func:`loramoe.eval.evaluate.evaluate_benchmarks`.
        out_dir: Where ``compare.md`` and ``compare.png`` are written (atomically).
        base: The base run, by index or label; default: the first run without an adapter, else the first run.
        plot: Also draw the grouped bar chart (needs matplotlib: ``pip install 'loramoe[plots]'``).

    Returns:
        The Markdown text. Retention = mean knowledge score of a run / the base's, on the tasks both ran; per
        task, the ratio is shown where the base scored above zero.

    Raises:
        ConfigError: Fewer than two runs, an unreadable file, or an unknown base.
        ImportError: ``plot`` and matplotlib is missing (names the ``loramoe[plots]`` extra).
    """
    if len(result_paths) < 2:
        raise ConfigError("compare needs at least two results.json files")
    runs = [_read_run(Path(p)) for p in result_paths]
    labels = _unique_labels([r["label"] for r in runs])
    b = _base_index(runs, labels, base)
    from loramoe.eval.tasks import TASKS

    tasks = [t for t in TASKS if any(t in r["tasks"] for r in runs)]
    tasks += sorted({t for r in runs for t in r["tasks"]} - set(tasks))
    order = [b] + [i for i in range(len(runs)) if i != b]
    lines = _score_table(runs, labels, tasks, order) + [""] + _retention_table(runs, labels, tasks, order)
    text = "\n".join(lines) + "\n"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plot:
        _bar_chart(tasks, [labels[i] for i in order], [runs[i] for i in order], out / "compare.png")
    atomic_write_text(out / "compare.md", text)
    return text


def _score_table(
    runs: list[dict[str, Any]], labels: list[str], tasks: list[str], order: list[int]
) -> list[str]:
    """Every task's score per run (the base first, ``order[0]``), with the difference and ratio to the base."""
    b = order[0]
    head = ["suite", "task", "metric"] + [labels[i] + (" (base)" if i == b else "") for i in order]
    lines = [
        f"# Comparison against {labels[b]}",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|" + "---:|" * len(order),
    ]
    for t in tasks:
        ref = runs[b]["tasks"].get(t)
        any_run = next(r["tasks"][t] for r in runs if t in r["tasks"])
        cells = [any_run["suite"], t, any_run["metric"]]
        for i in order:
            r = runs[i]["tasks"].get(t)
            if r is None:
                cells.append("–")
            elif i == b or ref is None:
                cells.append(f"{r['score']:.3f}")
            else:
                cell = f"{r['score']:.3f} ({r['score'] - ref['score']:+.3f}"
                cell += f", ×{r['score'] / ref['score']:.2f})" if ref["score"] > 0 else ")"
                cells.append(cell + ("*" if r["n"] != ref["n"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [
        "",
        "Cells: score (difference from the base, ratio to the base). * = a different number of documents.",
    ]


def _retention_table(
    runs: list[dict[str, Any]], labels: list[str], tasks: list[str], order: list[int]
) -> list[str]:
    """Per run: knowledge mean and its ratio to the base's (retention), downstream mean and its change; each on
    the tasks the run shares with the base."""
    b = order[0]
    lines = [
        "## Knowledge retention",
        "",
        "| run | knowledge mean | retention (after / before) | downstream mean | Δ downstream |",
        "|---|---:|---:|---:|---:|",
    ]
    for i in order:
        shared = [t for t in tasks if t in runs[i]["tasks"] and t in runs[b]["tasks"]]
        k, kb = _suite_mean(runs[i], shared, "knowledge"), _suite_mean(runs[b], shared, "knowledge")
        d, db = _suite_mean(runs[i], shared, "downstream"), _suite_mean(runs[b], shared, "downstream")
        ret = f"{k / kb:.3f}" if k is not None and kb else "–"
        dd = f"{d - db:+.3f}" if d is not None and db is not None else "–"
        lines.append(f"| {labels[i]} | {_fmt(k)} | {ret} | {_fmt(d)} | {dd} |")
    return lines


def _read_run(path: Path) -> dict[str, Any]:
    """A results file, checked for every field ``compare`` reads; errors name the file and the field."""
    file = path / RESULTS_JSON if path.is_dir() else path
    if not file.is_file() and not_regular(file) is None:
        raise ConfigError(f"{file}: no such results file; give a results.json or the folder holding one")
    # NaN is read, to be reported by its field below rather than as unreadable JSON
    try:
        run = read_json(file, error=ConfigError, what="results file", constants=True)
    except OSError as err:
        raise ConfigError(f"{file}: cannot read the results file ({err.strerror or err})") from err
    if not isinstance(run, dict) or run.get("schema") != SCHEMA:
        raise ConfigError(
            f"{file}: not a loramoe results file (schema {SCHEMA!r}); write it with loramoe eval"
        )

    def check(parent: dict, key: str, field: str, ok: Any, need: str) -> None:
        if not ok(parent.get(key)):
            got = shown(parent[key]) if key in parent else "nothing (the field is missing)"
            raise ConfigError(
                f"{file} field {field!r}: must be {need}, got {got}; the file was edited or damaged, write it "
                "again with loramoe evaluate"
            )

    check(run, "label", "label", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    check(run, "config", "config", lambda v: isinstance(v, dict), "an object")
    check(run, "tasks", "tasks", lambda v: isinstance(v, dict), "an object of task results")
    for task in run["tasks"]:
        check(run["tasks"], task, f"tasks.{task}", lambda v: isinstance(v, dict), "an object")
        for key, (ok, need) in _TASK_FIELDS.items():
            check(run["tasks"][task], key, f"tasks.{task}.{key}", ok, need)
    return run


_TASK_FIELDS = {
    "suite": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "metric": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "score": (is_number, "a finite number"),
    "n": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
}


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _base_index(runs: list[dict[str, Any]], labels: list[str], base: int | str | None) -> int:
    if base is None:
        return next((i for i, r in enumerate(runs) if not r["config"].get("adapter")), 0)
    if is_int(base) and 0 <= base < len(runs):
        return base
    if isinstance(base, str) and base in labels:
        return labels.index(base)
    raise ConfigError(f"base {base!r} is neither an index below {len(runs)} nor one of the labels {labels}")


def _bar_chart(tasks: list[str], labels: list[str], runs: list[dict[str, Any]], path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "compare() draws its chart with matplotlib: pip install 'loramoe[plots]' (or plot=False)"
        ) from e
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(6.0, 0.9 * len(tasks) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, (label, run) in enumerate(zip(labels, runs)):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
        ys = [run["tasks"][t]["score"] if t in run["tasks"] else 0.0 for t in tasks]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(tasks)), [t.removeprefix("loramoe_") for t in tasks], rotation=45, ha="right")
    ax.set_ylabel("primary metric")
    ax.set_title("Knowledge and downstream scores")
    ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
