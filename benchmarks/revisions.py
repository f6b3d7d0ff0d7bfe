"""The layer of another git revision beside this checkout's, side by side: ``python benchmarks/revisions.py REV``.

Loads ``src/loramoe/layer.py`` (and ``_kernels.py`` when that revision has it) of REV as a separate package, builds
both layers over one frozen base with the same parameters, and times them interleaved (``timing.interleaved``):
the adapter's own fwd+bwd cost at the SmolLM2-135M shapes for each dropout mode and top-k, and the no-grad forward
of generation (1 and 8 tokens, with and without ``cached_stacking``). Prints one JSON object; ratios are paired per round (after / before).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.layer_bench import fused_layer, fwd_bwd  # noqa: E402
from benchmarks.timing import interleaved, machine, paired_difference, paired_ratio  # noqa: E402
from loramoe.layer import LoRAMoELinear, cached_stacking  # noqa: E402


def load_revision(rev: str, into: Path) -> type:
    """``LoRAMoELinear`` of ``rev``, imported as the package ``loramoe_<rev>`` from files written under ``into``."""
    package = into / "loramoe_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("layer.py", "_kernels.py"):
        shown = subprocess.run(
            ["git", "show", f"{rev}:src/loramoe/{name}"], cwd=ROOT, capture_output=True, text=True
        )
        if shown.returncode == 0:
            (package / name).write_text(
                shown.stdout.replace("from loramoe import", "from loramoe_before import")
            )
    sys.path.insert(0, str(into))
    spec = importlib.util.find_spec("loramoe_before.layer")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoRAMoELinear


def _pair(base, before_cls, **kw) -> dict[str, LoRAMoELinear]:
    after = fused_layer(base, kw.pop("n"), kw.pop("r"), kw.pop("p"), kw.pop("mode"), top_k=kw.pop("top_k"))
    before = before_cls(
        base, num_experts=after.num_experts, rank=after.rank, alpha=after.scaling * after.rank,
        dropout=after.dropout, dropout_mode=after.dropout_mode, top_k=after.top_k,
    ).train()  # fmt: skip
    before.load_state_dict(after.state_dict())
    return {"before": before, "after": after}


def compare(before_cls, *, repeats: int) -> dict:
    out = {}
    cases = [("p=0", 0.0, "per_expert", None), ("per_expert", 0.05, "per_expert", None)]
    cases += [("shared", 0.05, "shared", None), ("top-2 of 16", 0.0, "per_expert", 2)]
    for d_in, d_out in ((576, 1536), (1536, 576)):
        gen = torch.Generator().manual_seed(0)
        base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        x = torch.randn(4, 256, d_in, generator=gen).requires_grad_()
        grad = torch.randn(4, 256, d_out, generator=gen)
        for label, p, mode, k in cases:
            n = 16 if k else 6
            layers = _pair(base, before_cls, n=n, r=4, p=p, mode=mode, top_k=k)
            fns = {"bare": fwd_bwd(base, x, grad)} | {name: fwd_bwd(m, x, grad) for name, m in layers.items()}
            s = interleaved(fns, repeats=repeats)
            out[f"train {d_in}->{d_out} {label}"] = {
                "adapter_ms_before": 1e3 * paired_difference(s["before"], s["bare"]),
                "adapter_ms_after": 1e3 * paired_difference(s["after"], s["bare"]),
                "step_after/before": paired_ratio(s["after"], s["before"]),
            }
        for tokens in (1, 8):  # generation: no grad, eval mode
            layers = _pair(base, before_cls, n=6, r=4, p=0.05, mode="per_expert", top_k=None)
            x_gen = torch.randn(1, tokens, d_in, generator=gen)

            def forward(m, cached=False, x_gen=x_gen):
                def run():
                    with torch.no_grad(), cached_stacking(m) if cached else contextlib.nullcontext():
                        for _ in range(50):
                            m(x_gen)

                return run

            fns = {name: forward(m.eval()) for name, m in layers.items()}
            fns["after cached"] = forward(layers["after"], cached=True)
            s = interleaved(fns, repeats=repeats)
            out[f"generate {d_in}->{d_out} {tokens} tokens x50"] = {
                "ms_before": 1e3 * min(s["before"]["cpu_s"]),
                "ms_after": 1e3 * min(s["after"]["cpu_s"]),
                "ms_after_cached_stacking": 1e3 * min(s["after cached"]["cpu_s"]),
                "after/before": paired_ratio(s["after"], s["before"]),
                "after cached_stacking/before": paired_ratio(s["after cached"], s["before"]),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision whose layer is the 'before'")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--into",
        type=Path,
        help="also store the result as 'revisions' in this results JSON (docs/benchmarks.json)",
    )
    parser.add_argument(
        "--md", type=Path, default=ROOT / "docs" / "benchmarks.md", help="re-rendered with --into"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.time(), machine()["load_average"]
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(load_revision(args.rev, Path(tmp)), repeats=args.repeats)
    record = {
        "before": args.rev,
        "command": " ".join(["python benchmarks/revisions.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": [load, machine()["load_average"]],
        "elapsed_s": round(time.time() - started),
        "results": results,
    }
    print(json.dumps(record, indent=1))
    if args.into:
        from benchmarks import report

        everything = json.loads(args.into.read_text())
        everything["revisions"] = record
        args.into.write_text(json.dumps(everything, indent=1) + "\n")
        args.md.write_text(report.render(everything))


if __name__ == "__main__":
    main()
