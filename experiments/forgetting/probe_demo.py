"""Score the demo's fine-tuned models on this experiment's knowledge probes (a diagnostic for docs/results.md).

The demo (``loramoe demo``: narrow made-up tasks + a few facts, lr 1e-3) makes SmolLM2 forget world facts when asked
in chat; this experiment's mixture does not. This script asks whether the demo's forgetting is visible in the
format-free ROME / LAMA ranking probes and in TREC, i.e. whether the lost facts are gone from the weights or only
from the chat behaviour. Usage, after ``loramoe demo`` and at least one ``run.py`` (for the eval sets):

    .venv/bin/python experiments/forgetting/probe_demo.py [--demo outputs/demo]

Writes ``runs/forgetting/demo_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluator import evaluate  # noqa: E402
from run import OUT, _write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("outputs/demo"), help="the demo's output directory")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from loramoe.models.base import load_base
    from loramoe.models.bundled import DEFAULT_MODEL
    from loramoe.models.trained import load_trained

    sets_file = OUT / "eval_sets.json"
    if not sets_file.exists():
        raise SystemExit(
            f"{sets_file}: missing; run experiments/forgetting/run.py first (it writes the eval sets)"
        )
    sets = {k: v for k, v in json.loads(sets_file.read_text()).items() if k in ("trec", "rome", "lama")}
    results = {}
    for name in ("base", "lora", "loramoe"):
        model, tok = load_base(DEFAULT_MODEL) if name == "base" else load_trained(args.demo / name)
        results[name] = evaluate(model, tok, sets)["scores"]
        print(name, results[name], flush=True)
    demo = json.loads((args.demo / "demo_results.json").read_text())
    results["demo_facts_heldout"] = {k: v["facts_heldout"] for k, v in demo["scores"].items()}
    _write_json(OUT / "demo_probe.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
