"""Evaluation: run this project's lm-eval tasks on a base model or an adapter; report and compare runs.

Design decisions:

- lm-eval runs the tasks (documents, prompts, chat templates, generation) through the ``loramoe`` model type,
  whose log-likelihoods are the evaluation engine's (:mod:`loramoe.eval.engine`); this module picks the tasks,
  gives each its own ``limit`` (:data:`loramoe.eval.tasks.TASKS`), times each, and writes one JSON + one Markdown
  table per run.
- Each metric's mean and standard error come from lm-eval's per-document scores through
  :func:`loramoe.eval.metrics.mean_interval`, the function behind the engine's intervals (the same formula as
  lm-eval's own for a mean).
- The model is built once and reused across tasks, so per-task times exclude loading.
- Writing and comparing results lives in :mod:`loramoe.eval.report`. ``compare`` puts runs side by side against a base run and reports *knowledge retention*: mean knowledge score
  after fine-tuning / mean knowledge score before. The LoRAMoE paper's claim is that this stays near 1 while
  downstream scores rise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loramoe.errors import ConfigError
from loramoe.eval.metrics import mean_interval
from loramoe.eval.report import SCHEMA, write_results
from loramoe.hub import is_hub_id
from loramoe.inject import disable_experts, experts_spec
from loramoe.models.base import DTYPES
from loramoe.models.bundled import DEFAULT_MODEL
from loramoe.validation import boolean, check_fields, from_mapping, integer, one_of, optional, text

log = logging.getLogger(__name__)

_RULES = {
    "model": optional(text()),
    "limit": optional(integer(0)),
    "batch_size": integer(1),
    "max_new_tokens": optional(integer(1)),
    "chat_template": (optional(boolean())[0], "true, false or null (when the tokenizer has one)"),
    "output_dir": (text()[0], "a folder for results.json"),
    "threads": optional(integer(1)),
    "dtype": one_of(DTYPES),
}


@dataclass
class EvalConfig:
    """What to evaluate and how.

    Attributes:
        model: Base model name, alias or directory; None = the base the adapter names, or the bundled
            smollm2-135m-instruct when there is no adapter.
        adapter: A loramoe adapter / training output directory, a Hugging Face Hub repository id (org/name) of an
            adapter (an existing directory of that name wins), or None for the base model alone.
        tasks: Suites (knowledge, downstream, all) and/or task names (webq, trec, nq, rome_gen, rome_rank,
            lama_gen, lama_rank, sst2, rte, boolq, agnews, xsum); a comma-separated string is accepted.
        limit: Documents per task: None = each task's CPU-sized default (100 QA/cloze, 200 classification,
            50 XSum), 0 = every document, N = N for every task.
        batch_size: lm-eval batch size.
        max_new_tokens: Cap on generated tokens for generation tasks; None keeps each task's own (8 to 40).
        chat_template: Wrap prompts in the tokenizer's chat template (lm-eval's apply_chat_template); None = when
            the tokenizer has one, as training does (``DataConfig.template = "auto"``).
        data_dir: Local data folder (webquestions/, sst2/, ... as listed in eval/tasks/sources.json); None =
            $LORAMOE_DATA_DIR, else the pinned sources downloaded into the datasets cache (found there offline).
        output_dir: Where results.json and results.md are written.
        label: Name of this run in reports and comparisons; default: the adapter folder name or "base".
        device: cpu, cuda, cuda:N; None = CUDA when available.
        dtype: float32 (default, CPU), bfloat16, float16 or auto.
        threads: torch CPU threads during the run; None keeps torch's setting. On a shared machine 1 can be
            several times faster than oversubscribed cores.
        experts_off: LoRAMoE experts switched off for the whole evaluation (``loramoe.disable_experts``): an
            expert group by its task name (``knowledge``, ``downstream``) or expert indices (``"0,2"``); the router
            is renormalised over the rest. None: every expert on.
    """

    model: str | None = None
    adapter: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["all"])
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    chat_template: bool | None = None
    data_dir: str | None = None
    output_dir: str = "runs/eval"
    label: str | None = None
    device: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    experts_off: str | list[int] | None = None

    def __post_init__(self) -> None:
        from loramoe.eval.tasks import expand_tasks

        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t.strip()]
        self.tasks = [str(t).strip() for t in self.tasks]
        if not self.tasks:
            raise ConfigError("tasks is empty; give a suite (knowledge, downstream, all) or task names")
        expand_tasks(self.tasks)
        check_fields(self, _RULES)
        if self.adapter is not None and not (Path(self.adapter).is_dir() or is_hub_id(self.adapter)):
            raise ConfigError(
                f"adapter directory {self.adapter} does not exist (nor is it a Hub repository id, org/name)"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(
                f"data_dir {self.data_dir} does not exist (it should hold webquestions/, sst2/, ...)"
            )
        if self.experts_off is not None:
            self.experts_off = experts_spec(self.experts_off)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """Build from a dict (YAML/JSON), rejecting unknown keys by name."""
        return from_mapping(cls, data, where="eval settings")

    @property
    def run_label(self) -> str:
        """The label used in reports."""
        if self.label:
            return self.label
        return Path(self.adapter).name if self.adapter else "base"


def evaluate_benchmarks(cfg: EvalConfig, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run the configured tasks with lm-eval and write ``results.json`` and ``results.md`` to ``cfg.output_dir``.

    Args:
        cfg: The evaluation settings.
        model: An in-memory model to evaluate instead of loading ``cfg.model`` (an adapter in ``cfg.adapter`` is
            then injected into it in place).
        tokenizer: The tokenizer for ``model``.

    Returns:
        The results dict that was written (see :func:`write_results` for its layout).

    Raises:
        ConfigError: Bad settings or data directory.
        DataError: A task's data file is missing.
    """
    from lm_eval.tasks import TaskManager

    from loramoe.eval.tasks import check_data, expand_tasks, resolve_data_dir, task_dir
    from loramoe.inference.threads import torch_threads

    tasks = expand_tasks(cfg.tasks)
    data_dir = resolve_data_dir(cfg.data_dir, tasks)
    check_data(tasks, data_dir)
    manager = TaskManager(include_path=str(task_dir(data_dir)), include_defaults=False)
    with torch_threads(cfg.threads):
        return _run_tasks(cfg, tasks, data_dir, manager, model, tokenizer)


def _evaluate_task(cfg: EvalConfig, task: str, manager: Any, lm: Any, chat: bool) -> dict[str, Any]:
    """One task through lm-eval, with its per-document scores, mean, interval and times."""
    import lm_eval

    from loramoe.eval.tasks import TASKS

    spec = TASKS[task]
    limit = spec.limit if cfg.limit is None else (cfg.limit or None)
    gen_kwargs = {"max_gen_toks": cfg.max_new_tokens} if spec.generative and cfg.max_new_tokens else None
    t0, c0 = time.perf_counter(), time.process_time()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        limit=limit,
        task_manager=manager,
        apply_chat_template=chat,
        gen_kwargs=gen_kwargs,
        log_samples=True,  # the per-document scores, for the means and intervals
        bootstrap_iters=0,
    )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    done = _task_result(task, out, seconds, cpu_seconds)
    log.info("%s: %s = %.4f (%d docs, %.1f s)", task, spec.metric, done["score"], done["n"], seconds)
    return done


def _run_tasks(
    cfg: EvalConfig, tasks: list[str], data_dir: Path, manager: Any, model: Any, tokenizer: Any
) -> dict[str, Any]:
    from loramoe.eval.lm_eval_model import LoRAMoELM

    start = time.perf_counter()
    lm = LoRAMoELM(
        pretrained=model if model is not None else (cfg.model or (None if cfg.adapter else DEFAULT_MODEL)),
        adapter=cfg.adapter,
        tokenizer=tokenizer,
        dtype=cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
    )
    load_seconds = time.perf_counter() - start
    chat = (
        cfg.chat_template
        if cfg.chat_template is not None
        else bool(getattr(lm.tokenizer, "chat_template", None))
    )

    result = {
        "schema": SCHEMA,
        "label": cfg.run_label,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**cfg.to_dict(), "data_dir": str(data_dir), "chat_template": chat},
        "model_info": lm.get_model_info() | {"load_seconds": round(load_seconds, 2)},
        "environment": _environment(),
        "tasks": {},
        "seconds": 0.0,
    }
    off = (
        disable_experts(lm.model, cfg.experts_off)
        if cfg.experts_off is not None
        else contextlib.nullcontext()
    )
    with off:
        for task in tasks:
            result["tasks"][task] = _evaluate_task(cfg, task, manager, lm, chat)
            result["seconds"] = round(time.perf_counter() - start, 2)
            # after every task: an interrupted run keeps what it measured
            write_results(result, cfg.output_dir)

    return result


def _task_result(task: str, out: dict[str, Any], seconds: float, cpu_seconds: float) -> dict[str, Any]:
    from loramoe.eval.tasks import TASKS

    spec = TASKS[task]
    raw = out["results"][task]
    # Means and standard errors from the per-document scores, by the function the engine uses for its intervals.
    names = [k.split(",")[0] for k in raw if "," in k and "_stderr" not in k]
    intervals = {name: mean_interval([float(s[name]) for s in out["samples"][task]]) for name in names}
    metrics = {name: interval["mean"] for name, interval in intervals.items()}
    stderr = {name: interval["stderr"] for name, interval in intervals.items()}
    n = out.get("n-samples", {}).get(task, {})
    return {
        "suite": spec.suite,
        "metric": spec.metric,
        "score": metrics[spec.metric],
        "metrics": metrics,
        "stderr": stderr,
        "n": int(n.get("effective", raw.get("sample_len", 0))),
        "n_available": int(n.get("original", 0)),
        "seconds": round(seconds, 2),
        # Process CPU time over all threads, and the machine's load: wall time alone misleads on a shared machine.
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _environment() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    from loramoe._version import __version__

    return {
        "loramoe": __version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": str(torch.get_num_threads()),
    }
