"""Pilots: cheap LoRA-only runs over the levers that plausibly make LoRA forget, to find a setting where it does.

A forgetting-prevention method can only show itself where something forgets, and at the main design's scale LoRA
barely does (retention 0.96 [0.87, 1.06] at 4,000 downstream samples). Each pilot trains LoRA exactly as the main
runs do (rank 24, batch 8, cosine, one epoch) with one lever changed, and is scored on a fixed 1,000-item CBQA subset
(the first items of each CBQA suite's seeded order, in the pooled set's shares, so the main runs' committed per-item
values give the same items) and on the full downstream suites. Retention is the pilot's CBQA over its reference's
(a knowledge-only run under the same lever), paired over the subset's items.

The levers, cheapest and most plausible first (``PILOTS`` is also the order they run in):
- ``lr5e-3``: five times the learning rate (LoRA's 1e-3 becomes 5e-3), knowledge-only reference at the same rate;
- ``seq``: knowledge data seen only early, as when a user fine-tunes an already tuned model: LoRA on the knowledge
  set alone, merged into the base; then a fresh LoRA on the 4,000 downstream samples alone; the reference is the
  merged knowledge-tuned model;
- ``narrow``: a downstream mixture dominated by one narrow output format: 3,000 SST-2 label words plus 200 of each
  other task;
- ``d16000``: sixteen downstream samples per knowledge sample (2,125 steps; the most expensive).

The setting chosen for the full comparison is the first pilot in this order whose retention interval lies wholly
below ``RETENTION_BAR`` and whose downstream mean is at least LoRA's at 4,000 in the main design (``lora_d4000``,
0.592): ``chosen``. The rule was written before any pilot ran.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sets import CBQA

log = logging.getLogger("knowledge_retention")

# 1,000 CBQA items in the pooled set's shares (2,032 / 1,000 / 430 of 3,462): the first items of each suite's order
PILOT_CBQA_N = {"webq": 587, "efficientqa": 289, "trec": 124}
PILOT_DOWN = ["sst2", "rte", "boolq", "agnews", "xsum"]
RETENTION_BAR = 0.90
DOWNSTREAM_BAR_RUN = "lora_d4000"  # the pilot's downstream mean must be at least this main run's


@dataclass(frozen=True)
class Pilot:
    """One LoRA pilot: the knowledge set plus ``size`` downstream samples, one lever changed.

    Attributes:
        name: the results file is ``results/pilot_<name>.json``.
        lever: what changes, in words (the pilot table's first column).
        size: downstream samples (0: a knowledge-only reference).
        reference: the run whose CBQA is retention's denominator: another pilot, or a main run (``lora_d0``),
            whose committed per-item values hold the subset's items as their prefix.
        lr: LoRA's learning rate.
        sequential: ``size`` downstream samples alone, on the base with the knowledge-only LoRA merged into it.
        shares: downstream samples per task (None: equal shares of the six tasks).
    """

    name: str
    lever: str
    size: int
    reference: str | None
    lr: float = 1.0e-3
    sequential: bool = False
    shares: dict[str, int] | None = field(default=None, hash=False)


NARROW = {"sst2": 3000, "agnews": 200, "rte": 200, "boolq": 200, "xsum": 200, "alpaca": 200}
# XSum (800 train rows), RTE (2,127) and BoolQ (2,270) cannot give a sixth of 16,000: nearly all of theirs, the
# rest in equal parts from the three large sets
WIDE = {"xsum": 800, "rte": 2100, "boolq": 2200, "agnews": 3633, "sst2": 3633, "alpaca": 3634}
PILOTS = [
    Pilot("lora_lr5e-3_d0", "lr 5e-3: knowledge-only reference", 0, None, lr=5.0e-3),
    Pilot("lora_lr5e-3_d4000", "lr 5e-3 (5x)", 4000, "lora_lr5e-3_d0", lr=5.0e-3),
    Pilot("lora_seq_k", "sequential: the knowledge-tuned model (reference)", 0, None, sequential=True),
    Pilot(
        "lora_seq_d4000",
        "sequential: knowledge first, then 4,000 downstream only",
        4000,
        "lora_seq_k",
        sequential=True,
    ),  # fmt: skip
    Pilot(
        "lora_narrow_d4000", "narrow: 3,000 SST-2 + 200 of each other task", 4000, "lora_d0", shares=NARROW
    ),
    Pilot(
        "lora_d16000", "16,000 downstream samples (16 per knowledge sample)", 16000, "lora_d0", shares=WIDE
    ),
]
BY_NAME = {p.name: p for p in PILOTS}


def pilot_key(p: Pilot) -> str:
    return f"pilot_{p.name}"


def pilot_steps(p: Pilot) -> int:
    n = p.size if p.sequential and p.size else 1000 + p.size
    return -(-n // 8)


def pilot_sets(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The pilots' evaluation sets: the CBQA subset (prefixes of the full suites) and the downstream suites."""
    return {**{s: sets[s][:n] for s, n in PILOT_CBQA_N.items()}, **{s: sets[s] for s in PILOT_DOWN}}


def merged_dir(out: Path) -> Path:
    return out / "lora_seq_k" / "merged"


def pilot_config(p: Pilot, cfg: dict, out: Path, shared_sources: list[dict] | None) -> dict:
    """The run config of a pilot: ``cfg`` (the main LoRA run's config at the pilot's size) with the lever applied;
    ``shared_sources`` replaces its data sources when the pilot has its own downstream shares."""
    sources = shared_sources if shared_sources is not None else cfg["data"]["sources"]
    if p.sequential and p.size:  # the second stage: downstream data alone, on the knowledge-tuned model
        cfg = {**cfg, "model": str(merged_dir(out))}
        sources = [s for s in sources if s["task_type"] == "downstream"]
    cfg = {**cfg, "data": {**cfg["data"], "sources": sources}}
    cfg["training"] = {**cfg["training"], "output_dir": str(out / p.name), "learning_rate": p.lr}
    return cfg


def merge_knowledge_model(run_dir: Path, dest: Path) -> str:
    """Merge the knowledge-only LoRA into its base and save the result as a plain model; returns a checksum of the
    merged weights (a later session that retrains the stage compares it with the one its reference was scored on)."""
    from loramoe.models.trained import load_trained

    model, tok = load_trained(run_dir)
    merged = model.merge_and_unload()
    tmp = dest.with_name(dest.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()[:16]
    tmp.replace(dest)
    return digest


def reference_values(ref: dict, suite: str) -> str | list[float]:
    """A reference's per-item values on the subset: the prefix of its stored values (the subset's items are the
    first items of every suite, so a main run scored on the full suites holds them)."""
    stored = ref["scores"][suite]["values"]
    return stored[: PILOT_CBQA_N[suite]]


def check_prefix_sets(sets: dict[str, list[dict]], ref: dict, fingerprint) -> None:
    """The reference was scored on the suites the subset is cut from: same fingerprints of the full suites."""
    for suite in CBQA:
        n = ref["scores"][suite]["n"]
        if fingerprint(sets[suite][:n]) != ref["sets"][suite]:
            raise SystemExit(f"{suite}: the reference was scored on other items than the subset's prefix")


def chosen(results: dict[str, dict]) -> dict[str, Any] | None:
    """The first pilot (in ``PILOTS`` order) that meets the rule, with its figures; None while none does."""
    from report_pilots import pilot_rows  # experiments/knowledge_retention/report_pilots.py

    for row in pilot_rows(results):
        if row.get("meets"):
            return row
    return None


def _knowledge_model(out: Path, smoke: bool, threads: int, run_config, results: Path) -> str:
    """The sequential pilots' knowledge-tuned model (merged), trained again when this session lacks it; returns
    its weights' checksum."""
    from steps import train_once

    p = BY_NAME["lora_seq_k"]
    if (merged_dir(out) / "model.safetensors").exists():
        return hashlib.sha256((merged_dir(out) / "model.safetensors").read_bytes()).hexdigest()[:16]
    train_once(
        p.name, pilot_config(p, run_config("lora_d0", out, smoke), out, None), out, pilot_steps(p), threads
    )
    return merge_knowledge_model(out / p.name, merged_dir(out))


def do_pilot(name: str, sets, out: Path, smoke: bool, threads: int, *, run_config, results: Path) -> dict:
    """Train one pilot (its knowledge-tuned stage first, for a sequential one) and score it on the pilot sets."""
    import json
    import time

    from scoring import score_sets
    from sets import fingerprint, sft_sources
    from steps import eval_record, since, train_once, train_summary

    from loramoe.models.base import load_base
    from loramoe.models.trained import load_trained

    p = BY_NAME[name]
    extra: dict[str, Any] = {}
    if p.reference and not p.reference.startswith("lora_seq") and (results / f"{p.reference}.json").exists():
        check_prefix_sets(sets, json.loads((results / f"{p.reference}.json").read_text()), fingerprint)
    shared = sft_sources(out / "data", p.size, shares=p.shares) if p.shares else None
    if shared and smoke:
        for s in shared:
            s["num_samples"] = 16
    if p.sequential and p.size:
        checksum = _knowledge_model(out, smoke, threads, run_config, results)
        ref = results / f"pilot_{p.reference}.json"
        stored = json.loads(ref.read_text())["merged_checksum"] if ref.exists() else None
        extra["knowledge_model"] = {"checksum": checksum, "same_as_reference": stored == checksum}
        if stored != checksum:
            log.warning("the knowledge-tuned model differs from the one its reference was scored on")
    cfg = pilot_config(p, run_config(f"lora_d{p.size}", out, smoke), out, shared)
    seconds = train_once(p.name, cfg, out, pilot_steps(p), threads)
    psets = pilot_sets(sets)
    log.info("eval pilot %s", name)
    t0, c0 = time.time(), time.process_time()
    if p.sequential and not p.size:
        extra["merged_checksum"] = merge_knowledge_model(out / p.name, merged_dir(out))
        model, tok = load_base(str(merged_dir(out)))
    else:
        model, tok = load_trained(out / p.name)
    rec = eval_record(psets, score_sets(model, tok, psets))
    rec.update(
        item=pilot_key(p), pilot=p.name, lever=p.lever, downstream=p.size, reference=p.reference,
        learning_rate=p.lr, sequential=p.sequential, shares=p.shares, seed=cfg["training"]["seed"],
        train=train_summary(out / p.name, seconds), eval_seconds=since(t0, c0), threads=threads, **extra,
    )  # fmt: skip
    return rec
