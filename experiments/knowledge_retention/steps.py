"""What the driver does to one queue item: train a run (resuming its checkpoints), and record what it measured.

Shared by the main runs (``run.py``) and the pilots (``pilots.py``), so both write the same record: the evaluation
sets' fingerprints, the training summary (steps, wall and CPU seconds, loss curve, last routing log) and the
evaluation's seconds.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from sets import fingerprint

log = logging.getLogger("knowledge_retention")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def eval_record(sets: dict[str, list[dict]], scores: dict[str, Any]) -> dict[str, Any]:
    return {"scores": scores, "sets": {s: fingerprint(sets[s]) for s in scores}}


def since(t0: float, c0: float) -> dict[str, float]:
    """Wall and CPU seconds (this process) since ``time.time() == t0`` and ``time.process_time() == c0``."""
    return {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1)}


def train_summary(run_dir: Path, seconds: dict | None) -> dict[str, Any]:
    """Steps, wall and CPU seconds (of this process; one thread) per step, the loss curve, the last routing log."""
    state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
    logs = state["log_history"]
    steps = state.get("global_step")
    keep = ("loss", "lm_loss", "lbc_loss")
    routing = [e for e in logs if any(k.startswith("routing") or "mass" in k for k in e)]
    ran = steps - (seconds or {}).get("from_step", 0) if steps else 0  # the steps these seconds cover
    per_step = {k: round(v / ran, 2) for k, v in (seconds or {}).items() if k in ("wall", "cpu") and ran > 0}
    return {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": per_step or None,
        "loss": [{k: e[k] for k in ("step", *keep) if k in e} for e in logs if "loss" in e],
        "last_routing_log": routing[-1] if routing else None,
    }


def train_once(name: str, cfg: dict, out: Path, steps: int, threads: int) -> dict | None:
    """Train ``cfg`` into ``out / name`` unless it finished already (continuing from its newest complete
    checkpoint); returns the wall and CPU seconds of the training and the step it started from (``from_step``: a
    resumed run measures only the steps after its checkpoint, the earlier ones' time ended with their process),
    or None when it had finished before."""
    from loramoe.training.checkpoints import latest_good_checkpoint
    from loramoe.training.run_config import RunConfig
    from loramoe.training.train import train

    run_dir = out / name
    timing = run_dir / "train_time.json"
    if (run_dir / "train_results.json").exists():
        return json.loads(timing.read_text()) if timing.exists() else None
    # beside the run, not in it: training writes only into a directory that holds nothing but its own files
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    log.info("train %s (%d steps)", name, steps)
    start = latest_good_checkpoint(run_dir, quiet=True)
    t0, c0 = time.time(), time.process_time()
    train(RunConfig.from_dict(cfg), resume=True)
    seconds = {**since(t0, c0), "from_step": int(start.rsplit("-", 1)[1]) if start else 0}
    write_json(timing, {**seconds, "threads": threads, "resumed_from_checkpoint": start is not None})
    gc.collect()
    return seconds
