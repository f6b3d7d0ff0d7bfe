"""Measure what the knowledge-retention plan costs on this machine: seconds per optimizer step of each method (on the
4,000-sample mixture, batch 8, one thread) and seconds per evaluated item of each kind; writes ``timing.json``, which
``run.py --status`` uses to estimate what is left. Run it with nothing else of yours running; say what else was.

    .venv/bin/python experiments/knowledge_retention/measure.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "forgetting")]

from run import EVAL_N, GROUP_OFF_SUITES, OUT, run_config  # noqa: E402
from scoring import score_sets  # noqa: E402
from sets import evaluation_sets  # noqa: E402

VARIANTS = {"loramoe": "loramoe_lbc_d4000", "loramoe_top2": "loramoe_top2_d4000", "lora": "lora_d4000",
            "full": "full_d4000"}  # fmt: skip


def step_seconds(name: str, steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this process) seconds of each optimizer step."""
    from transformers import TrainerCallback

    from loramoe.training.run_config import RunConfig
    from loramoe.training.train import build_trainer

    cfg = run_config(name, OUT, smoke=False)
    cfg["training"].update(output_dir=str(OUT / "measure" / name), max_steps=steps, save_strategy="no",
                           logging_steps=1000, report_to=[])  # fmt: skip
    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    trainer = build_trainer(RunConfig.from_dict(cfg))
    trainer.add_callback(Clock())
    trainer.train()
    pairs = list(zip(stamps, stamps[1:]))
    return [round(b[0] - a[0], 3) for a, b in pairs], [round(b[1] - a[1], 3) for a, b in pairs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--items", type=int, default=48, help="items per suite timed in the evaluation")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from loramoe.models.base import load_base

    res: dict = {"measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "threads": 1,
                 "load_average_start": os.getloadavg(), "note": args.note, "steps": {}}  # fmt: skip
    for variant, name in VARIANTS.items():
        wall, cpu = step_seconds(name, args.steps)
        res["steps"][variant] = {"wall": wall, "cpu": cpu}
        print(variant, wall, cpu, flush=True)
    # the first step carries the warm-up; the median of the rest is the figure used (CPU seconds of the process:
    # the budget is CPU-hours, and the wall time depends on what else shares the two cores)
    med = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731
    res["seconds_per_step"] = {v: med(s["cpu"]) for v, s in res["steps"].items()}
    res["wall_seconds_per_step"] = {v: med(s["wall"]) for v, s in res["steps"].items()}
    sets = evaluation_sets(EVAL_N)
    model, tok = load_base("smollm2-135m-instruct")
    per_item = {}
    for suite, items in sets.items():
        k = min(args.items, len(items))
        t0, c0 = time.perf_counter(), time.process_time()
        score_sets(model, tok, {suite: items[:: max(1, len(items) // k)][:k]})
        per_item[suite] = round((time.process_time() - c0) / k, 4)
        print(
            suite,
            per_item[suite],
            "cpu s/item;",
            round((time.perf_counter() - t0) / k, 4),
            "wall",
            flush=True,
        )
    res["eval_seconds_per_item"] = per_item
    res["eval_seconds"] = round(sum(per_item[s] * EVAL_N[s] for s in EVAL_N))
    res["group_off_fraction"] = round(
        sum(per_item[s] * EVAL_N[s] for s in GROUP_OFF_SUITES) / res["eval_seconds"], 3
    )
    res["load_average_end"] = os.getloadavg()
    (HERE / "timing.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: res[k] for k in ("seconds_per_step", "eval_seconds", "group_off_fraction")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
