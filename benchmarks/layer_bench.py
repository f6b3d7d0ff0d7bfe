"""Layer-level measurements on one frozen linear: the adapter's own cost, the N x R sweep, top-k against dense.

The adapter's own cost is ``(adapted linear fwd+bwd) - (bare linear fwd+bwd)``, paired per round; the bare linear
is frozen, so its backward is the gradient to x only, as inside a frozen model.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.reference import DenseTopKLinear, ExpertLoopLinear, GatherTopKLinear, PreviousFusedLinear
from benchmarks.timing import interleaved, paired_difference, summarise
from loramoe.layer import LoRAMoELinear

ALPHA = 32.0


def fused_layer(base: nn.Linear, n: int, r: int, p: float, mode: str = "per_expert", *, top_k=None, cls=None):
    layer = LoRAMoELinear(base, num_experts=n, rank=r, alpha=ALPHA, dropout=p, dropout_mode=mode, top_k=top_k)
    with torch.no_grad():
        layer.loramoe_B.normal_(std=0.02)  # a trained-looking adapter, not the zero init
    if cls is not None:
        layer.__class__ = cls
    return layer.train()


def peft_layer(base: nn.Linear, r: int, p: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    layer = PeftLoraLinear(
        base,
        "default",
        config=LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p),
        r=r,
        lora_alpha=ALPHA,
        lora_dropout=p,
    )
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.02)
    return layer.train()


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        module(x).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def forward_only(module: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def _inputs(d_in: int, d_out: int, tokens: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    x = torch.randn(*tokens, d_in, generator=gen).requires_grad_()
    grad = torch.randn(*tokens, d_out, generator=gen)
    return base, x, grad


def _costs(samples: dict, bare: str = "bare") -> dict:
    """Per variant: median step time and median paired (variant - bare) cost, in milliseconds."""
    out = {}
    for name, s in summarise(samples).items():
        out[name] = {"step_ms": 1e3 * s["cpu_s"], "wall_ms": 1e3 * s["wall_s"]}
        if name != bare:
            out[name]["adapter_ms"] = 1e3 * paired_difference(samples[name], samples[bare])
    return out


def adapter_cost(d_in: int, d_out: int, *, tokens=(4, 256), n=6, r=4, p=0.05, repeats=7) -> dict:
    """The adapter's own fwd+bwd cost at one linear: fused vs per-expert loop vs PEFT LoRA of rank N*R."""
    base, x, grad = _inputs(d_in, d_out, tokens)
    modules = {"bare": base}
    for label, drop, mode in (
        ("p=0", 0.0, "per_expert"),
        ("per_expert", p, "per_expert"),
        ("shared", p, "shared"),
    ):
        modules[f"fused {label}"] = fused_layer(base, n, r, drop, mode)
        modules[f"loop {label}"] = fused_layer(base, n, r, drop, mode, cls=ExpertLoopLinear)
        modules[f"previous {label}"] = fused_layer(base, n, r, drop, mode, cls=PreviousFusedLinear)
    modules[f"peft r={n * r} p=0"] = peft_layer(base, n * r, 0.0)
    modules[f"peft r={n * r} p={p}"] = peft_layer(base, n * r, p)
    costs = _costs(interleaved({k: fwd_bwd(m, x, grad) for k, m in modules.items()}, repeats=repeats))
    labels = ("p=0", "per_expert", "shared")
    ratios = {
        f"loop/fused {k}": costs[f"loop {k}"]["adapter_ms"] / costs[f"fused {k}"]["adapter_ms"]
        for k in labels
    }
    before = {
        f"previous/fused {k}": costs[f"previous {k}"]["adapter_ms"] / costs[f"fused {k}"]["adapter_ms"]
        for k in labels
    }
    return {
        "shape": [d_in, d_out],
        "tokens": list(tokens),
        "experts": n,
        "rank": r,
        "dropout": p,
        "variants": costs,
        "ratios": ratios,
        "before_after": before,
    }


def sweep(*, d_in=576, d_out=1536, tokens=(4, 256), experts=(2, 4, 8, 16), ranks=(4, 16), p=0.05, repeats=5):
    """Adapter cost over N x R: fused and loop (no dropout and per-expert dropout), fused shared, PEFT r = N*R."""
    base, x, grad = _inputs(d_in, d_out, tokens)
    rows = []
    for n in experts:
        for r in ranks:
            modules = {
                "bare": base,
                "fused p=0": fused_layer(base, n, r, 0.0),
                "loop p=0": fused_layer(base, n, r, 0.0, cls=ExpertLoopLinear),
                "fused per_expert": fused_layer(base, n, r, p),
                "loop per_expert": fused_layer(base, n, r, p, cls=ExpertLoopLinear),
                "fused shared": fused_layer(base, n, r, p, "shared"),
                "peft": peft_layer(base, n * r, p),
            }
            costs = _costs(interleaved({k: fwd_bwd(m, x, grad) for k, m in modules.items()}, repeats=repeats))
            rows.append({"experts": n, "rank": r, "variants": costs})
    return {"shape": [d_in, d_out], "tokens": list(tokens), "dropout": p, "rows": rows}


def adapter_flops(d_in: int, d_out: int, n: int, r: int, k: int | None = None) -> int:
    """Forward multiply-add FLOPs per token of the adapter: router + experts (k of them when sparse)."""
    return 2 * d_in * n + 2 * (n if k is None else k) * r * (d_in + d_out)


def top_k(*, d_in=576, d_out=1536, tokens=(4, 256), n=16, r=4, k=2, repeats=7) -> dict:
    """Dense routing vs top-k three ways: the library's (only the chosen experts, grouped by expert), every expert
    computed with the others' weights zeroed, and a Python loop gathering each expert's tokens."""
    base, x, grad = _inputs(d_in, d_out, tokens)
    modules = {
        "bare": base,
        "dense": fused_layer(base, n, r, 0.0),
        f"top-{k} (library)": fused_layer(base, n, r, 0.0, top_k=k),
        f"top-{k} dense-masked": fused_layer(base, n, r, 0.0, top_k=k, cls=DenseTopKLinear),
        f"top-{k} gather loop": fused_layer(base, n, r, 0.0, top_k=k, cls=GatherTopKLinear),
    }
    train = _costs(interleaved({m: fwd_bwd(mod, x, grad) for m, mod in modules.items()}, repeats=repeats))
    infer = _costs(interleaved({m: forward_only(mod, x) for m, mod in modules.items()}, repeats=repeats))
    return {
        "shape": [d_in, d_out],
        "tokens": list(tokens),
        "experts": n,
        "rank": r,
        "k": k,
        "flops_per_token": {
            "base": 2 * d_in * d_out,
            "dense": adapter_flops(d_in, d_out, n, r),
            f"top-{k}": adapter_flops(d_in, d_out, n, r, k),
        },
        "train": train,
        "inference": infer,
    }
