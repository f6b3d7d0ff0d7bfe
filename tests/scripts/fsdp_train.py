"""Train a tiny LoRAMoE model under FSDP2 (``fully_shard``) or in one process with the same data order.

Usage: ``torchrun --nproc_per_node 2 fsdp_train.py OUT_DIR`` (sharded, gloo on the CPU, NCCL on GPUs), or
``python fsdp_train.py OUT_DIR`` (one process, the reference). Each optimizer step sees the same global batch
of 4 samples: under FSDP rank r takes micro-batch r (FSDP averages the ranks' gradients); the single process
runs both micro-batches and averages their losses, which is the same computation. Writes ``OUT_DIR/losses.json``
(the step losses, mean over micro-batches), the adapter after step 2 (``OUT_DIR/step2``), and the final one
(``OUT_DIR/final``) with ``save_sharded_adapter`` called on every rank; then loads ``step2`` back into freshly sharded
parameters and writes what every rank holds to ``OUT_DIR/reloaded.rank{r}.json`` (max abs difference).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for tiny.py

from loramoe import LoRAMoEConfig, inject  # noqa: E402
from loramoe.loss import compute_loss  # noqa: E402
from loramoe.training.sharded import (  # noqa: E402
    gathered_adapter_state,
    load_sharded_adapter_weights,
    save_sharded_adapter,
)

from tiny import tiny_model  # noqa: E402

STEPS, MICRO, SEQ = 4, 2, 12
CFG = LoRAMoEConfig(
    num_experts=4, rank=2, alpha=8.0, dropout=0.0, lbc_weight=0.1, lbc_delta=0.1, lbc_positions="non_padding"
)  # no dropout: the two runs draw different random numbers


def build(device: torch.device, world: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial adapter on every rank and in the reference
    model = inject(tiny_model("llama"), CFG).to(device)
    with torch.no_grad():  # a trained-looking B, so the routers get gradient from the first step
        for name, p in model.named_parameters():
            if name.endswith("loramoe_B"):
                p.normal_(std=0.05)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one FSDP unit per decoder layer, as the accelerate config wraps
            fully_shard(layer)
        fully_shard(model)
    return model.train()


def batches(device: torch.device) -> list[list[dict[str, torch.Tensor]]]:
    """STEPS global batches, each a list of 2 micro-batches of MICRO samples (fixed seed: same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        micro = []
        for _ in range(2):
            ids = torch.randint(3, 300, (MICRO, SEQ), generator=gen)
            mask = torch.ones_like(ids)
            mask[0, -3:] = 0  # some padding, so the non-padding LBC has something to skip
            labels = ids.masked_fill(mask == 0, -100)
            types = torch.tensor([0, 1])
            micro.append({k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels,
                                                            task_types=types).items()})  # fmt: skip
        out.append(micro)
    return out


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build(device, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step, micro in enumerate(batches(device), start=1):
        mine = [micro[rank]] if world > 1 else micro
        total = sum(compute_loss(model, batch).total for batch in mine) / len(mine)
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = total.detach().clone()
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))
        if step == 2:
            save_sharded_adapter(model, out / "step2")  # every rank calls; rank 0 writes
    save_sharded_adapter(model, out / "final")
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    if world > 1:
        dist.barrier()  # step2 is on disk before any rank reads it
        fresh = build(device, world)
        load_sharded_adapter_weights(fresh, out / "step2")
        from safetensors.torch import load_file

        saved = load_file(str(out / "step2" / "adapter_model.safetensors"))
        held = gathered_adapter_state(fresh)  # gathers the shards every rank now holds
        diff = max(float((held[k] - saved[k]).abs().max()) for k in saved)
        (out / f"reloaded.rank{rank}.json").write_text(json.dumps({"max_abs_diff": diff}))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
