"""The layer on an accelerator, in bfloat16, eager and under ``torch.compile``: ``python benchmarks/device_bench.py``.

For each LLaMA-2-7B MLP shape (4096 -> 11008 and back), 4 x 1024 tokens, a frozen bfloat16 ``nn.Linear`` with
float32 adapters (the library's default): the fwd+bwd time of the bare linear, PEFT LoRA of rank N * R, and the
fused layer (per-expert dropout, one shared mask, no dropout), each eager and compiled. Also checks, with
``torch.cuda.set_sync_debug_mode("error")``, that an eager training step of the layer makes no host-device sync.
Prints one JSON object (and writes it to ``--out``). ``--tiny --device cpu`` is the smoke test run on the CPU.
Time: CUDA events on a GPU (``time.perf_counter`` otherwise), the median of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.layer_bench import peft_layer  # noqa: E402
from loramoe.layer import LoRAMoELinear  # noqa: E402

EXPERTS, RANK, ALPHA, DROPOUT = 8, 4, 32.0, 0.05
VARIANTS = {"fused per_expert": (DROPOUT, "per_expert"), "fused shared": (DROPOUT, "shared"), "fused p=0": (0.0, "per_expert")}  # fmt: skip


def timer(device: torch.device):
    """A function returning the seconds one call of ``fn`` takes on ``device``."""

    def cuda(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def host(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return cuda if device.type == "cuda" else host


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        module(x).backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def modules_for(base: nn.Linear, compile_backend: str | None) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {
        "bare": base,
        f"peft r={EXPERTS * RANK}": peft_layer(base, EXPERTS * RANK, DROPOUT),
    }
    for name, (p, mode) in VARIANTS.items():
        layer = LoRAMoELinear(base, num_experts=EXPERTS, rank=RANK, alpha=ALPHA, dropout=p, dropout_mode=mode)
        with torch.no_grad():
            layer.loramoe_B.normal_(std=0.02)
        out[name] = layer.train()
    if compile_backend:
        out = {f"{k} compiled": torch.compile(m, backend=compile_backend) for k, m in out.items()}
    return out


def measure(shape, tokens, device, dtype, compile_backend, repeats: int) -> dict:
    d_in, d_out = shape
    gen = torch.Generator(device=device).manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(*tokens, d_in, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(*tokens, d_out, device=device, dtype=dtype, generator=gen)
    modules = modules_for(base, None) | (modules_for(base, compile_backend) if compile_backend else {})
    steps = {name: train_step(m, x, grad) for name, m in modules.items()}
    time_one = timer(device)
    for step in steps.values():  # warm-up: compilation and autotuning happen here
        for _ in range(3):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            samples[name].append(time_one(steps[name]))
    ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    rows = {}
    for name, value in ms.items():
        bare = ms["bare compiled" if name.endswith("compiled") else "bare"]
        peft = ms[f"peft r={EXPERTS * RANK}" + (" compiled" if name.endswith("compiled") else "")]
        rows[name] = {"ms": round(value, 3), "adapter_ms": round(value - bare, 3),
                      "adapter / peft adapter": round((value - bare) / max(peft - bare, 1e-9), 3)}  # fmt: skip
    return {"shape": list(shape), "tokens": list(tokens), "variants": rows}


def sync_free_step(device: torch.device, dtype: torch.dtype) -> dict:
    """One eager fwd+bwd with per-expert dropout under CUDA's sync debug mode "error"."""
    if device.type != "cuda":
        return {"checked": False, "why": "set_sync_debug_mode exists for CUDA only (tests/unit/test_compile.py proves it on CPU)"}  # fmt: skip
    base = nn.Linear(512, 1024, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    layer = LoRAMoELinear(base, num_experts=EXPERTS, rank=RANK, alpha=ALPHA, dropout=DROPOUT).train()
    x = torch.randn(4, 256, 512, device=device, dtype=dtype, requires_grad=True)
    layer(x).float().pow(2).mean().backward()  # first call outside: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().pow(2).mean().backward()
        return {"checked": True, "host_syncs": 0}
    except RuntimeError as err:
        return {"checked": True, "host_syncs": "at least 1", "error": str(err)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default="inductor", help="'none' to skip the compiled variants")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="small shapes: the smoke test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    backend = None if args.compile_backend == "none" else args.compile_backend
    shapes = [(32, 64)] if args.tiny else [(4096, 11008), (11008, 4096)]
    tokens = (2, 8) if args.tiny else (4, 1024)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "bfloat16 base, float32 adapters",
        "experts": EXPERTS, "rank": RANK, "dropout": DROPOUT, "compile_backend": backend,
        "sync_check": sync_free_step(device, dtype),
        "layers": [measure(s, tokens, device, dtype, backend, 1 if args.tiny else args.repeats) for s in shapes],
    }  # fmt: skip
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
