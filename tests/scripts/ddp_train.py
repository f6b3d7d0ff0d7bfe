"""Run under torchrun / accelerate launch: train with loramoe.training.train.train, then dump this rank's adapter tensors.

Usage: ddp_train.py CONFIG.yaml OUT_PREFIX
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from loramoe.adapter import adapter_state_dict
from loramoe.cli.overrides import apply_overrides
from loramoe.files import load_yaml
from loramoe.training.run_config import RunConfig
from loramoe.training.train import build_trainer

torch.set_num_threads(1)
run = RunConfig.from_dict(apply_overrides(load_yaml(sys.argv[1]), []))
trainer = build_trainer(run)
trainer.train()
trainer.save_model(run.training["output_dir"])
rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
model = trainer.accelerator.unwrap_model(trainer.model)
save_file(adapter_state_dict(model), f"{sys.argv[2]}.rank{rank}.safetensors")
print(f"rank {rank}/{world} done, steps {trainer.state.global_step}", flush=True)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
