"""The model card written beside an adapter (``README.md``), so that an adapter pushed to the Hub explains itself.

The card opens with the YAML front matter a Hub page reads (``base_model``, ``library_name: loramoe``, ``tags``),
then states the method, the base model, every config value, a summary of the training data and, when known, the
evaluation figures (world-knowledge retention and downstream scores).

Design decisions:

- A card carries a marker line (:data:`CARD_MARKER`). A ``README.md`` without it is the user's own and is never
  overwritten: the card is skipped with a warning that says how to get one. A card with the marker is ours and
  is rewritten with the adapter.
- Everything the card states comes from ``adapter_config.json`` and the arguments; it is a view of the adapter,
  not a second source of truth, so :func:`write_model_card` can redo it for a saved adapter (after an evaluation).
- ``results`` is the dict ``loramoe.eval.evaluate.evaluate_benchmarks`` returns (``tasks`` -> ``{suite, metric, score,
  n}``), read by key so that this core module imports nothing from the evaluation layer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loramoe.files import atomic_write_text

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
CARD_MARKER = "<!-- loramoe model card: rewritten by save_adapter / write_model_card; delete this line to keep edits -->"
TAGS = ("loramoe", "lora", "mixture-of-experts", "peft")
PAPER = "https://arxiv.org/abs/2312.09979"


def write_model_card(
    adapter_dir: str | os.PathLike[str],
    *,
    data: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    base_results: Mapping[str, Any] | None = None,
    hub_base_model: str | None = None,
) -> Path | None:
    """Write (or rewrite) ``README.md`` in a saved adapter's folder, unless a README of the user's is there.

    Args:
        adapter_dir: A folder written by ``loramoe.save_adapter``.
        data: The training data summary (``loramoe.data.dataset.DataStats.to_dict()``: examples, per task, per
            source, tokens, truncations).
        results: The adapter's evaluation (``loramoe.eval.evaluate.evaluate_benchmarks``'s result).
        base_results: The base model's evaluation on the same tasks; adds the base scores and the change.
        hub_base_model: The base model's Hub id for the front matter, when the recorded name is an alias or a
            local path; default: the recorded name when it has the Hub's ``org/name`` form.

    Returns:
        The card's path, or None when a ``README.md`` without the card marker was left as it was.
    """
    folder = Path(adapter_dir)
    meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    path = folder / CARD_NAME
    if path.is_file() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        log.warning(
            "%s is not a loramoe model card, so it was kept and no card was written; move it away (or add the "
            "card's marker line) and call loramoe.card.write_model_card to get one",
            path,
        )
        return None
    atomic_write_text(path, render_card(meta, data, results, base_results, hub_base_model))
    return path


def render_card(
    meta: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    base_results: Mapping[str, Any] | None = None,
    hub_base_model: str | None = None,
) -> str:
    """The card's Markdown for an ``adapter_config.json`` document and the optional facts (see
    :func:`write_model_card`)."""
    cfg, base = meta["config"], meta.get("base_model") or {}
    name = str(base.get("name_or_path") or "unknown")
    hub_id = hub_base_model or (name if _looks_like_hub_id(name) else None)
    front = ["---"] + ([f"base_model: {hub_id}"] if hub_id else []) + ["library_name: loramoe", "tags:"]
    front += [f"- {t}" for t in TAGS] + ["---", CARD_MARKER, ""]
    names = list(cfg.get("task_names") or [])
    n = int(cfg.get("num_experts") or 0)
    sizes = list(cfg.get("expert_groups") or ([n // 2] * len(names) if names else []))
    groups, start = [], 0
    for task, size in zip(names, sizes):
        groups.append(f"{task}: experts {start}-{start + size - 1}")
        start += size
    targets = ", ".join(cfg.get("target_modules") or []) or "the architecture's feed-forward linears"
    if cfg.get("lbc_weight"):
        lbc = (
            f"Training added the localized balancing constraint (LBC, weight {cfg.get('lbc_weight')}, delta "
            f"{cfg.get('lbc_delta')}), which steers each task type toward its own group of experts "
            f"({'; '.join(groups)}), so downstream fine-tuning leaves the base model's world knowledge within reach."
        )
    else:
        lbc = "It was trained without the localized balancing constraint (LBC weight 0): a mixture of LoRAs only."
    lines = [
        f"# LoRAMoE adapter for `{name}`",
        "",
        f"A [LoRAMoE]({PAPER}) adapter (Dou et al., ACL 2024) saved by the `loramoe` library "
        f"{meta.get('loramoe_version', '')}. The base model stays frozen; each targeted linear ({targets}) gets "
        f"{n} LoRA experts of rank {cfg.get('rank')}, mixed per token by its own router. {lbc} The experts "
        "cannot be merged into the base weights, because the routing depends on each token.",
        "",
        "## Use",
        "",
        "```python",
        "from loramoe.models.trained import load_trained",
        "",
        'model, tokenizer = load_trained("<this repository id or folder>")  # loads the base model it names',
        "```",
        "",
        'or `loramoe generate --adapter <id> --prompt "..."`, `loramoe serve --adapter <id>`.',
        "",
        "## Base model",
        "",
        _table(["field", "value"], [[k, f"`{v}`"] for k, v in base.items()]),
        "## LoRAMoE config",
        "",
        _table(["field", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in cfg.items()]),
    ]
    lines += _data_section(data) + _results_section(results, base_results)
    lines += [
        "## Files",
        "",
        f"`adapter_model.safetensors` (SHA-256 `{meta.get('weights_sha256')}`, checked on load) and "
        "`adapter_config.json` (the config above and the base model's identity, checked against the model the "
        "adapter is loaded onto).",
        "",
    ]
    return "\n".join(front + lines)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2 and all(parts) and not Path(name).expanduser().exists() and not name.startswith(".")
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _data_section(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return ["## Training data", "", "Not recorded (the adapter was saved outside loramoe's trainer).", ""]
    per_task = ", ".join(f"{k} {v:,}" for k, v in (data.get("per_task") or {}).items())
    rows = [
        ["training examples", f"{data.get('examples', 0):,}" + (f" ({per_task})" if per_task else "")],
        ["validation examples", f"{data.get('val_examples', 0):,}"],
        ["sources", ", ".join(f"{k} {v:,}" for k, v in (data.get("per_source") or {}).items()) or "-"],
        ["tokens (answer tokens)", f"{data.get('tokens', 0):,} ({data.get('label_tokens', 0):,})"],
        ["prompt template", data.get("template") or "-"],
        [
            "cut to max_length",
            f"{data.get('prompt_truncated', 0):,} prompts, {data.get('answer_truncated', 0):,} answers",
        ],
        ["invalid records skipped", f"{data.get('skipped_invalid', 0):,}"],
        ["special tokens written as text", _special_tokens(data)],
    ]
    return ["## Training data", "", _table(["", ""], rows)]


def _special_tokens(data: Mapping[str, Any]) -> str:
    """Samples whose text holds a special token of the tokenizer (trained as that token), and the first."""
    count, first = data.get("special_token_samples", 0), data.get("special_token_first")
    shown = str(first).replace("|", "\\|")  # a ChatML token's bars would end the table cell
    return f"{count:,} samples" + (f" (first: {shown})" if count and first else "")


def _results_section(results: Mapping[str, Any] | None, base: Mapping[str, Any] | None) -> list[str]:
    if not results or not results.get("tasks"):
        return []
    tasks: Mapping[str, Mapping[str, Any]] = results["tasks"]
    base_tasks: Mapping[str, Mapping[str, Any]] = (base or {}).get("tasks") or {}
    header = ["suite", "task", "metric", "score", "n"] + (["base", "change"] if base_tasks else [])
    rows: list[list[Any]] = []
    means: dict[Any, list[float]] = {}
    base_means: dict[Any, list[float]] = {}
    for task, r in tasks.items():
        row = [r.get("suite"), task, r.get("metric"), f"{r['score']:.3f}", r.get("n")]
        if base_tasks:
            b = base_tasks.get(task)
            row += [f"{b['score']:.3f}", f"{r['score'] - b['score']:+.3f}"] if b else ["-", "-"]
        rows.append(row)
        means.setdefault(r.get("suite"), []).append(r["score"])
        if task in base_tasks:
            base_means.setdefault(r.get("suite"), []).append(base_tasks[task]["score"])
    summary = []
    for suite, v in means.items():
        text = (
            f"- {'world-knowledge retention' if suite == 'knowledge' else suite} suite: mean {_mean(v):.3f}"
        )
        b = base_means.get(suite)
        if b and len(b) == len(v):
            text += f" (base model {_mean(b):.3f}, change {_mean(v) - _mean(b):+.3f})"
        summary.append(text + f" over {len(v)} task(s)")
    return ["## Evaluation", "", *summary, "", _table(header, rows)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
