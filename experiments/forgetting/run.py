"""Forgetting experiment: does LoRAMoE keep world knowledge through SFT better than LoRA / full fine-tuning?

A CPU-scale reproduction of the LoRAMoE paper's claim (arXiv 2312.09979): SFT SmolLM2-135M-Instruct on a mixture of
downstream tasks (SST-2, AG News, RTE, BoolQ, XSum, Alpaca) and closed-book QA (NQ-open dev, WebQuestions train) at
several sizes, with four methods, and score every checkpoint on knowledge suites that are NOT in the mixture (TREC,
EfficientQA, ROME, LAMA) and on the downstream suites.

Usage (from the repository root):

    .venv/bin/python experiments/forgetting/run.py --smoke          # ~2 min toy run of the whole pipeline
    nohup .venv/bin/python experiments/forgetting/run.py > runs/forgetting/driver.log 2>&1 &
    .venv/bin/python experiments/forgetting/run.py --report         # table + figures into docs/

Every run writes ``runs/forgetting/<run>/eval.json``; a run with that file is skipped, a run with a finished
training output (``train_results.json``) is only evaluated, so the driver resumes after an interruption.

The evaluator is deliberately lean (small fixed subsets, identical for every checkpoint) because the whole
experiment must fit in ~6 CPU-hours; it reuses the eval splits and the ROME/LAMA distractors of
``loramoe.eval.tasks.utils`` so the rows it scores are the lm-eval tasks' own rows (held-out BoolQ / XSum tails).
Prompts are wrapped in the model's chat template, exactly as ``loramoe.data`` formats the SFT records, except
the ROME/LAMA ranking probes, which score plain-text cloze continuations (format-free knowledge probes).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluator import KNOWLEDGE, evaluate  # noqa: E402  (experiments/forgetting/evaluator.py)
from mixture import eval_sets, prepare_sft_data, sft_sources  # noqa: E402  (experiments/forgetting/mixture.py)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OUT = REPO / "runs" / "forgetting"
BASE_CONFIG = HERE / "base.yaml"

log = logging.getLogger("forgetting")

# ----------------------------------------------------------------------------------------------------------------
# The plan

SIZES = [1000, 100, 300]  # SFT samples; largest first (most informative), then the cheap smallest
METHODS = {
    # name: (method, overrides); lr is fixed per method family, chosen once before any result (see README)
    "loramoe": ("loramoe", {"loramoe": {"lbc_delta": 0.1, "lbc_weight": 0.1}}),
    "lora": ("lora", {}),
    "full": ("full", {}),
    "loramoe_nolbc": ("loramoe", {"loramoe": {"lbc_delta": 0.1, "lbc_weight": 0.0}}),
}
SWEEP = {  # at the largest size only
    "loramoe_d0.3_w0.1": ("loramoe", {"loramoe": {"lbc_delta": 0.3, "lbc_weight": 0.1}}),
    "loramoe_d0.1_w1.0": ("loramoe", {"loramoe": {"lbc_delta": 0.1, "lbc_weight": 1.0}}),
    # the same, with only non-padding positions in the LBC's importance (the reference counts padding too)
    "loramoe_d0.1_w1.0_np": (
        "loramoe",
        {"loramoe": {"lbc_delta": 0.1, "lbc_weight": 1.0, "lbc_positions": "non_padding"}},
    ),
    # added after the one above localized: does a stronger localization (targets 0.65 / 0.35) keep the facts?
    "loramoe_d0.3_w1.0_np": (
        "loramoe",
        {"loramoe": {"lbc_delta": 0.3, "lbc_weight": 1.0, "lbc_positions": "non_padding"}},
    ),
}
LR = {"loramoe": 1.0e-3, "lora": 1.0e-3, "full": 1.0e-4}
# replicates at the largest size: run-name suffix -> seed (the plan's runs use seed 42), and the methods replicated
SEEDS = {"_s2": 43}
REPLICATED = ["lora", "loramoe", "loramoe_nolbc", "full"]

EVAL_N = {"trec": 100, "efficientqa": 30, "rome": 100, "lama": 100, "facts": 108,
          "sst2": 60, "rte": 40, "boolq": 40, "agnews": 40, "xsum": 6}  # fmt: skip
SMOKE_N = dict.fromkeys(EVAL_N, 3)


def plan(smoke: bool) -> list[tuple[str, str, dict, int]]:
    """(run name, method, overrides, size), in the order they run."""
    if smoke:
        return [(f"{m}_n8", *METHODS[m], 8) for m in ("loramoe", "lora", "full")]
    runs = [(f"{m}_n{n}", *METHODS[m], n) for n in SIZES for m in METHODS]
    runs += [(f"{m}_n{SIZES[0]}", *spec, SIZES[0]) for m, spec in SWEEP.items()]
    runs += [(f"{m}_n{SIZES[0]}{sfx}", *METHODS[m], SIZES[0]) for sfx in SEEDS for m in REPLICATED]
    return runs


def seed_of(name: str) -> int:
    """The seed of a run (data order and sample draw, adapter init, dropout): 42 unless a replicate's suffix says."""
    return next((seed for sfx, seed in SEEDS.items() if name.endswith(sfx)), 42)


# ----------------------------------------------------------------------------------------------------------------
# Driver


def load_eval_sets(out: Path, n: dict[str, int]) -> dict[str, list[dict]]:
    """The fixed eval sets of ``out`` (``eval_sets.json``); suites added to ``n`` since it was written are appended,
    the existing ones are never re-drawn."""
    path = out / "eval_sets.json"
    sets = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if missing := [t for t in n if t not in sets]:
        new = eval_sets(n)
        sets.update({t: new[t] for t in missing})
        _write_json(path, sets)
    return sets


def _weights_dir(run_dir: Path) -> Path:
    """Where a finished run's weights are: the run directory, or (full fine-tuning, whose top-level weights the
    driver deletes after evaluation) its final checkpoint."""
    from loramoe.training.checkpoints import latest_good_checkpoint

    if any(run_dir.glob("*.safetensors")):
        return run_dir
    last = latest_good_checkpoint(run_dir, quiet=True)
    if last is None:
        raise SystemExit(f"{run_dir}: no weights left to evaluate (no *.safetensors, no complete checkpoint)")
    return Path(last)


def top_up(run_dir: Path, sets: dict[str, list[dict]], load) -> bool:
    """Evaluate a finished run on the suites its ``eval.json`` lacks (added to the plan later) and merge them in."""
    res = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    missing = {t: items for t, items in sets.items() if t not in res["scores"]}
    if not missing:
        return False
    log.info("eval %s on the suites added later: %s", run_dir.name, ", ".join(missing))
    model, tok = load()
    extra = evaluate(model, tok, missing)
    for key, values in extra.items():
        res.setdefault(key, {}).update(values)
    res["added_later"] = sorted({*res.get("added_later", []), *missing})
    _write_json(run_dir / "eval.json", res)
    del model
    gc.collect()
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _claim(run_dir: Path) -> bool:
    """Take ``run_dir`` for this process (several drivers may share the plan); a dead owner's claim is taken over."""
    import os

    # beside the run, not in it: training writes only into a directory that holds nothing but its own files
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / f"{run_dir.name}.driver.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            lock.write_text(str(os.getpid()))
            return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def run_config(
    name: str, method: str, overrides: dict, size: int, files: dict, out: Path, smoke: bool
) -> dict:
    cfg = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    cfg["method"] = method
    for key, sub in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **sub}
    cfg["data"]["sources"] = sft_sources(files)
    cfg["data"]["total_samples"] = size
    family = "full" if method == "full" else method
    cfg["data"]["seed"] = cfg["training"]["seed"] = seed_of(name)
    cfg["training"] = {**cfg["training"], "output_dir": str(out / name), "learning_rate": LR[family]}
    if smoke:
        cfg["training"]["logging_steps"] = 1
    return cfg


def _gold(item: dict) -> str:
    """The reference answer of an eval item (routing is recorded over prompt + answer, as in training)."""
    return item["choices"][item["gold"]] if "choices" in item else str(item["golds"][0])


def routing(out: Path, sets: dict[str, list[dict]], runs: list[str], fig_dir: Path) -> None:
    """Routing heatmaps (``loramoe.analysis.report.routing_report``) of finished LoRAMoE runs over the eval prompts: where
    the tokens of each knowledge suite and each downstream suite go. Written next to the run and into ``fig_dir``."""
    import shutil

    from loramoe.analysis.report import routing_report
    from loramoe.data.formats import Example
    from loramoe.models.trained import load_trained

    for name in runs:
        run_dir = out / name
        if not (run_dir / "eval.json").exists():
            log.info("routing: %s not finished, skipped", name)
            continue
        model, tok = load_trained(run_dir)
        tasks = {
            task: [
                Example(
                    prompt=it["prompt"],
                    answer=_gold(it),
                    task_type=1 if task in KNOWLEDGE else 0,
                    source=task,
                )
                for it in items
            ]
            for task, items in sets.items()
        }
        report = routing_report(
            model, tok, tasks, run_dir / "routing", max_examples=32, template="chat", max_length=96,
            prefix="routing", progress=False,
        )  # fmt: skip
        fig_dir.mkdir(parents=True, exist_ok=True)
        for f in report["files"].values():
            f = Path(f)
            if f.suffix in (".png", ".md"):
                shutil.copyfile(f, fig_dir / f"forgetting_{name}_{f.name}")
        log.info("routing %s: %s", name, report["task_types"])
        del model
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="toy sizes and eval subsets, into runs/forgetting_smoke"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 measured fastest here)")
    ap.add_argument("--only", nargs="*", help="run only these run names (and base)")
    ap.add_argument(
        "--small-first", action="store_true", help="smallest sizes first, sweep last (second driver)"
    )
    ap.add_argument("--report", action="store_true", help="write docs/results.md tables + figures and exit")
    ap.add_argument(
        "--routing",
        nargs="*",
        metavar="RUN",
        help="routing heatmaps of these finished runs (default: the LoRAMoE runs at the largest size) and exit",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if args.report:
        from report import report  # experiments/forgetting/report.py

        report(OUT)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from loramoe.models.base import load_base
    from loramoe.models.bundled import DEFAULT_MODEL
    from loramoe.models.trained import load_trained
    from loramoe.training.run_config import RunConfig
    from loramoe.training.train import train

    out = OUT.with_name("forgetting_smoke") if args.smoke else OUT
    out.mkdir(parents=True, exist_ok=True)
    files = prepare_sft_data(out / "data")
    sets = load_eval_sets(out, SMOKE_N if args.smoke else EVAL_N)
    if args.routing is not None:
        largest = [f"{m}_n{SIZES[0]}" for m in ("loramoe", "loramoe_nolbc", *SWEEP)]
        routing(out, sets, args.routing or largest, REPO / "docs" / "figures")
        return 0
    t_start = time.time()

    base_dir = out / "base"
    base_dir.mkdir(exist_ok=True)
    if (base_dir / "eval.json").exists():
        if _claim(base_dir):
            top_up(base_dir, sets, lambda: load_base(DEFAULT_MODEL))
    elif _claim(base_dir):
        log.info("eval base")
        t0 = time.time()
        model, tok = load_base(DEFAULT_MODEL)
        res = evaluate(model, tok, sets)
        res.update(
            run="base", method="base", size=0, eval_seconds=round(time.time() - t0, 1), threads=args.threads
        )
        _write_json(base_dir / "eval.json", res)
        del model
        gc.collect()

    runs = plan(args.smoke)
    if args.small_first:
        runs.sort(key=lambda r: (r[0].split("_n")[0] not in METHODS, r[3]))
    for name, method, overrides, size in runs:
        if args.only and name not in args.only:
            continue
        run_dir = out / name
        if not _claim(run_dir):
            log.info("skip %s (another driver has it)", name)
            continue
        if (run_dir / "eval.json").exists():
            if not top_up(run_dir, sets, lambda d=run_dir: load_trained(_weights_dir(d))):
                log.info("skip %s (done)", name)
            continue
        cfg = run_config(name, method, overrides, size, files, out, args.smoke)
        train_seconds = None
        if not (run_dir / "train_results.json").exists():
            (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            log.info("train %s", name)
            t0 = time.time()
            train(RunConfig.from_dict(cfg), resume=True)  # an interrupted run continues from its checkpoint
            train_seconds = round(time.time() - t0, 1)
            _write_json(run_dir / "train_time.json", {"seconds": train_seconds, "threads": args.threads})
            gc.collect()
        log.info("eval %s", name)
        t0 = time.time()
        model, tok = load_trained(run_dir)
        res = evaluate(model, tok, sets)
        state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
        tt = run_dir / "train_time.json"
        res.update(
            run=name,
            method=name.rsplit("_n", 1)[0],
            seed=seed_of(name),
            base_method=method,
            size=size,
            lbc=cfg.get("loramoe", {}),
            learning_rate=cfg["training"]["learning_rate"],
            train_seconds=json.loads(tt.read_text())["seconds"] if tt.exists() else train_seconds,
            eval_seconds=round(time.time() - t0, 1),
            steps=state.get("global_step"),
            train_loss=[e for e in state["log_history"] if "loss" in e],
            threads=args.threads,
        )
        _write_json(run_dir / "eval.json", res)
        if method == "full":  # 0.5 GB per fully fine-tuned model; the scores are what we keep
            for f in run_dir.glob("*.safetensors"):
                f.unlink()
        del model
        gc.collect()
        log.info("done %s; driver wall %.0fs", name, time.time() - t_start)
    log.info("all done; driver wall %.0fs", time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
