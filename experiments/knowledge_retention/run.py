"""Knowledge-retention experiment: the LoRAMoE paper's design (fixed knowledge SFT data, growing downstream data).

Every run fine-tunes SmolLM2-135M-Instruct on the same 1,000 closed-book QA samples (task type ``knowledge``) mixed
with 0, 1,000 or 4,000 downstream samples, with one of five methods. Forgetting = closed-book QA after knowledge +
downstream / closed-book QA after knowledge only, for the same method. Design, plan and measured costs: README.md.

Usage (from the repository root):

    .venv/bin/python experiments/knowledge_retention/run.py --smoke      # toy run of the whole pipeline
    nohup nice .venv/bin/python experiments/knowledge_retention/run.py > outputs/knowledge_retention.log 2>&1 &
    .venv/bin/python experiments/knowledge_retention/run.py --status     # the queue: done, to do, estimated cost
    .venv/bin/python experiments/knowledge_retention/run.py --report     # docs/results.md block + figure

Resuming: each finished queue item writes a small JSON under ``experiments/knowledge_retention/results/`` (commit
it); the driver skips items whose JSON exists, so a later session continues the queue. Models and checkpoints live
under the gitignored ``outputs/knowledge_retention/``; a run killed mid-way resumes from its last checkpoint in the
same session, and from the start in a new one. ``touch outputs/knowledge_retention/STOP`` ends the driver after the
item in progress.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent / "forgetting")]

from pilots import BY_NAME, NARROW, PILOTS, do_pilot, pilot_steps  # noqa: E402
from scoring import routing_masses, score_sets  # noqa: E402  (experiments/knowledge_retention/scoring.py)
from sets import evaluation_sets, sft_sources  # noqa: E402
from steps import eval_record, since, train_once, train_summary, write_json  # noqa: E402

OUT = REPO / "outputs" / "knowledge_retention"
RESULTS = HERE / "results"
BASE_CONFIG = HERE / "base.yaml"

log = logging.getLogger("knowledge_retention")

# ----------------------------------------------------------------------------------------------------------------
# The plan

SIZES = [0, 1000, 4000]  # downstream SFT samples, on top of the fixed 1,000 knowledge samples
METHODS = {
    # name: (method, adapter overrides); lr per family as in round 1 (fixed before any result, not tuned)
    "lora": ("lora", {}),  # PEFT, rank 24 = LoRAMoE's experts x rank (matched budget)
    "loramoe_lbc": ("loramoe", {"lbc_delta": 0.1, "lbc_weight": 0.1, "lbc_positions": "non_padding"}),
    # beyond the paper: sparse top-2 routing and a strong LBC, so a knowledge token's two experts tend to be
    # knowledge experts and the downstream experts are mostly out of its path
    "loramoe_top2": (
        "loramoe",
        {"top_k": 2, "lbc_delta": 0.3, "lbc_weight": 1.0, "lbc_positions": "non_padding"},
    ),
    "full": ("full", {}),
    "loramoe_nolbc": ("loramoe", {"lbc_weight": 0.0}),
    # beyond the paper, aimed at the finding that the knowledge experts hold answer style: the LBC plus the group-mass
    # constraint at ten times its weight, which separates the groups in training (docs/method.md); fixed before any
    # run with it
    "loramoe_gm": (
        "loramoe",
        {"lbc_delta": 0.1, "lbc_weight": 0.1, "lbc_positions": "non_padding", "group_mass_weight": 1.0},
    ),
}
LR = {"loramoe": 1.0e-3, "lora": 1.0e-3, "full": 1.0e-4}
# run-name suffix -> training seed (init, order, dropout)
SEEDS = {"": 42, "_s2": 43, "_narrow": 42, "_narrow_s2": 43, "_narrow_s3": 44}
# run-name suffix -> downstream shares per task (default: equal shares). "_narrow" is the setting the pilots' rule
# chose (pilots.py): 3,000 SST-2 + 200 of each other task; its runs' reference is the same method's ``_d0`` run.
SHARES = {"_narrow": NARROW, "_narrow_s2": NARROW, "_narrow_s3": NARROW}


def setting_of(suffix: str) -> str:
    """The data setting a run-name suffix names, without its seed: ``_narrow_s2`` -> ``_narrow``, ``_s2`` -> ``""``."""
    return re.sub(r"_s\d+$", "", suffix)


GROUPS_OFF = ("knowledge", "downstream")

EVAL_N = {"webq": 2032, "efficientqa": 1000, "trec": 430, "rome": 200, "lama": 200, "facts": 108,
          "sst2": 200, "rte": 200, "boolq": 200, "agnews": 200, "xsum": 30}  # fmt: skip
GROUP_OFF_SUITES = ["webq", "efficientqa", "trec", "facts", "sst2", "rte", "boolq", "agnews", "xsum"]
SMOKE_N = dict.fromkeys(EVAL_N, 4)


def run_name(method: str, size: int, suffix: str = "") -> str:
    return f"{method}_d{size}{suffix}"


def queue() -> list[tuple[str, ...]]:
    """The queue, most informative first: ("run", name) trains and evaluates; ("off", name, group) evaluates a
    finished LoRAMoE run with an expert group switched off; ("pilot", name) trains and scores a LoRA pilot
    (``pilots.py``); ("base",) evaluates the base model.

    The order: the comparison the first sessions ran (LoRA, LoRAMoE + LBC, top-2 at 0 and 4,000, their groups
    switched off); full fine-tuning, the positive control; the pilots that look for a setting where LoRA forgets;
    full fine-tuning, LoRA and LoRAMoE + LBC at the setting they chose (``_narrow``) and that run's groups switched
    off; the second seed of LoRA and LoRAMoE + LBC there; LoRAMoE without the LBC there; the pair's third seed;
    top-2 there; the second seed of the 4,000 ordinary-mixture runs; the variant beyond the paper (``loramoe_gm``);
    then the rest of the original plan."""
    first = ["lora", "loramoe_lbc", "loramoe_top2"]
    items: list[tuple[str, ...]] = [("base",)]

    def runs(methods, size, suffix=""):
        for m in methods:
            items.append(("run", run_name(m, size, suffix)))

    def offs(methods, size, suffix=""):
        for m in methods:
            if METHODS[m][0] == "loramoe":
                items.extend(("off", run_name(m, size, suffix), g) for g in GROUPS_OFF)

    runs(first, 0)
    runs(first, 4000)
    offs(first, 4000)
    runs(["full"], 0)
    runs(["full"], 4000)
    # the 16,000-sample pilot last: the rule chose an earlier pilot, and it is longer than a session
    items.extend(("pilot", p.name) for p in PILOTS if p.name != "lora_d16000")
    # the pressure setting: every method on the narrow mixture, the knowledge-only references they lack, the groups
    runs(["full", "lora", "loramoe_lbc"], 4000, "_narrow")
    offs(["loramoe_lbc"], 4000, "_narrow")
    runs(["loramoe_nolbc"], 0)
    # LoRAMoE + LBC against LoRA at this setting is the answer the experiment exists for: its seeds come before more
    # variants (the second seed moved the difference as much as the method did, hence a third), with LoRAMoE
    # without the LBC (whether the LBC or the experts keep the knowledge) between them; then top-2, then the 4,000
    # ordinary-mixture runs' second seeds
    runs(["lora", "loramoe_lbc"], 4000, "_narrow_s2")
    runs(["loramoe_nolbc"], 4000, "_narrow")
    runs(["lora", "loramoe_lbc"], 4000, "_narrow_s3")
    runs(["loramoe_top2"], 4000, "_narrow")
    offs(["loramoe_top2"], 4000, "_narrow")
    runs(first, 4000, "_s2")
    runs(["loramoe_gm"], 0)
    runs(["loramoe_gm"], 4000, "_narrow")
    offs(["loramoe_gm"], 4000, "_narrow")
    runs(["loramoe_nolbc"], 4000)
    offs(["loramoe_nolbc"], 4000)
    runs([*first, "full", "loramoe_nolbc"], 1000)
    runs(["full", "loramoe_nolbc"], 4000, "_s2")
    offs(list(METHODS), 0)
    offs(list(METHODS), 1000)
    items.append(("pilot", "lora_d16000"))
    return items


def parse_run(name: str) -> tuple[str, int, str]:
    """``loramoe_lbc_d4000_s2`` -> (``loramoe_lbc``, 4000, ``_s2``)."""
    base, _, tail = name.rpartition("_d")
    size, _, seed = tail.partition("_")
    return base, int(size), f"_{seed}" if seed else ""


def item_key(item: tuple[str, ...]) -> str:
    if item[0] == "pilot":
        return f"pilot_{item[1]}"
    return "base" if item[0] == "base" else item[1] if item[0] == "run" else f"{item[1]}__{item[2]}_off"


def steps_of(name: str, smoke: bool = False) -> int:
    _, size, _ = parse_run(name)
    return -(-(1000 + size) // 8) if not smoke else -(-(16 + (16 if size else 0)) // 8)


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run_config(name: str, out: Path, smoke: bool) -> dict:
    method_name, size, suffix = parse_run(name)
    method, overrides = METHODS[method_name]
    cfg = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    cfg["method"] = method
    cfg["loramoe"] = {**cfg["loramoe"], **overrides}
    sources = sft_sources(out / "data", size, shares=SHARES.get(suffix))
    if smoke:
        for source in sources:
            source["num_samples"] = 16
    cfg["data"]["sources"] = sources
    cfg["data"]["seed"] = cfg["training"]["seed"] = SEEDS[suffix]
    cfg["training"] = {**cfg["training"], "output_dir": str(out / name), "learning_rate": LR[method]}
    if smoke:
        cfg["training"]["logging_steps"] = 1
    return cfg


def do_base(sets, threads: int) -> dict[str, Any]:
    from loramoe.models.base import load_base

    t0, c0 = time.time(), time.process_time()
    model, tok = load_base("smollm2-135m-instruct")
    rec = eval_record(sets, score_sets(model, tok, sets))
    rec.update(item="base", eval_seconds=since(t0, c0), threads=threads)
    return rec


def do_run(name: str, sets, out: Path, smoke: bool, threads: int) -> dict[str, Any]:
    from loramoe.models.trained import load_trained

    run_dir = out / name
    cfg = run_config(name, out, smoke)
    seconds = train_once(name, cfg, out, steps_of(name, smoke), threads)
    log.info("eval %s", name)
    t0, c0 = time.time(), time.process_time()
    model, tok = load_trained(run_dir)
    rec = eval_record(sets, score_sets(model, tok, sets))
    if cfg["method"] == "loramoe":
        rec["routing"] = routing_masses(model, tok, sets)
    method_name, size, suffix = parse_run(name)
    rec.update(
        item=name, method=method_name, downstream=size, seed=SEEDS[suffix], config=cfg["loramoe"]
        if cfg["method"] == "loramoe" else {"method": cfg["method"]}, learning_rate=cfg["training"]["learning_rate"],
        train=train_summary(run_dir, seconds), eval_seconds=since(t0, c0), threads=threads,
    )  # fmt: skip
    if cfg["method"] == "full":  # 0.5 GB per fully fine-tuned model; the scores are what is kept
        for f in run_dir.glob("*.safetensors"):
            f.unlink()
    return rec


def do_off(name: str, group: str, sets, out: Path, threads: int) -> dict[str, Any] | None:
    import loramoe
    from loramoe.models.trained import load_trained

    if not hasattr(loramoe, "disable_experts"):
        log.info("skip %s with %s off: this loramoe has no disable_experts", name, group)
        return None
    run_dir = out / name
    if not (run_dir / "adapter_config.json").exists():
        log.info(
            "skip %s with %s off: the run's adapter is not here (a later session retrains it)", name, group
        )
        return None
    t0, c0 = time.time(), time.process_time()
    model, tok = load_trained(run_dir)
    suites = {s: sets[s] for s in GROUP_OFF_SUITES}
    with loramoe.disable_experts(model, group=group):
        scores = score_sets(model, tok, suites)
        routing = routing_masses(model, tok, sets)
    rec = eval_record(suites, scores)
    rec.update(item=f"{name}__{group}_off", run=name, group_off=group, routing=routing,
               eval_seconds=since(t0, c0), threads=threads)  # fmt: skip
    return rec


def status(results: Path) -> None:
    """Print the queue: what is done (with its measured CPU minutes) and the estimated CPU minutes of the rest."""
    from report import train_cpu  # report imports this module

    est = json.loads((HERE / "timing.json").read_text(encoding="utf-8"))
    base = results / "base.json"
    if base.exists():  # the measured evaluation cost replaces the estimate
        est["eval_seconds"] = json.loads(base.read_text(encoding="utf-8"))["eval_seconds"]["cpu"]
    done_cpu = left = 0.0
    for item in queue():
        key = item_key(item)
        path = results / f"{key}.json"
        if path.exists():
            rec = json.loads(path.read_text(encoding="utf-8"))
            measured, before = train_cpu(rec)
            cpu = rec["eval_seconds"]["cpu"] + measured + before
            done_cpu += cpu
            how = f"measured, {before / 60:.0f} of it estimated before a resume" if before else "measured"
            print(f"done  {key:36s} {cpu / 60:6.0f} CPU-min ({how})")
        else:
            cost = _estimate(item, est)
            left += cost
            print(f"todo  {key:36s} {cost / 60:6.0f} CPU-min (estimated)")
    print(
        f"done: {done_cpu / 3600:.1f} CPU-hours measured; left: ~{left / 3600:.1f} CPU-hours estimated (timing.json)"
    )


def _estimate(item: tuple[str, ...], est: dict) -> float:
    """CPU seconds of a queue item from the measured step and evaluation costs."""
    if item[0] == "base":
        return est["eval_seconds"]
    if item[0] == "off":
        return est["eval_seconds"] * est["group_off_fraction"]
    if item[0] == "pilot":  # the pilot sets hold 1,000 of the 3,462 CBQA items the evaluation spends most on
        return pilot_steps(BY_NAME[item[1]]) * est["seconds_per_step"]["lora"] + est["eval_seconds"] * 0.35
    method = parse_run(item[1])[0]
    key = method if method in est["seconds_per_step"] else METHODS[method][0]
    return steps_of(item[1]) * est["seconds_per_step"][key] + est["eval_seconds"]


def _claim(out: Path) -> None:
    """One driver at a time: a second one exits (a dead owner's lock is taken over)."""
    lock = out / "driver.lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            raise SystemExit(f"another driver (pid {pid}) is running on {out}; stop it first or wait")
        except (ValueError, ProcessLookupError):
            pass
    lock.write_text(str(os.getpid()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="toy sizes and eval sets into outputs/knowledge_retention_smoke"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--out", type=Path, default=None, help="models and checkpoints (default outputs/knowledge_retention)"
    )
    ap.add_argument(
        "--results", type=Path, default=None, help="the finished items' JSON (default: results/ here)"
    )
    ap.add_argument("--only", nargs="*", help="run only these queue items (keys as --status prints them)")
    ap.add_argument("--status", action="store_true", help="print the queue and what is left, and exit")
    ap.add_argument(
        "--report", action="store_true", help="write docs/results.md's block and figure, and exit"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    out = args.out or (OUT.with_name("knowledge_retention_smoke") if args.smoke else OUT)
    results = args.results or (out / "results" if args.smoke else RESULTS)
    if args.status:
        status(results)
        return 0
    if args.report:
        from report import report  # experiments/knowledge_retention/report.py

        report(RESULTS)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out)
    sets = evaluation_sets(SMOKE_N if args.smoke else EVAL_N)
    t_start = time.time()
    for item in queue():
        key = item_key(item)
        if args.only and key not in args.only:
            continue
        if (
            args.smoke
            and item[0] == "run"
            and parse_run(item[1])[1] not in (0, 1000)
            and "_narrow" not in key
            or args.smoke
            and "_s2" in key
            or args.smoke
            and item[0] == "pilot"
            and BY_NAME[item[1]].size > 4000
        ):
            continue
        path = results / f"{key}.json"
        if path.exists():
            continue
        if (out / "STOP").exists():
            log.info("STOP file found; exiting before %s", key)
            break
        if item[0] == "base":
            log.info("eval base")
            rec = do_base(sets, args.threads)
        elif item[0] == "run":
            rec = do_run(item[1], sets, out, args.smoke, args.threads)
        elif item[0] == "pilot":
            rec = do_pilot(
                item[1], sets, out, args.smoke, args.threads, run_config=run_config, results=results
            )
        else:
            if not (results / f"{item[1]}.json").exists():
                continue
            rec = do_off(item[1], item[2], sets, out, args.threads)
        if rec is not None:
            rec["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            write_json(path, rec)
            log.info("done %s; driver wall %.0fs", key, time.time() - t_start)
        gc.collect()
    log.info("queue pass done; driver wall %.0fs", time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
