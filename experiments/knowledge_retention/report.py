"""Tables and figure of the knowledge-retention experiment from the committed results (``results/*.json``).

Writes the block between ``<!-- kr:begin -->`` and ``<!-- kr:end -->`` in docs/results.md and
``docs/figures/knowledge_retention.png``. Every figure has a 95 % interval: a suite's score its Wilson interval
(ROUGE-L a normal one); a retention ratio (a run's CBQA / the same method's knowledge-only run's, on the same items)
and the downstream mean a bootstrap over items.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent / "forgetting")]

from run import GROUPS_OFF, METHODS, SIZES, item_key, parse_run, queue, setting_of  # noqa: E402
from scoring import decode_values, paired_bootstrap, paired_ratio  # noqa: E402
from sets import CBQA  # noqa: E402

DOWN = ["sst2", "rte", "boolq", "agnews", "xsum"]
LABEL = {
    "lora": "LoRA (rank 24)",
    "loramoe_lbc": "LoRAMoE + LBC",
    "loramoe_top2": "LoRAMoE top-2 + strong LBC",
    "full": "full FT",
    "loramoe_nolbc": "LoRAMoE w/o LBC",
    "loramoe_gm": "LoRAMoE + LBC + group mass (beyond the paper)",
}
BEGIN, END = "<!-- kr:begin -->", "<!-- kr:end -->"
DRAWS = 2000


def label(row: dict) -> str:
    return LABEL[row["method"]] + (" (narrow mix)" if row["setting"] == "_narrow" else "")


def load(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(results.glob("*.json"))}


def values(rec: dict, suite: str) -> list[float]:
    return decode_values(rec["scores"][suite]["values"])


def cbqa_values(rec: dict) -> list[float]:
    """Every CBQA item of the three suites, pooled (WebQuestions, EfficientQA, TREC)."""
    return [v for s in CBQA for v in values(rec, s)]


def downstream_bootstrap(recs: list[dict], stat, seed: int = 0) -> tuple[float, float, float]:
    """``stat`` of the runs' downstream means (the five suites' mean score), with a 95 % interval: each suite's
    items resampled, jointly across the runs (they are scored on the same held-out rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    point = np.zeros(len(recs))
    draws = np.zeros((len(recs), DRAWS))
    for suite in DOWN:
        cols = np.asarray([values(r, suite) for r in recs], dtype=float)
        idx = rng.integers(0, cols.shape[1], size=(DRAWS, cols.shape[1]))
        point += cols.mean(axis=1) / len(DOWN)
        draws += np.stack([c[idx].mean(axis=1) for c in cols]) / len(DOWN)
    lo, hi = np.percentile(stat(*draws), [2.5, 97.5])
    return float(stat(*point)), float(lo), float(hi)


def down_mean(rec: dict) -> tuple[float, float, float]:
    """Mean of the five downstream suites' scores, with a bootstrap interval."""
    return downstream_bootstrap([rec], lambda a: a)


def pooled(vals: list[float]) -> tuple[float, float, float]:
    from loramoe.eval.metrics import wilson_interval

    lo, hi = wilson_interval(sum(vals), len(vals))
    return sum(vals) / len(vals), lo, hi


def fmt(x: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def run_rows(res: dict[str, dict]) -> list[dict]:
    """One row per finished run: its CBQA (pooled and per suite), retention vs its knowledge-only run, downstream."""
    rows = []
    for name, rec in res.items():
        if rec.get("item") != name or name == "base" or "__" in name or name.startswith("pilot_"):
            continue
        method, size, suffix = parse_run(name)
        ref_name = f"{method}_d0{suffix}" if f"{method}_d0{suffix}" in res else f"{method}_d0"
        ref = res.get(ref_name)
        row = {"name": name, "method": method, "size": size, "seed": rec["seed"], "rec": rec, "ref": ref_name,
               "setting": setting_of(suffix), "cbqa": pooled(cbqa_values(rec)), "down": down_mean(rec)}  # fmt: skip
        if ref is not None and size:
            if any(rec["sets"][s] != ref["sets"][s] for s in CBQA):
                raise SystemExit(
                    f"{name} and its reference were scored on different CBQA items (set fingerprints)"
                )
            r = paired_ratio(cbqa_values(rec), cbqa_values(ref), draws=DRAWS)
            row["retention"] = (r["ratio"], r["lo"], r["hi"])
            w = paired_ratio(values(rec, "webq"), values(ref, "webq"), draws=DRAWS)
            row["retention_webq"] = (w["ratio"], w["lo"], w["hi"])
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (order[r["method"]], r["size"], r["seed"]))


def tables(res: dict[str, dict]) -> str:
    from report_compare import head_to_head, seed_table  # both modules import this one
    from report_pilots import pilot_table

    rows = run_rows(res)
    lines = []
    todo = [item_key(i) for i in queue() if item_key(i) not in res]
    lines.append(
        f"**Partial: {len(res)} of {len(queue())} queue items finished**; next in the queue: "
        f"{', '.join(todo[:8]) if todo else 'none'}{f' and {len(todo) - 8} more' if len(todo) > 8 else ''} "
        "(`run.py --status` lists them with their estimated CPU cost)."
    )
    lines.append("")
    lines.append(
        "CBQA = closed-book QA in the knowledge SFT's format, pooled over WebQuestions test, EfficientQA dev and TREC "
        "curated-test (each item counts once); retention = CBQA after knowledge + downstream SFT / CBQA after the same "
        "method's knowledge-only run (downstream 0), on the same items (paired bootstrap interval). Downstream = mean "
        "of SST-2, RTE, BoolQ, AG News accuracy and XSum ROUGE-L on held-out rows. 95 % intervals in brackets."
    )
    lines.append("")
    lines.append(
        "| method | downstream n | seed | steps | CBQA | retention | WebQ | WebQ retention | EfficientQA | TREC | downstream |"
    )
    lines.append("|---|---:|---:|---:|---|---|---|---|---|---|---|")
    if "base" in res:
        b = res["base"]
        s = b["scores"]
        lines.append(
            f"| base (no SFT) | - | - | 0 | {fmt(*pooled(cbqa_values(b)))} | - | "
            f"{fmt(s['webq']['score'], s['webq']['lo'], s['webq']['hi'])} | - | "
            f"{fmt(s['efficientqa']['score'], s['efficientqa']['lo'], s['efficientqa']['hi'])} | "
            f"{fmt(s['trec']['score'], s['trec']['lo'], s['trec']['hi'])} | {fmt(*down_mean(b))} |"
        )
    for r in rows:
        s = r["rec"]["scores"]
        ret = fmt(*r["retention"], 2) if "retention" in r else "(reference)"
        retw = fmt(*r["retention_webq"], 2) if "retention_webq" in r else "-"
        lines.append(
            f"| {label(r)} | {r['size']} | {r['seed']} | {r['rec']['train']['steps']} | {fmt(*r['cbqa'])} | "
            f"{ret} | {fmt(s['webq']['score'], s['webq']['lo'], s['webq']['hi'])} | {retw} | "
            f"{fmt(s['efficientqa']['score'], s['efficientqa']['lo'], s['efficientqa']['hi'])} | "
            f"{fmt(s['trec']['score'], s['trec']['lo'], s['trec']['hi'])} | {fmt(*r['down'])} |"
        )
    lines.append("")
    lines.append("Probes and per-task downstream scores (95 % intervals in the JSON):")
    lines.append("")
    probes = ["rome", "lama", "facts", *DOWN]
    lines.append("| run | " + " | ".join(probes) + " |")
    lines.append("|---|" + "---:|" * len(probes))
    for name in ["base", *[r["name"] for r in rows]]:
        if name in res:
            s = res[name]["scores"]
            lines.append(f"| {name} | " + " | ".join(f"{s[p]['score']:.3f}" for p in probes) + " |")
    lines += [
        "",
        *head_to_head(res, rows, "lora"),
        "",
        *head_to_head(res, rows, "full"),
        "",
        *head_to_head(res, rows, "loramoe_lbc"),
        "",
        *seed_table(res, rows),
        "",
        *pilot_table(res),
        "",
        *group_off_table(res),
        "",
        *routing_table(res),
        "",
        *cost_lines(res),
    ]
    return "\n".join(lines)


def diff(a: tuple[float, float, float] | dict, digits: int = 3) -> str:
    """A signed difference with its interval; ``a`` is (value, lo, hi) or a paired_bootstrap result."""
    if isinstance(a, dict):
        a = (a["value"], a["lo"], a["hi"])
    return f"{a[0]:+.{digits}f} [{a[1]:+.{digits}f}, {a[2]:+.{digits}f}]"


def group_off_table(res: dict[str, dict]) -> list[str]:
    done = [k for k in res if "__" in k]
    if not done:
        return ["Expert groups switched off: no run evaluated yet (queued after the LoRAMoE runs)."]
    lines = [
        "Expert groups switched off at inference (`loramoe.disable_experts`; the router renormalised over the other "
        "group); changes against the same model with every expert on, paired over the same items. If the groups "
        "specialise as the paper says, each switch hurts its own side more: knowledge off costs CBQA, downstream off "
        "costs the downstream mean.",
        "",
        "| run | experts on | CBQA | change | downstream | change | facts | SST-2 | AG News |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for run in sorted({res[k]["run"] for k in done}):
        if run not in res:
            continue
        on = res[run]
        for label, rec in [
            ("all", on),
            *[(f"{g} off", res.get(f"{run}__{g}_off")) for g in GROUPS_OFF],
        ]:
            if rec is None:
                continue
            s = rec["scores"]
            change_cbqa = change_down = "-"
            if rec is not on:
                d = paired_bootstrap(lambda x, y: x - y, [cbqa_values(rec), cbqa_values(on)], draws=DRAWS)
                change_cbqa = diff(d)
                change_down = diff(downstream_bootstrap([rec, on], lambda x, y: x - y))
            lines.append(
                f"| {run} | {label} | {fmt(*pooled(cbqa_values(rec)))} | {change_cbqa} | {fmt(*down_mean(rec))} | "
                f"{change_down} | {s['facts']['score']:.3f} | {s['sst2']['score']:.3f} | {s['agnews']['score']:.3f} |"
            )
    return lines


def routing_table(res: dict[str, dict]) -> list[str]:
    rows = [(k, r) for k, r in res.items() if "routing" in r and "__" not in k]
    if not rows:
        return []
    lines = [
        "Router mass on the knowledge expert group over eval prompts + reference answers (48 per suite; mean over "
        "layers and positions): CBQA items (knowledge type) vs downstream items. Uniform = 0.5.",
        "",
        "| run | CBQA -> knowledge group | downstream -> knowledge group |",
        "|---|---:|---:|",
    ]
    for k, r in rows:
        t = r["routing"]["types"]
        lines.append(f"| {k} | {t['knowledge']['knowledge']:.3f} | {t['downstream']['knowledge']:.3f} |")
    return lines


def train_cpu(rec: dict) -> tuple[float, float]:
    """A run's measured training CPU seconds, and the estimated seconds of the steps before its resume (a run
    resumed at step k measured only the steps after it: the earlier process's time ended with it), at the run's
    own measured rate."""
    train = rec.get("train") or {}
    seconds = train.get("seconds") or {}
    cpu, start, steps = seconds.get("cpu", 0.0), seconds.get("from_step", 0), train.get("steps") or 0
    return cpu, (cpu / (steps - start) * start if 0 < start < steps else 0.0)


def cost_lines(res: dict[str, dict]) -> list[str]:
    measured, estimated = (sum(t) for t in zip(*(train_cpu(r) for r in res.values()), strict=True))
    ev = sum(r["eval_seconds"]["cpu"] for r in res.values())
    before = (f", {estimated / 3600:.1f} of it estimated for the steps before a resume at the resumed run's rate"
              if estimated else "")  # fmt: skip
    return [f"Compute so far: {(measured + estimated) / 3600:.1f} CPU-hours of training{before}, and "
            f"{ev / 3600:.1f} of evaluation (one torch thread per process; per-item figures in "
            "`experiments/knowledge_retention/results/`)."]  # fmt: skip


def figure(res: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run_rows(res) if r["seed"] == 42 and not r["setting"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, method in enumerate(METHODS):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["size"])
        if not mine:
            continue
        xs = [r["size"] + (i - 2) * 40 for r in mine]  # a small offset so intervals do not overlap
        ret = [r.get("retention", (1.0, 1.0, 1.0)) for r in mine]  # a knowledge-only run is its own reference
        for ax, pts in ((axes[0], ret), (axes[1], [r["down"] for r in mine])):
            ax.errorbar(xs, [p[0] for p in pts], yerr=[[p[0] - p[1] for p in pts], [p[2] - p[0] for p in pts]],
                        marker="o", capsize=3, label=LABEL[method])  # fmt: skip
        cb, dn = [r["cbqa"] for r in mine], [r["down"] for r in mine]
        axes[2].errorbar(
            [d[0] for d in dn],
            [c[0] for c in cb],
            xerr=[[d[0] - d[1] for d in dn], [d[2] - d[0] for d in dn]],
            yerr=[[c[0] - c[1] for c in cb], [c[2] - c[0] for c in cb]],
            marker="o",
            capsize=3,
            label=LABEL[method],
        )
        for r, d, c in zip(mine, dn, cb):
            axes[2].annotate(
                f"{r['size']}", (d[0], c[0]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    axes[0].axhline(1.0, color="grey", lw=0.5)
    axes[0].set_title("CBQA retention (vs the method's knowledge-only run)")
    axes[1].set_title("downstream mean")
    axes[2].set_title("CBQA against downstream (labels: downstream n)")
    for ax in axes[:2]:
        ax.set_xlabel("downstream SFT samples (on top of 1,000 knowledge samples)")
        ax.set_xticks(SIZES)
    axes[2].set_xlabel("downstream mean")
    axes[2].set_ylabel("CBQA (pooled)")
    if "base" in res:
        axes[1].axhline(down_mean(res["base"])[0], color="grey", ls=":", label="base (no SFT)")
        axes[2].axhline(pooled(cbqa_values(res["base"]))[0], color="grey", ls=":", label="base (no SFT)")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("95 % intervals", fontsize=8, x=0.99, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path) -> None:
    res = load(results)
    doc = REPO / "docs" / "results.md"
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{tables(res)}\n{END}{tail}", encoding="utf-8")
    figure(res, REPO / "docs" / "figures" / "knowledge_retention.png")
    from report_compare import setting_figure

    setting_figure(run_rows(res), REPO / "docs" / "figures" / "knowledge_retention_settings.png")
    print(
        f"{doc}: {len(res)} results; docs/figures/knowledge_retention.png, knowledge_retention_settings.png"
    )


if __name__ == "__main__":
    report(HERE / "results")
