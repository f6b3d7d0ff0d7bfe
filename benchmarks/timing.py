"""Side-by-side timing on a noisy, shared machine, and a description of that machine.

Every figure the benchmarks report comes from ``interleaved``: the variants run one after another inside each
round (the order rotating from round to round), so a burst of load from another process hits all of them alike,
and ratios are taken per round (paired) before the median. Time is CPU time of this process (user + system), which
load from other processes inflates far less than wall time; wall time is kept alongside.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time every function ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    Returns:
        name -> {"cpu_s": [per round], "wall_s": [per round]}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples = {name: {"cpu_s": [], "wall_s": []} for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            cpu, wall = time.process_time(), time.perf_counter()
            fns[name]()
            samples[name]["cpu_s"].append(time.process_time() - cpu)
            samples[name]["wall_s"].append(time.perf_counter() - wall)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: dict, b: dict, key: str = "cpu_s") -> float:
    """Median over rounds of a / b, each round's two samples taken side by side."""
    return statistics.median(x / y for x, y in zip(a[key], b[key]))


def paired_difference(a: dict, b: dict, key: str = "cpu_s") -> float:
    """Median over rounds of a - b (seconds)."""
    return statistics.median(x - y for x, y in zip(a[key], b[key]))


def summarise(samples: dict[str, dict]) -> dict[str, dict]:
    """name -> {"cpu_s": median, "wall_s": median, "cpu_samples": [...]} for the JSON report."""
    return {
        name: {"cpu_s": median(s["cpu_s"]), "wall_s": median(s["wall_s"]), "cpu_samples": s["cpu_s"]}
        for name, s in samples.items()
    }


def machine() -> dict:
    """CPU model, cores, torch build and threads, and the load average (other people's work) at this moment."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), model
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
