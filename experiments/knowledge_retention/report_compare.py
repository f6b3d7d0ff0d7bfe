"""The comparisons of docs/results.md: each method head to head with LoRA and each LoRAMoE variant with full
fine-tuning (same downstream volume, mixture and seed, paired over the same items), and each second-seed run beside
its first seed with the spread between them."""

from __future__ import annotations

from report import DRAWS, cbqa_values, diff, downstream_bootstrap, fmt, label, values
from scoring import paired_bootstrap

AGAINST = {
    "lora": (
        "Head to head with LoRA",
        lambda method: method != "lora",
    ),
    "full": (
        "Head to head with full fine-tuning (the paper's baseline)",
        lambda method: method.startswith("loramoe"),
    ),
    "loramoe_lbc": (
        "What the LBC adds: LoRAMoE without it head to head with LoRAMoE + LBC",
        lambda method: method == "loramoe_nolbc",
    ),
}
SHORT = {"lora": "LoRA", "full": "full FT", "loramoe_lbc": "LoRAMoE + LBC"}


def head_to_head(res: dict[str, dict], rows: list[dict], against: str) -> list[str]:
    """Every run whose method ``AGAINST[against]`` selects, against the ``against`` run at the same downstream
    volume, mixture and seed."""
    title, selects = AGAINST[against]
    key = lambda r: (r["size"], r["seed"], r["setting"])  # noqa: E731
    other = {key(r): r for r in rows if r["method"] == against}
    pairs = [(r, other[key(r)]) for r in rows if selects(r["method"]) and key(r) in other]
    if not pairs:
        return []
    lines = [
        f"{title} at the same downstream volume, mixture and seed: differences paired over the same items "
        f"(positive = the first method keeps or scores more; retention difference = the difference of the two "
        "methods' ratios to their own knowledge-only runs, the four runs resampled together). `facts` (108 world "
        "facts the base model knows, asked in chat) is where the first experiment saw the forgetting.",
        "",
        f"| method - {SHORT[against]} | downstream n | seed | CBQA | retention | WebQ | facts | downstream |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for r, ref in pairs:
        a, b = r["rec"], ref["rec"]
        d_cbqa, d_webq, d_facts = (
            paired_bootstrap(lambda x, y: x - y, cols, draws=DRAWS)
            for cols in (
                [cbqa_values(a), cbqa_values(b)],
                [values(a, "webq"), values(b, "webq")],
                [values(a, "facts"), values(b, "facts")],
            )
        )
        ret = "-"
        a0, b0 = res.get(r["ref"]), res.get(ref["ref"])
        if r["size"] and a0 and b0:
            d = paired_bootstrap(
                lambda x, x0, y, y0: x / x0 - y / y0,
                [cbqa_values(a), cbqa_values(a0), cbqa_values(b), cbqa_values(b0)],
                draws=DRAWS,
            )
            ret = diff(d, 2)
        lines.append(
            f"| {label(r)} | {r['size']} | {r['seed']} | {diff(d_cbqa)} | {ret} | {diff(d_webq)} | "
            f"{diff(d_facts)} | {diff(downstream_bootstrap([a, b], lambda x, y: x - y))} |"
        )
    return lines


def seed_table(res: dict[str, dict], rows: list[dict]) -> list[str]:
    """Each later-seed run beside its first seed (42): CBQA, retention, downstream and facts of both, and the
    difference between the seeds paired over the same items."""
    first = {(r["method"], r["size"], r["setting"]): r for r in rows if r["seed"] == 42}
    pairs = [(first[key], r) for r in rows
             if r["seed"] != 42 and (key := (r["method"], r["size"], r["setting"])) in first]  # fmt: skip
    if not pairs:
        return [
            "Second seeds: none finished yet (next in the queue: LoRA and LoRAMoE + LBC at the narrow mixture)."
        ]
    lines = [
        "Later seeds beside the first (training seed 43 or 44 against 42: a different initialisation of the "
        "adapters, order of the samples and dropout; the same data sets, evaluation items and knowledge-only "
        "reference). Seed difference = later - first, paired over the same items; its size is the spread a "
        "single-seed conclusion carries.",
        "",
        "| run | seed | CBQA seed 42 | CBQA this seed | seed difference | retention seed 42 | retention this seed | "
        "downstream seed 42 | downstream this seed | facts seed 42 | facts this seed |",
        "|---|---:|---|---|---|---|---|---|---|---:|---:|",
    ]
    spread = {"CBQA": 0.0, "retention": 0.0, "downstream": 0.0, "facts": 0.0}
    for one, two in pairs:
        a, b = one["rec"], two["rec"]
        d = paired_bootstrap(lambda x, y: y - x, [cbqa_values(a), cbqa_values(b)], draws=DRAWS)
        ret = [fmt(*r["retention"], 2) if "retention" in r else "(reference)" for r in (one, two)]
        fa, fb = a["scores"]["facts"]["score"], b["scores"]["facts"]["score"]
        lines.append(
            f"| {label(one)}, {one['size']} | {two['seed']} | {fmt(*one['cbqa'])} | {fmt(*two['cbqa'])} | "
            f"{diff(d)} | {ret[0]} | {ret[1]} | {fmt(*one['down'])} | {fmt(*two['down'])} | {fa:.3f} | {fb:.3f} |"
        )
        spread["CBQA"] = max(spread["CBQA"], abs(d["value"]))
        spread["downstream"] = max(spread["downstream"], abs(two["down"][0] - one["down"][0]))
        spread["facts"] = max(spread["facts"], abs(fb - fa))
        if "retention" in one and "retention" in two:
            spread["retention"] = max(spread["retention"], abs(two["retention"][0] - one["retention"][0]))
    lines += [
        "",
        "Largest spread between a later seed and the first over these runs: "
        + ", ".join(f"{k} {v:.3f}" for k, v in spread.items())
        + " (absolute differences of the point values).",
        *all_seeds(res, rows),
    ]
    return lines


def _mean_difference(k: int):
    """The mean of the first ``k`` columns minus the mean of the next ``k`` (works on arrays of resampled means)."""
    return lambda *m: sum(m[:k]) / k - sum(m[k : 2 * k]) / k


def _mean_ratio_difference(k: int):
    """Over ``4 k`` columns (k runs of one method, k of the other, then each run's reference in the same order):
    the mean of the first method's ratios to their references minus the other's."""
    return lambda *m: _mean_difference(k)(*(m[i] / m[2 * k + i] for i in range(2 * k)))


def all_seeds(res: dict[str, dict], rows: list[dict]) -> list[str]:
    """Each method against LoRA where both ran at two or more of the same seeds: the difference of their means over
    those seeds. The interval resamples the items only (all the runs together); a few seeds cannot give the
    seed-to-seed variance an interval, so the per-seed differences are stated beside it."""
    runs = {(r["method"], r["size"], r["setting"], r["seed"]): r for r in rows}
    lines = []
    for (method, size, setting, seed), r in runs.items():
        if method == "lora" or seed != 42:
            continue
        seeds = sorted(
            s
            for (m, z, t, s) in runs
            if (m, z, t) == (method, size, setting) and ("lora", size, setting, s) in runs
        )
        if len(seeds) < 2:
            continue
        k = len(seeds)
        ours, lora = ([runs[(m, size, setting, s)] for s in seeds] for m in (method, "lora"))
        cols = [cbqa_values(x["rec"]) for x in ours + lora]
        d = paired_bootstrap(_mean_difference(k), cols, draws=DRAWS)
        refs = [res.get(x["ref"]) for x in ours + lora]
        ret = "-"
        if None not in refs:
            ratios = _mean_ratio_difference(k)
            ret = diff(paired_bootstrap(ratios, cols + [cbqa_values(x) for x in refs], draws=DRAWS), 2)
        down = downstream_bootstrap([x["rec"] for x in ours + lora], _mean_difference(k))
        per_seed = [a["cbqa"][0] - b["cbqa"][0] for a, b in zip(ours, lora, strict=True)]
        if not lines:
            lines = [
                "",
                "All seeds together, against LoRA: the difference of the two methods' means over the seeds both "
                "ran (interval: the items resampled, all the runs and their references together; it does not "
                "cover the seed-to-seed variance, which a few seeds cannot estimate: the per-seed differences are "
                "beside it).",
                "",
                "| method - LoRA, mean over seeds | seeds | downstream n | CBQA | retention | downstream | "
                "CBQA per seed |",
                "|---|---|---:|---|---|---|---|",
            ]
        lines.append(
            f"| {label(r)} | {', '.join(map(str, seeds))} | {size} | {diff(d)} | {ret} | {diff(down)} | "
            + " / ".join(f"{x:+.3f}" for x in per_seed)
            + " |"
        )
    return lines


def setting_figure(rows: list[dict], path) -> None:
    """Retention at 4,000 downstream samples per method, the ordinary mixture beside the narrow one (first seed),
    and the narrow mixture's later seeds where they ran (hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from run import METHODS

    at = {(r["method"], r["setting"], r["seed"]): r for r in rows if r["size"] == 4000 and "retention" in r}
    methods = [m for m in METHODS if (m, "_narrow", 42) in at]
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(8, 3.8))
    later = sorted({seed for (_, setting, seed) in at if setting == "_narrow" and seed != 42})
    series = [
        ("", 42, -0.25, "ordinary mixture", {}),
        ("_narrow", 42, 0.0, "narrow mixture (3,000 SST-2)", {}),
        *(("_narrow", seed, 0.25 * (i + 1) / len(later), f"narrow mixture, seed {seed}", {"mfc": "white"})
          for i, seed in enumerate(later)),
    ]  # fmt: skip
    for setting, seed, shift, name, style in series:
        pts = [
            (i, at[m, setting, seed]["retention"]) for i, m in enumerate(methods) if (m, setting, seed) in at
        ]
        if pts:
            color = "C1" if setting else "C0"
            ax.errorbar([i + shift for i, _ in pts], [p[0] for _, p in pts],
                        yerr=[[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]],
                        fmt="o", capsize=3, label=name, color=color, **style)  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xticks(range(len(methods)), [label({"method": m, "setting": ""}) for m in methods], fontsize=8)
    ax.set_ylabel("CBQA retention at 4,000")
    ax.set_title("retention vs the method's knowledge-only run, 95 % intervals", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
