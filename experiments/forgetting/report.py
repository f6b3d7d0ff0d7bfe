"""Tables and figures of the forgetting experiment from ``runs/forgetting/*/eval.json``.

``python experiments/forgetting/run.py --report`` rewrites the block between the ``tables:begin`` / ``tables:end``
markers of ``experiments/forgetting/RESULTS.md`` and the figures ``docs/figures/forgetting_*.png``; the prose around the block is
written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluator import DOWNSTREAM, KNOWLEDGE  # experiments/forgetting/evaluator.py

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "experiments" / "forgetting" / "RESULTS.md"
FIG = REPO / "docs" / "figures"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"

ORDER = [
    "full",
    "lora",
    "loramoe_nolbc",
    "loramoe",
    "loramoe_d0.3_w0.1",
    "loramoe_d0.1_w1.0",
    "loramoe_d0.1_w1.0_np",
    "loramoe_d0.3_w1.0_np",
]
LABEL = {
    "full": "full FT (lr 1e-4)",
    "lora": "LoRA (PEFT, lr 1e-3)",
    "loramoe_nolbc": "LoRAMoE w/o LBC (lr 1e-3)",
    "loramoe": "LoRAMoE d=0.1 w=0.1 (lr 1e-3)",
    "loramoe_d0.3_w0.1": "LoRAMoE d=0.3 w=0.1",
    "loramoe_d0.1_w1.0": "LoRAMoE d=0.1 w=1.0",
    "loramoe_d0.1_w1.0_np": "LoRAMoE d=0.1 w=1.0, LBC on non-padding",
    "loramoe_d0.3_w1.0_np": "LoRAMoE d=0.3 w=1.0, LBC on non-padding",
}


def knowledge_mean(scores: dict) -> float:
    return sum(scores[t] for t in KNOWLEDGE) / len(KNOWLEDGE)


def downstream_mean(scores: dict) -> float:
    return sum(scores[t] for t in DOWNSTREAM) / len(DOWNSTREAM)


def load(out: Path) -> tuple[dict, list[dict]]:
    base = json.loads((out / "base" / "eval.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/eval.json")) if p.parent.name != "base"]
    runs.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99, r["size"]))
    return base, runs


def _seed(run: dict) -> int:
    return run.get("seed", 42)


def _ratio(x: float, b: float) -> str:
    return f"{x / b:.2f}" if b > 0 else "n/a"


def tables(base: dict, runs: list[dict]) -> str:
    b = base["scores"]
    lines = [
        "Knowledge (suites NOT in the SFT mixture): score, and in brackets the retention ratio = score / base score. "
        "`K-ret` = mean knowledge score / base mean knowledge score.",
        "",
        "| method | SFT n | seed | steps | " + " | ".join(KNOWLEDGE) + " | K-mean | K-ret |",
        "|---|---:|---:|---:|" + "---:|" * (len(KNOWLEDGE) + 2),
        "| base | 0 | - | 0 | "
        + " | ".join(f"{b[t]:.3f}" for t in KNOWLEDGE)
        + f" | {knowledge_mean(b):.3f} | 1.00 |",
    ]
    for r in runs:
        s = r["scores"]
        cells = " | ".join(f"{s[t]:.3f} ({_ratio(s[t], b[t])})" for t in KNOWLEDGE)
        lines.append(
            f"| {LABEL.get(r['method'], r['method'])} | {r['size']} | {_seed(r)} | {r['steps']} | {cells} | "
            f"{knowledge_mean(s):.3f} | {_ratio(knowledge_mean(s), knowledge_mean(b))} |"
        )
    lines += [
        "",
        "Downstream (held-out eval rows; accuracy, XSum ROUGE-L F1). `D-mean` = mean of the five.",
        "",
        "| method | SFT n | seed | " + " | ".join(DOWNSTREAM) + " | D-mean | train s | eval s |",
        "|---|---:|---:|" + "---:|" * (len(DOWNSTREAM) + 3),
        "| base | 0 | - | "
        + " | ".join(f"{b[t]:.3f}" for t in DOWNSTREAM)
        + f" | {downstream_mean(b):.3f} | - | {base.get('eval_seconds', 0):.0f} |",
    ]
    for r in runs:
        s = r["scores"]
        lines.append(
            f"| {LABEL.get(r['method'], r['method'])} | {r['size']} | {_seed(r)} | "
            + " | ".join(f"{s[t]:.3f}" for t in DOWNSTREAM)
            + f" | {downstream_mean(s):.3f} | {r.get('train_seconds') or 0:.0f} | {r.get('eval_seconds', 0):.0f} |"
        )
    routed = [r for r in runs if any("router/knowledge/mass_knowledge" in e for e in r.get("train_loss", []))]
    if routed:
        lines += [
            "",
            "Routing during training (last logged training step; `loramoe.routing` statistics the trainer logs): "
            "mean router mass that knowledge / downstream samples put on the knowledge expert group, and the "
            "router entropy (uniform over 6 experts = ln 6 = 1.792). The LBC with delta d pushes the knowledge "
            "group's share toward (1+d)/2 for knowledge samples and (1-d)/2 for downstream samples "
            "(0.55 / 0.45 at d = 0.1).",
            "",
            "| run | step | knowledge -> K group | downstream -> K group | entropy | lm loss | lbc loss |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in routed:
            e = [x for x in r["train_loss"] if "router/knowledge/mass_knowledge" in x][-1]
            lines.append(
                f"| {r['run']} | {e.get('step')} | {float(e['router/knowledge/mass_knowledge']):.4f} | "
                f"{float(e['router/downstream/mass_knowledge']):.4f} | {float(e['router/knowledge/entropy']):.3f} | "
                f"{float(e.get('lm_loss', 'nan')):.3f} | {float(e.get('lbc_loss', 'nan')):.4f} |"
            )
    total = sum((r.get("train_seconds") or 0) + r.get("eval_seconds", 0) for r in runs) + base.get(
        "eval_seconds", 0
    )
    lines += ["", f"Compute: {len(runs)} fine-tuned runs + base; sum of per-run train + eval times {total / 60:.0f} min "
              "(two driver processes in parallel; see Compute below), "
              f"torch threads = {base.get('threads')}."]  # fmt: skip
    return "\n".join(lines)


def figures(base: dict, runs: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIG.mkdir(parents=True, exist_ok=True)
    b = base["scores"]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    main = [m for m in methods if m in ("full", "lora", "loramoe_nolbc", "loramoe")]
    paths = []

    def panel(ax, key, fn, title, ratio):
        def scale(v: float) -> float:
            return (v / fn(b) if fn(b) > 0 else float("nan")) if ratio else v

        for m in main:  # the seed-42 runs as a line, replicates as crosses in the same colour
            pts = sorted(
                (r["size"], scale(fn(r["scores"]))) for r in runs if r["method"] == m and _seed(r) == 42
            )
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LABEL[m])
            reps = [(r["size"], scale(fn(r["scores"]))) for r in runs if r["method"] == m and _seed(r) != 42]
            if reps:
                ax.plot([p[0] for p in reps], [p[1] for p in reps], "x", ms=8, color=line.get_color())
        for m in methods:
            if m in main:
                continue
            pts = [(r["size"], fn(r["scores"])) for r in runs if r["method"] == m]
            if ratio:
                pts = [(n, v / fn(b) if fn(b) > 0 else float("nan")) for n, v in pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "*", ms=10, label=LABEL[m])
        ax.axhline(1.0 if ratio else fn(b), color="grey", ls="--", lw=1, label="base")
        sizes = sorted({r["size"] for r in runs})
        ax.set_xscale("log")
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(n) for n in sizes])
        if ratio:
            if fn(b) > 0:
                top = max([fn(r["scores"]) / fn(b) for r in runs] + [1.0])
                ax.set_ylim(0, max(2.0, top * 1.05))
            else:
                ax.text(0.5, 0.5, "base score 0: ratio undefined", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("SFT samples")

    fig, axes = plt.subplots(1, 1 + len(KNOWLEDGE), figsize=(4.4 * (1 + len(KNOWLEDGE)), 4.2))
    panel(axes[0], "mean", knowledge_mean, "knowledge retention (mean score / base)", True)
    for ax, t in zip(axes[1:], KNOWLEDGE, strict=True):
        if b[t] > 0:
            panel(ax, t, lambda s, t=t: s[t], f"{t}: retention", True)
        else:  # a ratio to 0 is undefined: the scores themselves
            panel(ax, t, lambda s, t=t: s[t], f"{t}: score (base 0)", False)
    axes[0].set_ylabel("score / base score")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = FIG / "forgetting_retention.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 6, figsize=(26, 4.2))
    panel(axes[0], "mean", downstream_mean, "downstream mean", False)
    for ax, t in zip(axes[1:], DOWNSTREAM, strict=True):
        panel(ax, t, lambda s, t=t: s[t], t, False)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = FIG / "forgetting_downstream.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def report(out: Path) -> None:
    base, runs = load(out)
    block = f"{BEGIN}\n{tables(base, runs)}\n{END}"
    text = DOC.read_text() if DOC.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + block + tail)
    for p in figures(base, runs):
        print("wrote", p)
    print("wrote", DOC)
