"""The pilot table of docs/results.md: each LoRA pilot's CBQA on the 1,000-item subset, its retention against its
reference (paired bootstrap over the subset's items), its downstream mean against LoRA's at 4,000, and whether it
meets the rule that chooses the pressure setting (``pilots.py``). Every pilot that finished is listed, misses
included."""

from __future__ import annotations

from pilots import DOWNSTREAM_BAR_RUN, PILOT_CBQA_N, PILOTS, RETENTION_BAR
from report import DRAWS, down_mean, downstream_bootstrap, fmt, pooled
from scoring import decode_values, paired_ratio

# A ratio to a reference that answers almost nothing has no interval worth printing (the bootstrap draws divide by
# zero); such a pilot is a miss whatever it scores, because there was no knowledge left to keep.
MIN_REFERENCE_CORRECT = 10


def subset_cbqa(rec: dict) -> list[float]:
    """The subset's CBQA items, pooled: a pilot's own values, or the prefix of a main run's full-suite values."""
    return [v for s, n in PILOT_CBQA_N.items() for v in decode_values(rec["scores"][s]["values"])[:n]]


def reference_of(results: dict[str, dict], name: str) -> dict | None:
    return results.get(f"pilot_{name}") or results.get(name)


def pilot_rows(results: dict[str, dict]) -> list[dict]:
    """One row per finished pilot, in ``PILOTS`` order."""
    bar = results.get(DOWNSTREAM_BAR_RUN)
    rows = []
    for p in PILOTS:
        rec = results.get(f"pilot_{p.name}")
        if rec is None:
            continue
        row = {"pilot": p, "rec": rec, "cbqa": pooled(subset_cbqa(rec)), "down": down_mean(rec)}
        ref = reference_of(results, p.reference) if p.reference else None
        if ref is not None:
            ref_values = subset_cbqa(ref)
            if sum(ref_values) < MIN_REFERENCE_CORRECT:
                row["undefined"] = (
                    f"undefined: the reference answers {sum(ref_values):.0f} of {len(ref_values)}"
                )
            else:
                r = paired_ratio(subset_cbqa(rec), ref_values, draws=DRAWS)
                row["retention"] = (r["ratio"], r["lo"], r["hi"])
        if bar is not None and p.size:
            row["down_vs_bar"] = downstream_bootstrap([rec, bar], lambda a, b: a - b)
            row["meets"] = bool(
                "retention" in row
                and row["retention"][2] < RETENTION_BAR
                and row["down"][0] >= down_mean(bar)[0]
            )
        rows.append(row)
    return rows


def pilot_table(results: dict[str, dict]) -> list[str]:
    rows = pilot_rows(results)
    if not rows:
        return ["No pilot has finished yet."]
    bar = results.get(DOWNSTREAM_BAR_RUN)
    lines = [
        f"Pilots (LoRA only; CBQA on the 1,000-item subset; retention against the reference, paired; the rule: "
        f"retention interval wholly below {RETENTION_BAR:.2f} and downstream mean at least "
        f"`{DOWNSTREAM_BAR_RUN}`'s"
        + (f", {down_mean(bar)[0]:.3f}" if bar else "")
        + "). The main runs on the same subset are the first rows.",
        "",
        "| pilot | lever | steps | CBQA (subset) | reference | retention | downstream mean | vs LoRA d4000 "
        "| meets |",
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for name in ("lora_d0", DOWNSTREAM_BAR_RUN):
        rec = results.get(name)
        if rec is not None:
            ret, ref = "-", "-"
            if name != "lora_d0" and "lora_d0" in results:  # the main run's own retention on the subset
                r = paired_ratio(subset_cbqa(rec), subset_cbqa(results["lora_d0"]), draws=DRAWS)
                ret, ref = fmt(r["ratio"], r["lo"], r["hi"], digits=2), "`lora_d0`"
            lines.append(
                f"| `{name}` (main run) | - | {rec['train']['steps']} | {fmt(*pooled(subset_cbqa(rec)))} | {ref} "
                f"| {ret} | {fmt(*down_mean(rec))} | - | - |"
            )
    for row in rows:
        p, rec = row["pilot"], row["rec"]
        ret = fmt(*row["retention"], digits=2) if "retention" in row else row.get("undefined", "-")
        vs = row.get("down_vs_bar")
        lines.append(
            f"| `{p.name}` | {p.lever} | {rec['train']['steps']} | {fmt(*row['cbqa'])} | "
            f"{('`' + p.reference + '`') if p.reference else '-'} | {ret} | {fmt(*row['down'])} | "
            f"{(f'{vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}]') if vs else '-'} | "
            f"{'yes' if row.get('meets') else 'no' if 'meets' in row else '-'} |"
        )
    return lines
