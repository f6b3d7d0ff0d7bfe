"""The speed and memory targets checked against the measurements, and the Markdown report (docs/benchmarks.md)."""

from __future__ import annotations

from benchmarks.report_text import FINDINGS, METHOD, PER_EXPERT_WHY, SCALING_OUT

PEFT, PEFT0 = "peft p=0.05", "peft p=0"
FUSED = ("fused per_expert", "fused shared", "fused p=0")


def _target(name: str, value: float, op: str, threshold: float) -> dict:
    met = value <= threshold if op == "<=" else value >= threshold
    return {"target": name, "value": value, "op": op, "threshold": threshold, "met": met}


def targets(r: dict) -> list[dict]:
    """Every speed and memory target for N=6, R=4 on gate/up/down, as measured in ``r``."""
    out = []
    main = r["settings"]["layers"]
    for sec in r["train"]:
        if sec["layers"] != main:
            continue  # the loop's shallower comparison
        rows, shape = sec["variants"], f"{sec['batch']}x{sec['seq']}"
        for name in FUSED:
            if name not in rows:
                continue
            ref = PEFT0 if name.endswith("p=0") else PEFT
            if f"vs {ref}" in rows[name]:
                out.append(
                    _target(f"train step {shape}: {name} / {ref}", rows[name][f"vs {ref}"], "<=", 1.00)
                )
            out.append(_target(f"train step {shape}: {name} / floor", rows[name]["vs_floor"], "<=", 1.15))
    for sec in r["layer"]:
        shape = "{}->{}".format(*sec["shape"])
        for label, ratio in sec["ratios"].items():
            out.append(_target(f"adapter's own cost {shape}: {label}", ratio, ">=", 3.0))
    for sec in r["generation"]:
        rows = sec["variants"]
        if "fused per_expert" in rows:
            value = rows["fused per_expert"]["throughput_vs_peft"]
            out.append(_target(f"generation batch {sec['batch']}: fused / {PEFT} tokens/s", value, ">=", 0.9))
    for sec in r["memory"]:
        if sec["layers"] != main:
            continue
        rows, shape = sec["variants"], f"{sec['batch']}x{sec['seq']}"
        for name in FUSED:
            if name in rows and PEFT in rows:
                for key, what in (("step_peak_delta_mib", "step peak delta"), ("peak_mib", "peak RSS")):
                    value = rows[name][key] / rows[PEFT][key]
                    out.append(_target(f"memory {shape}: {name} / {PEFT} ({what})", value, "<=", 1.10))
    return out


def summary(r: dict) -> list[str]:
    """The findings in words, every number from ``r``."""
    out = ["## Summary", ""]
    sec = r["train"][0]
    rows, layers = sec["variants"], r["settings"]["layers"]

    def v(name: str, key: str) -> str:
        return _f(rows[name].get(key)) if name in rows else "-"

    out.append(
        f"- Training step, batch {sec['batch']} x {sec['seq']}, {layers} layers: fused with per-expert dropout "
        f"(the reference's default) {v('fused per_expert', 'vs ' + PEFT)}x PEFT LoRA r = 24 and "
        f"{v('fused per_expert', 'vs_floor')}x the frozen floor; with one shared mask (like PEFT's) "
        f"{v('fused shared', 'vs ' + PEFT)}x and {v('fused shared', 'vs_floor')}x; without dropout "
        f"{v('fused p=0', 'vs ' + PEFT0)}x PEFT without dropout. PEFT itself: {v(PEFT, 'vs_floor')}x the floor."
    )
    for loop in r["train"]:
        lv = loop["variants"]
        if "loop per_expert" in lv:
            out.append(
                f"- The per-expert loop ({loop['layers']} layers, {loop['batch']} x {loop['seq']}): "
                f"{_f(lv['loop per_expert']['vs ' + PEFT])}x PEFT with per-expert masks, "
                f"{_f(lv['loop shared']['vs ' + PEFT]) if 'loop shared' in lv else '-'}x with a shared mask; "
                f"fused at the same depth: {_f(lv['fused per_expert']['vs ' + PEFT])}x and "
                f"{_f(lv['fused shared']['vs ' + PEFT])}x."
            )
    for lay in r["layer"]:
        c = lay["variants"]
        peft0, peft = (k for k in c if k.startswith("peft"))

        def extra(a: str, b: str, c=c) -> str:
            return _f(c[a]["adapter_ms"] - c[b]["adapter_ms"], 1)

        out.append(
            f"- What dropout adds per linear ({lay['shape'][0]} -> {lay['shape'][1]}, fwd + bwd): per-expert masks "
            f"{extra('fused per_expert', 'fused p=0')} ms, one shared mask {extra('fused shared', 'fused p=0')} ms, "
            f"PEFT's one mask {extra(peft, peft0)} ms (the previous fused forward: per-expert "
            f"{extra('previous per_expert', 'previous p=0')} ms). The adapter's own cost, loop / fused: "
            + ", ".join(f"{k.split()[-1]} {_f(x, 1)}x" for k, x in lay["ratios"].items())
            + "."
        )
    for gen in r["generation"]:
        g = gen["variants"]
        if "fused per_expert" in g:
            out.append(
                f"- Generation, batch {gen['batch']}: fused {g['fused per_expert']['tokens_per_s']:.1f} tokens/s, "
                f"{_f(g['fused per_expert']['throughput_vs_peft'])}x PEFT's throughput (unmerged)."
            )
    for mem in r["memory"]:
        g = mem["variants"]
        if PEFT in g:
            ratios = ", ".join(
                f"{n} {_f(x['step_peak_delta_mib'] / g[PEFT]['step_peak_delta_mib'])}x"
                for n, x in g.items()
                if n != PEFT
            )
            out.append(
                f"- Peak memory of a step ({mem['layers']} layers, {mem['batch']} x {mem['seq']}), step delta over "
                f"PEFT's: {ratios}."
            )
    for tk in r["top_k"]:
        k, t, inf = tk["k"], tk["train"], tk["inference"]
        fl = tk["flops_per_token"]

        def rel(d, name, k=k):
            return _f(d[f"top-{k} {name}"]["adapter_ms"] / d["dense"]["adapter_ms"], 2)

        out.append(
            f"- Top-{k} of {tk['experts']} experts at R = {tk['rank']}: {fl['dense'] / fl[f'top-{k}']:.1f}x fewer "
            f"adapter FLOPs; the library computes only the chosen experts, and its adapter costs {rel(t, '(library)')}x "
            f"dense in training and {rel(inf, '(library)')}x in inference (every expert computed with the others "
            f"zeroed: {rel(t, 'dense-masked')}x / {rel(inf, 'dense-masked')}x; a per-expert gather loop: "
            f"{rel(t, 'gather loop')}x / {rel(inf, 'gather loop')}x)."
        )
    missed = [x["target"] for x in r["targets"] if not x["met"]]
    out += ["", "Targets missed: " + ("; ".join(missed) if missed else "none") + ".", ""]
    if any("per_expert" in m for m in missed):
        like = ", ".join(
            f"{_f(sec['variants']['fused shared']['vs ' + PEFT])}x ({sec['batch']} x {sec['seq']})"
            for sec in r["train"]
            if sec["layers"] == layers and "fused shared" in sec["variants"]
        )
        out += [PER_EXPERT_WHY.format(shared=like, peft_floor=v(PEFT, "vs_floor")), ""]
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def render(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{r['command']}` ({r['elapsed_s'] / 60:.0f} min); raw numbers in `benchmarks.json` next to "
        "this file. Do not edit by hand: the text is in `benchmarks/report.py`.",
        "",
        *[
            f"Section `{name}` re-measured on {m['date']} by `{m['command']}` ({m['elapsed_s'] / 60:.0f} min, "
            f"load average before / after {', '.join(f'{v:.1f}' for v in m['load_average'][0])} / "
            f"{', '.join(f'{v:.1f}' for v in m['load_average'][1])}); the other sections are from the full run."
            for name, m in r.get("remeasured", {}).items()
        ],
        "",
        *summary(r),
        "## Machine",
        "",
        *_table(
            ["CPU", "cores", "torch", "threads used", "MKL", "load average (1, 5, 15 min) before / after"],
            [
                [
                    m["cpu_model"],
                    str(m["cores"]),
                    m["torch"],
                    str(m["torch_threads"]),
                    str(m["mkl"]),
                    " / ".join(
                        ", ".join(f"{x:.1f}" for x in la)
                        for la in (m["load_average"], m["load_average_after"])
                    ),
                ]
            ],
        ),
        "",
        METHOD.format(layers=s["layers"], repeats=s["repeats"]),
        "",
        "## Targets (N = 6 experts, R = 4, gate/up/down)",
        "",
        *_table(
            ["target", "measured", "wanted", "met"],
            [
                [
                    t["target"],
                    _f(t["value"]),
                    f"{t['op']} {t['threshold']:.2f}",
                    "yes" if t["met"] else "**no**",
                ]
                for t in r["targets"]
            ],
        ),
        "",
    ]
    lines += ["## Training step: SmolLM2-135M architecture, float32", ""]
    for sec in r["train"]:
        lines += [
            f"{sec['layers']} layers, batch {sec['batch']} x {sec['seq']} tokens. Ratios are paired per round "
            "(median of round ratios).",
            "",
        ]
        rows = []
        for name, v in sec["variants"].items():
            rows.append(
                [
                    name,
                    _f(v["cpu_s"]),
                    f"{v['tokens_per_s']:.0f}",
                    _f(v["vs_floor"]),
                    _f(v.get(f"vs {PEFT}")),
                    _f(v.get(f"vs {PEFT0}")),
                    _f(v["wall_s"]),
                ]
            )
        lines += _table(
            ["variant", "CPU s/step", "tokens/s", "/ floor", f"/ {PEFT}", f"/ {PEFT0}", "wall s"], rows
        )
        lines.append("")
    lines += ["## Generation (greedy, KV cache, unmerged adapters)", ""]
    for sec in r["generation"]:
        lines += [f"Batch {sec['batch']}, prompt {sec['prompt']}, {sec['new_tokens']} new tokens.", ""]
        rows = [
            [n, f"{v['tokens_per_s']:.1f}", _f(v["throughput_vs_peft"]), _f(v["cpu_s"])]
            for n, v in sec["variants"].items()
        ]
        lines += _table(["variant", "tokens/s (CPU time)", f"throughput / {PEFT}", "CPU s"], rows) + [""]
    lines += ["## Peak memory of a training step (fresh process per variant)", ""]
    for sec in r["memory"]:
        rows, ref = sec["variants"], sec["variants"].get(PEFT)
        lines += [f"{sec['layers']} layers, batch {sec['batch']} x {sec['seq']}.", ""]
        lines += _table(
            [
                "variant",
                "peak RSS MiB",
                "RSS before step MiB",
                "step peak delta MiB",
                f"delta / {PEFT}",
                f"peak / {PEFT}",
            ],
            [
                [
                    n,
                    f"{v['peak_mib']:.0f}",
                    f"{v['rss_before_mib']:.0f}",
                    f"{v['step_peak_delta_mib']:.0f}",
                    _f(v["step_peak_delta_mib"] / ref["step_peak_delta_mib"]) if ref else "-",
                    _f(v["peak_mib"] / ref["peak_mib"]) if ref else "-",
                ]
                for n, v in rows.items()
            ],
        ) + [""]
    lines += ["## The adapter's own cost per linear (fwd + bwd, minus the bare frozen linear)", ""]
    for sec in r["layer"]:
        lines += [
            f"{sec['shape'][0]} -> {sec['shape'][1]}, {sec['tokens'][0]} x {sec['tokens'][1]} tokens, "
            f"N = {sec['experts']}, R = {sec['rank']}.",
            "",
        ]
        rows = [[n, _f(v["step_ms"], 1), _f(v.get("adapter_ms", 0.0), 1)] for n, v in sec["variants"].items()]
        lines += _table(["variant", "fwd+bwd ms", "adapter ms"], rows) + [""]
        lines += [
            "Loop / fused adapter cost: "
            + ", ".join(f"{k.split()[-1]} {_f(v, 1)}x" for k, v in sec["ratios"].items())
            + ". Earlier fused forward / now: "
            + ", ".join(f"{k.split()[-1]} {_f(v, 1)}x" for k, v in sec.get("before_after", {}).items())
            + ".",
            "",
        ]
    sw = r["sweep"]
    lines += [
        f"## Scaling sweep: adapter ms per linear ({sw['shape'][0]} -> {sw['shape'][1]}, "
        f"{sw['tokens'][0]} x {sw['tokens'][1]} tokens, fwd + bwd)",
        "",
    ]
    cols = ["fused p=0", "loop p=0", "fused per_expert", "loop per_expert", "fused shared", "peft"]
    rows = []
    for row in sw["rows"]:
        v = row["variants"]
        rows.append(
            [str(row["experts"]), str(row["rank"])]
            + [_f(v[c]["adapter_ms"], 1) for c in cols]
            + [
                _f(v["loop p=0"]["adapter_ms"] / v["fused p=0"]["adapter_ms"], 1),
                _f(v["loop per_expert"]["adapter_ms"] / v["fused per_expert"]["adapter_ms"], 1),
            ]
        )
    lines += _table(
        ["N", "R", *cols[:-1], f"PEFT r=N*R p={sw['dropout']}", "loop/fused p=0", "loop/fused per_expert"],
        rows,
    )
    for tk in r["top_k"]:
        k = tk["k"]
        fl = tk["flops_per_token"]
        lines += [
            "",
            f"## Top-{k} routing against dense (N = {tk['experts']}, R = {tk['rank']}, "
            f"{tk['shape'][0]} -> {tk['shape'][1]}, {tk['tokens'][0]} x {tk['tokens'][1]} tokens)",
            "",
            f"Adapter forward FLOPs per token: dense {fl['dense']:,}, top-{k} {fl[f'top-{k}']:,} "
            f"({fl['dense'] / fl[f'top-{k}']:.1f}x fewer); the frozen base linear: {fl['base']:,}.",
            "",
        ]
        rows = [
            [
                n,
                _f(tv["step_ms"], 1),
                _f(tv.get("adapter_ms", 0.0), 1),
                _f(tk["inference"][n]["step_ms"], 1),
                _f(tk["inference"][n].get("adapter_ms", 0.0), 1),
            ]
            for n, tv in tk["train"].items()
        ]
        lines += _table(["variant", "train fwd+bwd ms", "adapter ms", "inference fwd ms", "adapter ms"], rows)
    lines += [""]
    lines += revisions(r)
    lines += [FINDINGS, "", SCALING_OUT, ""]
    return "\n".join(lines)


def revisions(r: dict) -> list[str]:
    """The layer of an earlier revision beside the current one (``benchmarks/revisions.py --into``)."""
    rv = r.get("revisions")
    if not rv:
        return []
    load = " / ".join(", ".join(f"{v:.1f}" for v in la) for la in rv["load_average"])
    lines = [
        f"## Before / after: the layer of `{rv['before']}` beside this checkout's",
        "",
        f"Measured on {rv['date']} by `{rv['command']}` ({rv['elapsed_s']} s; load average before / after {load}): "
        "one frozen float32 linear, 4 x 256 tokens, N = 6 (16 for top-2), R = 4, CPU time of one thread, each "
        "ratio the median of per-round ratios. The earlier layer cached its stacked weights for generation "
        "(keyed on torch's private version counter); this one builds them once per `cached_stacking` block, "
        "which `loramoe.generate` opens.",
        "",
    ]
    train = {k: v for k, v in rv["results"].items() if k.startswith("train")}
    rows = [
        [k.removeprefix("train "), _f(v["adapter_ms_before"], 1), _f(v["adapter_ms_after"], 1),
         _f(v["step_after/before"])]
        for k, v in train.items()
    ]  # fmt: skip
    lines += _table(["train fwd+bwd", "adapter ms before", "adapter ms after", "step after / before"], rows)
    gen = {k: v for k, v in rv["results"].items() if k.startswith("generate")}
    rows = [
        [k.removeprefix("generate "), _f(v["ms_before"], 1), _f(v["ms_after"], 1),
         _f(v["ms_after_cached_stacking"], 1), _f(v["after/before"]), _f(v["after cached_stacking/before"])]
        for k, v in gen.items()
    ]  # fmt: skip
    lines += [""]
    lines += _table(
        ["no-grad forward (base + adapter)", "ms before", "ms after", "ms after, cached", "after / before",
         "cached / before"],
        rows,
    )  # fmt: skip
    return lines + ["", rv["note"], ""] if rv.get("note") else lines + [""]
