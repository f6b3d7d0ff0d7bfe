"""The train entry point: build the model, the data and the Trainer a run config asks for, train, write the output.

The run config lives in ``run_config.py``, the Trainers in ``trainer.py`` (LoRAMoE) and ``baselines.py`` (LoRA,
full fine-tuning), crash-safe checkpoints in ``checkpoints.py``; loading a trained output for inference
(``load_trained``) is ``loramoe.models.trained``'s job.

Design decisions:
- A checkpoint counts only once a ``loramoe_complete.json`` marker with the checksum of every file in it has been
  written (atomically, last); a resume takes the newest checkpoint whose marker verifies and says which torn ones
  it skipped.
- A fresh run into a folder that holds another run's checkpoints is refused rather than mixed with them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from loramoe.errors import ConfigError
from loramoe.files import atomic_write_text
from loramoe.inject import inject, summary
from loramoe.training.baselines import BaselineTrainer, unfreeze, wrap_lora
from loramoe.training.checkpoints import (
    CompleteCheckpointCallback,
    latest_good_checkpoint,
    list_checkpoints,
    remove_torn_checkpoints,
)
from loramoe.training.run_config import RUN_CONFIG_NAME, RunConfig
from loramoe.training.trainer import GuardedTrainer, LoRAMoETrainer, check_parameters_finite

logger = logging.getLogger("loramoe.train")


def prepare_model(model: nn.Module, run: RunConfig) -> nn.Module:
    """Adapt (loramoe), wrap with PEFT (lora) or unfreeze (full) the base model."""
    if run.method == "loramoe":
        return inject(model, run.loramoe)
    if run.method == "full":
        return unfreeze(model)
    return wrap_lora(model, run.loramoe, run.lora)


def build_trainer(run: RunConfig) -> GuardedTrainer:
    """Load the base model, adapt it as ``run.method`` says, build the data, and return the ready Trainer.

    The base model is loaded on the CPU; the Trainer places it on the device (or devices) of the run.
    """
    from transformers import set_seed

    from loramoe.data.dataset import DataCollatorForLoRAMoE, build_dataset
    from loramoe.models.base import load_base

    args = run.training_arguments()
    out = Path(args.output_dir)
    # The adapter's initialisation draws from the global RNG: seed it (as the Trainer does later) so that a run,
    # and a resumed run, are reproducible in one process as well as in a fresh one.
    set_seed(args.seed)
    model, tokenizer = load_base(run.model, dtype=run.dtype, device="cpu")
    model = prepare_model(model, run)
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out / RUN_CONFIG_NAME, json.dumps(run.to_dict(), indent=2, sort_keys=True, default=str)
        )
    if run.method == "loramoe":
        logger.info("%s", summary(model))
    built = build_dataset(run.data, tokenizer, run.loramoe.task_names)
    trainer_class = LoRAMoETrainer if run.method == "loramoe" else BaselineTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=built.train,
        eval_dataset=built.val,
        data_collator=DataCollatorForLoRAMoE(tokenizer),
        processing_class=tokenizer,
        callbacks=[CompleteCheckpointCallback()],
    )
    trainer.data_stats = built.stats
    check_launch(trainer.accelerator.distributed_type)
    return trainer


def check_launch(kind: Any) -> None:
    """Refuse a launch that accelerate would silently run otherwise than it was asked to.

    Args:
        kind: the ``accelerate.DistributedType`` accelerate chose for this process.

    Raises:
        ConfigError: several processes left unconnected (each would train alone and overwrite the others'
            files), or an FSDP / DeepSpeed config that accelerate replaced by plain data parallelism. accelerate
            (1.16, ``state.py``) enables FSDP and DeepSpeed only on accelerators; on the CPU it runs DDP over gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and kind.value == "NO":
        raise ConfigError(
            f"{world} processes were launched but accelerate connected none of them (no GPU was found and "
            "training.use_cpu is not set): each would train alone and overwrite the others' output. Set "
            "training.use_cpu: true to train them together on the CPU (DDP over gloo)"
        )
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and kind.value != engine:
            raise ConfigError(
                f"the accelerate config asks for {engine}, but accelerate runs this job as {kind.value}: it enables "
                f"{engine} only on accelerators (CUDA, XPU, NPU, ...), never on the CPU. On the CPU launch with "
                "examples/accelerate/ddp.yaml; sharded training on the CPU is tested with torch's own FSDP2 "
                "(tests/scripts/fsdp_train.py)"
            )


def train(run: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train as ``run`` says and write the adapter (or model), the resolved config, trainer state and metrics.

    Args:
        run: the validated run configuration.
        resume: continue from the newest complete checkpoint in the output directory (fresh start if none).

    Returns:
        The training metrics (also written to ``train_results.json``).

    Raises:
        ConfigError: a fresh run (``resume=False``) into an output directory that holds checkpoints: the new run
            would mix its checkpoints with the old run's, and a later resume could continue the wrong one.
    """
    earlier = list_checkpoints(Path(run.training["output_dir"]))
    if not resume and earlier:
        raise ConfigError(
            f"training.output_dir {run.training['output_dir']!r} holds checkpoints of an earlier run "
            f"({earlier[0].name}, ...); resume it (--resume), or choose a new output_dir or delete them"
        )
    trainer = build_trainer(run)
    out = Path(trainer.args.output_dir)
    checkpoint = latest_good_checkpoint(out) if resume else None
    if resume:
        logger.info("resuming from %s", checkpoint or "the start (no complete checkpoint found)")
        if trainer.args.should_save:
            remove_torn_checkpoints(out, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    check_parameters_finite(trainer.model, trainer.state.global_step)
    trainer.save_model(str(out))
    metrics = dict(result.metrics)
    metrics["data"] = trainer.data_stats.to_dict()
    if trainer.is_world_process_zero():
        trainer.save_state()
        atomic_write_text(
            out / "train_results.json", json.dumps(metrics, indent=2, sort_keys=True, default=str)
        )
    return metrics
