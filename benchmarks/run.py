"""One command for every performance figure of loramoe: ``python benchmarks/run.py [--quick] [--out FILE]``.

Writes the results as JSON (``--out``, default docs/benchmarks.json) and as the Markdown report
(``--md``, default docs/benchmarks.md). ``--quick`` uses 4 decoder layers and 3 rounds (minutes, for a
sanity check); the full run uses all 30 layers of SmolLM2-135M (about half an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks import layer_bench, model_bench, report  # noqa: E402
from benchmarks.model_bench import Variant  # noqa: E402
from benchmarks.timing import interleaved, machine, paired_ratio, summarise  # noqa: E402

MAIN = [
    Variant("floor"),
    Variant("peft", 0.05),
    Variant("fused", 0.05, "per_expert"),
    Variant("fused", 0.05, "shared"),
]
NO_DROPOUT = [Variant("peft", 0.0), Variant("fused", 0.0)]
LOOPS = [Variant("loop", 0.05, "per_expert"), Variant("loop", 0.05, "shared")]
GENERATION_VARIANTS = [Variant("floor"), Variant("peft", 0.05), Variant("fused", 0.05), Variant("loop", 0.05)]
# The per-expert loop keeps N masked copies of x and N (M, O) products per adapted linear for backward: about
# 10 GB of activations at 30 layers, more than this shared 24 GB machine can spare (it was OOM-killed), so its
# model-level rows use 8 layers, beside the fused layer and PEFT at the same depth.
LOOP_LAYERS = 8


def settings(args: argparse.Namespace) -> dict:
    if args.tiny:  # the smoke test: every code path, nothing timed meaningfully
        return dict(
            tiny=True,
            layers=1,
            repeats=1,
            warmup=0,
            train_plan=[(1, (2, 16), MAIN + LOOPS[:1])],
            gen_batches=[1, 2],
            prompt=8,
            new_tokens=4,
            layer_shapes=[(32, 64)],
            layer_tokens=(2, 8),
            sweep_experts=(2,),
            sweep_ranks=(4,),
            memory_plan=[(1, (2, 16), MAIN[2:3])],
            generation_variants=GENERATION_VARIANTS,
        )
    layers = args.layers or (4 if args.quick else 30)
    loop_layers = min(layers, LOOP_LAYERS)
    return dict(
        tiny=False,
        layers=layers,
        repeats=args.repeats or (3 if args.quick else 5),
        warmup=1,
        # (layers, (batch, seq), variants). The longer sequence repeats the main comparisons only: a 30-layer
        # step takes a minute of wall time on this shared machine.
        train_plan=[
            (layers, (4, 256), MAIN + NO_DROPOUT),
            (layers, (1, 1024), MAIN),
            (loop_layers, (4, 256), MAIN + LOOPS),
        ],
        gen_batches=[1, 8],
        prompt=32,
        new_tokens=32,
        layer_shapes=[(576, 1536), (1536, 576)],
        layer_tokens=(4, 256),
        sweep_experts=(2, 4, 8, 16),
        sweep_ranks=(4, 16),
        memory_plan=[
            (layers, (4, 256), MAIN),
            (layers, (1, 1024), MAIN),
            (loop_layers, (4, 256), MAIN + LOOPS[:1]),
        ],
        generation_variants=GENERATION_VARIANTS,
    )


def train_section(base, variants: list[Variant], batch: int, seq: int, repeats: int, warmup: int) -> dict:
    ids = model_bench.token_ids(batch, seq, base.config.vocab_size)
    steps = {v.name: model_bench.train_step(model_bench.adapt(base, v), v, ids) for v in variants}
    samples = interleaved(steps, repeats=repeats, warmup=warmup)
    rows = {}
    for name, s in summarise(samples).items():
        rows[name] = dict(
            s, tokens_per_s=batch * seq / s["cpu_s"], vs_floor=paired_ratio(samples[name], samples["floor"])
        )
        for ref in ("peft p=0.05", "peft p=0"):
            if ref in samples:
                rows[name][f"vs {ref}"] = paired_ratio(samples[name], samples[ref])
    return {"layers": base.config.num_hidden_layers, "batch": batch, "seq": seq, "variants": rows}


def generation_section(
    base, variants: list[Variant], batches, prompt: int, new: int, repeats: int, warmup: int
):
    models = {v.name: model_bench.adapt(base, v) for v in variants}
    out = []
    for batch in batches:
        ids = model_bench.token_ids(batch, prompt, base.config.vocab_size, seed=batch)
        runs = {name: model_bench.generate(m, ids, new) for name, m in models.items()}
        samples = interleaved(runs, repeats=repeats, warmup=warmup)
        rows = {
            name: dict(
                s,
                tokens_per_s=batch * new / s["cpu_s"],
                throughput_vs_peft=paired_ratio(samples["peft p=0.05"], samples[name]),
            )
            for name, s in summarise(samples).items()
        }
        out.append({"batch": batch, "prompt": prompt, "new_tokens": new, "variants": rows})
    return out


def memory_section(plan, threads: int, tiny: bool) -> list[dict]:
    """Peak memory per variant, each in a fresh process (in this one for the smoke test: same code, no spawn)."""
    out = []
    for layers, (batch, seq), variants in plan:
        kw = dict(layers=layers, batch=batch, seq=seq, tiny=tiny)
        rows = {
            v.name: model_bench.peak_rss_here(v, **kw)
            if tiny
            else model_bench.peak_rss(v, threads=threads, **kw)
            for v in variants
        }
        out.append({"layers": layers, "batch": batch, "seq": seq, "variants": rows})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 rounds: a sanity check in minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test only
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/benchmarks.md)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 30; --quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument(
        "--from-json", type=Path, help="only re-render --md (and the targets) from this results file"
    )
    parser.add_argument(
        "--section",
        choices=["top_k"],
        help="re-measure only this section into the existing --out results (dated in the report) and re-render",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["targets"] = report.targets(results)
        args.md.write_text(report.render(results))
        return results
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _remeasure(args, argv) if args.section else _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    cfg = settings(args)
    started = time.time()
    results: dict = {
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "settings": json.loads(json.dumps(cfg, default=lambda v: v.name)),
    }
    reps, warm, tiny = cfg["repeats"], cfg["warmup"], cfg["tiny"]

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    log("layer: adapter's own cost")
    results["layer"] = [
        layer_bench.adapter_cost(d_in, d_out, tokens=cfg["layer_tokens"], repeats=1 if tiny else 4 * reps + 1)
        for d_in, d_out in cfg["layer_shapes"]
    ]
    log("layer: N x R sweep")
    d_in, d_out = cfg["layer_shapes"][0]
    results["sweep"] = layer_bench.sweep(
        d_in=d_in,
        d_out=d_out,
        tokens=cfg["layer_tokens"],
        experts=cfg["sweep_experts"],
        ranks=cfg["sweep_ranks"],
        repeats=1 if tiny else 2 * reps + 1,
    )
    log("layer: top-k")
    results["top_k"] = _top_k(cfg)
    # Peak memory first, while this process is small: each variant runs in its own process beside it.
    log("model: peak memory (one fresh process per variant)")
    results["memory"] = memory_section(cfg["memory_plan"], args.threads, tiny)
    bases = {cfg["layers"]: model_bench.build_base(cfg["layers"], tiny=tiny)}
    results["train"] = []
    for layers, (batch, seq), variants in cfg["train_plan"]:
        log(f"model: train step {batch}x{seq}, {layers} layers")
        if layers not in bases:
            bases[layers] = model_bench.build_base(layers, tiny=tiny)
        base = bases[layers]
        results["train"].append(train_section(base, variants, batch, seq, reps, warm))
    log("model: generation")
    results["generation"] = generation_section(
        bases[cfg["layers"]],
        cfg["generation_variants"],
        cfg["gen_batches"],
        cfg["prompt"],
        cfg["new_tokens"],
        reps,
        warm,
    )
    del bases, base
    results["machine"]["load_average_after"] = machine()["load_average"]
    results["elapsed_s"] = time.time() - started
    results["targets"] = report.targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(report.render(results))
    log(f"wrote {args.out} and {args.md}")
    return results


def _top_k(cfg: dict) -> list[dict]:
    d_in, d_out = cfg["layer_shapes"][0]
    return [
        layer_bench.top_k(
            d_in=d_in,
            d_out=d_out,
            tokens=cfg["layer_tokens"],
            n=16 if not cfg["tiny"] else 4,
            r=rank,
            k=2,
            repeats=1 if cfg["tiny"] else 2 * cfg["repeats"] + 1,
        )
        for rank in (4, 32)
    ]


def _remeasure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Re-measure one section into the results already in ``--out`` (the rest is kept as it was measured)."""
    if not args.out.exists():
        raise SystemExit(
            f"{args.out}: no results to update; run the full benchmark first (without --section)"
        )
    results = json.loads(args.out.read_text())
    cfg = settings(args)
    started = time.time()
    load_before = machine()["load_average"]
    results[args.section] = _top_k(cfg)
    results.setdefault("remeasured", {})[args.section] = {
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": [load_before, machine()["load_average"]],
        "elapsed_s": round(time.time() - started, 1),
    }
    results["targets"] = report.targets(results)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.md.write_text(report.render(results))
    print(f"re-measured {args.section} into {args.out} and {args.md} ({time.time() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
