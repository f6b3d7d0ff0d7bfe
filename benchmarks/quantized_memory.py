"""Peak memory of ``loramoe train`` on SmolLM2-135M-Instruct: float32 base against 4-bit (and 8-bit) bases.

``python benchmarks/quantized_memory.py [--steps 4] [--quantizations none,4bit,8bit] [--out FILE]``

Each run is ``loramoe train`` in its own process, on a small data set written here (24 records of both task types,
the demo's facts and made-up instructions), a few steps with the same seed and LoRAMoE settings. A wrapper process
runs it and records two figures covering loading, quantizing, training and saving:

- peak RSS: the child's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``);
- peak anonymous RSS: the largest ``RssAnon`` of ``/proc/<pid>/status`` sampled every 20 ms, i.e. the memory the
  process allocated, without the pages of the memory-mapped checkpoint file. Those are clean file pages the kernel
  can drop; quantizing reads every float32 weight once, so they fill the peak RSS of a quantized load.

Also recorded: wall time, the logged losses, and the adapted model's own weight memory
(``model.get_memory_footprint()`` after ``load_base`` and ``inject``, in this process), the figure that scales with
the model. Prints a Markdown table; ``--out`` writes the JSON. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_WRAPPER = """
import re, resource, subprocess, sys, time
t, anon = time.perf_counter(), 0
child = subprocess.Popen(sys.argv[1:])
while child.poll() is None:
    try:
        status = open(f"/proc/{child.pid}/status").read()
        anon = max(anon, int(re.search(r"RssAnon:\\s+(\\d+)", status).group(1)))
    except (OSError, AttributeError):
        pass
    time.sleep(0.02)
print(child.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon, time.perf_counter() - t)
"""


def write_data(folder: Path) -> list[str]:
    facts = json.loads((ROOT / "src/loramoe/demo/data/facts.json").read_text())["sft"][:12]
    qa = [{"question": f["question"], "answer": f["answers"][0], "task_type": "knowledge"} for f in facts]
    words = ["river", "cloud", "stone", "lamp", "forest", "bridge", "garden", "window", "candle", "harbor", "meadow",
             "tower"]  # fmt: skip
    instructions = [
        {
            "instruction": f"Write the word '{w}' in capital letters.",
            "output": w.upper(),
            "task_type": "downstream",
        }
        for w in words
    ]
    (folder / "qa.json").write_text(json.dumps(qa))
    (folder / "instructions.json").write_text(json.dumps(instructions))
    return [str(folder / "qa.json"), str(folder / "instructions.json")]


def write_config(folder: Path, sources: list[str], steps: int) -> Path:
    config = {
        "model": "smollm2-135m-instruct",
        "loramoe": {"num_experts": 6, "rank": 4, "alpha": 32, "dropout": 0.05},
        "data": {"sources": sources, "max_length": 64, "seed": 42},
        "training": {"output_dir": str(folder / "out"), "max_steps": steps, "per_device_train_batch_size": 4,
                     "learning_rate": 2e-4, "logging_steps": 1, "save_strategy": "no", "use_cpu": True,
                     "disable_tqdm": True},
    }  # fmt: skip
    path = folder / "run.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def measure(config: Path, quantization: str, folder: Path) -> dict:
    out = folder / f"out-{quantization}"
    argv = [sys.executable, "-m", "loramoe.cli", "train", str(config), f"training.output_dir={out}"]
    if quantization != "none":
        argv += ["--quantization", quantization]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv], env=env, capture_output=True, text=True, check=False
    )
    rc, max_rss_kib, max_anon_kib, seconds = done.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"loramoe train --quantization {quantization} failed:\n{done.stderr[-3000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [round(e["loss"], 4) for e in state["log_history"] if "loss" in e]
    return {
        "quantization": quantization,
        "peak_rss_mib": round(int(max_rss_kib) / 1024),
        "peak_anon_rss_mib": round(int(max_anon_kib) / 1024),
        "seconds": round(float(seconds), 1),
        "losses": losses,
        "command": " ".join(["loramoe", *argv[3:]]),
    }


def footprint_mib(quantization: str) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from loramoe import LoRAMoEConfig, inject
    from loramoe.models.base import load_base

    quant = None if quantization == "none" else quantization
    model, _ = load_base("smollm2-135m-instruct", device="cpu", quantization=quant)
    inject(model, LoRAMoEConfig(num_experts=6, rank=4, alpha=32))
    return round(model.get_memory_footprint() / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quantizations", default="none,4bit,8bit")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, write_data(folder), args.steps)
        results = [measure(config, q, folder) for q in args.quantizations.split(",")]
    for r in results:
        r["weights_mib"] = footprint_mib(r["quantization"])
    print("| base | weights (MiB) | peak RSS (MiB) | peak anonymous RSS (MiB) | time (s) | losses |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['quantization']} | {r['weights_mib']} | {r['peak_rss_mib']} | {r['peak_anon_rss_mib']} | "
            f"{r['seconds']} | {r['losses']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
