"""Can the router tell the two sample types apart? A linear probe on the routers' inputs (a diagnostic).

The LBC asks each router to send knowledge samples (closed-book QA) to one expert group and downstream samples to the
other, but a router is a linear map of one token's hidden state. This script takes a finished LoRAMoE run, feeds it
SFT samples of both types, and at a few adapted linears records (a) the router's input per token and (b) its
probabilities. It then fits a logistic-regression probe (the same capacity as one router row pair) that predicts the
sample's type from one token's router input, trained on half the samples and scored on the other half, and reports:

- per-token probe accuracy, split into the positions every sample shares (the chat template's system prompt, whose
  hidden states are identical in every sample under causal attention) and the rest;
- the group mass the trained router actually gives each type at those positions.

High probe accuracy with unseparated routing means the router *could* localize and the LBC did not make it within
the run; chance-level accuracy means the inputs do not carry the type. Usage (after ``run.py`` trained the run):

    .venv/bin/python experiments/forgetting/separability.py [--run loramoe_n1000] [--samples 96]

Writes ``runs/forgetting/<run>/separability.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import OUT, _write_json  # noqa: E402


def _probe(x_train, y_train, x_test, y_test, steps: int = 300) -> float:
    """Balanced test accuracy (chance 0.5) of an L2-regularised logistic regression (full-batch L-BFGS on standardised features)."""
    import torch

    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    yf = y_train.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, yf) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        hit = (((xte @ w + b) > 0).long() == y_test).float()
        return float((hit[y_test == 0].mean() + hit[y_test == 1].mean()) / 2)  # balanced accuracy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="loramoe_n1000", help="a finished LoRAMoE run under runs/forgetting")
    ap.add_argument(
        "--samples", type=int, default=96, help="samples per type (half train the probe, half test)"
    )
    ap.add_argument("--layers", default="0,15,29", help="decoder layers whose gate_proj router is probed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from loramoe.data.dataset import DataCollatorForLoRAMoE, build_dataset
    from loramoe.models.trained import load_trained
    from loramoe.routing import RouterRecorder
    from loramoe.training.run_config import RunConfig

    run_dir = OUT / args.run
    saved = OUT / f"{args.run}.yaml"  # the driver saves a run's config beside it (earlier drivers: inside)
    saved = saved if saved.exists() else run_dir / "config.yaml"
    cfg = yaml.safe_load(saved.read_text(encoding="utf-8"))
    run = RunConfig.from_dict(cfg)
    model, tok = load_trained(run_dir)
    data = build_dataset(run.data, tok, run.loramoe.task_names).train
    by_type: dict[int, list[int]] = {0: [], 1: []}
    for i in range(len(data)):
        by_type[int(data[i]["task_types"])].append(i)
    rng = random.Random(0)
    picked = {t: rng.sample(ix, args.samples) for t, ix in by_type.items()}
    half = args.samples // 2
    split = {
        "train": [i for t in picked for i in picked[t][:half]],
        "test": [i for t in picked for i in picked[t][half:]],
    }

    # positions every sample shares: the chat template's head (system prompt, user turn opener), where a sample
    # starts with it (left-truncated samples do not)
    marker = "\u2063"
    head_text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False).split(marker)[
        0
    ]
    head = tok(head_text, add_special_tokens=False)["input_ids"]

    def shared_len(ids: list[int]) -> int:
        n = 0
        while n < min(len(ids), len(head)) and ids[n] == head[n]:
            n += 1
        return n

    seqs = [data[i]["input_ids"] for t in picked for i in picked[t]]
    shared_frac = sum(shared_len(q) for q in seqs) / sum(len(q) for q in seqs)

    layer_ids = [int(x) for x in args.layers.split(",")]
    names = [
        n
        for n, _ in model.named_modules()
        if n.endswith("mlp.gate_proj") and int(n.split(".")[-3]) in layer_ids
    ]
    modules = dict(model.named_modules())
    collate = DataCollatorForLoRAMoE(tok)
    feats: dict[str, dict[str, list]] = {s: {n: [] for n in names} for s in split}
    probs: dict[str, dict[str, list]] = {s: {n: [] for n in names} for s in split}
    meta: dict[str, list] = {s: [] for s in split}  # (type, shared-position mask) per token
    model.eval()
    for s, idx in split.items():
        for k in range(0, len(idx), 8):
            batch = collate([data[i] for i in idx[k : k + 8]])
            grabbed: dict[str, torch.Tensor] = {}
            hooks = [
                modules[n].register_forward_pre_hook(
                    lambda m, a, n=n, g=grabbed: g.__setitem__(n, a[0].detach())
                )
                for n in names
            ]
            with torch.no_grad(), RouterRecorder(model, detach=True) as rec:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for h in hooks:
                h.remove()
            mask = batch["attention_mask"].bool()
            pos = torch.arange(mask.shape[1]).expand_as(mask)
            cut = torch.tensor([shared_len(data[i]["input_ids"]) for i in idx[k : k + 8]])[:, None]
            types = batch["task_types"][:, None].expand_as(mask)
            meta[s].append(torch.stack([types[mask], (pos < cut)[mask].long()], 1))
            for n in names:
                feats[s][n].append(grabbed[n][mask])
                probs[s][n].append(rec.probs[n][0][mask])
    out: dict = {"run": args.run, "samples_per_type": args.samples, "template_head_tokens": len(head),
                 "shared_token_fraction": round(shared_frac, 3), "layers": {}}  # fmt: skip
    knowledge = run.loramoe.task_names.index("knowledge")
    k_group = [e for e, g in enumerate(run.loramoe.group_of_expert()) if g == knowledge]
    m_tr, m_te = torch.cat(meta["train"]), torch.cat(meta["test"])
    for n in names:
        x_tr, x_te = torch.cat(feats["train"][n]).float(), torch.cat(feats["test"][n]).float()
        p_te = torch.cat(probs["test"][n]).float()
        uniq = m_te[:, 1] == 0
        res = {
            "probe_acc_all_tokens": round(_probe(x_tr, m_tr[:, 0], x_te, m_te[:, 0]), 3),
            "probe_acc_unshared_tokens": round(
                _probe(x_tr[m_tr[:, 1] == 0], m_tr[m_tr[:, 1] == 0, 0], x_te[uniq], m_te[uniq, 0]), 3
            ),
        }
        kmass = p_te[:, k_group].sum(1)
        for t, tname in enumerate(run.loramoe.task_names):
            sel = m_te[:, 0] == t
            res[f"router_mass_on_knowledge_group/{tname}"] = round(float(kmass[sel].mean()), 4)
            res[f"router_mass_on_knowledge_group/{tname}/unshared"] = round(
                float(kmass[sel & uniq].mean()), 4
            )
        out["layers"][n] = res
        print(n, res, flush=True)
    _write_json(run_dir / "separability.json", out)
    print("template head", len(head), "tokens,", out["shared_token_fraction"], "of all tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
