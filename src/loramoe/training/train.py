"""The train entry point: build the model, the data and the Trainer a run config asks for, train, write the output.

The run config lives in ``run_config.py``, the Trainers in ``trainer.py`` (LoRAMoE) and ``baselines.py`` (LoRA,
full fine-tuning), crash-safe checkpoints in ``checkpoints.py``; loading a trained output for inference
(``load_trained``) is ``loramoe.models.trained``'s job.

Design decisions:
- A checkpoint counts only once a ``loramoe_complete.json`` marker with the checksum of every file in it has been
  written (atomically, last); a resume takes the newest checkpoint whose marker verifies and says which torn ones
  it skipped.
- A fresh run into a folder that holds another run's checkpoints is refused rather than mixed with them.
- Training writes only into a new or empty directory or one of its own runs, claimed (and probed) before the model
  loads; loramoe deletes only checkpoints it can prove are this run's (``checkpoints.py``).
- One run per output directory at a time: the process that writes locks the directory (``loramoe.dirlock``) before
  it claims it and holds the lock through the final save; the other processes of a distributed run take no lock,
  and every process stops with the same error when the claim fails on any, so none waits for one that stopped.
- What would fail only once training starts is checked before the first step: the Trainer's settings
  (``run_config.py``), the output directory, ``data.max_length`` against the model's context, and on ``--resume``
  every field that changed since the run started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

from torch import nn

from loramoe.data.sources import CHECK_ONLY_FIELDS
from loramoe.dirlock import DirectoryLock
from loramoe.errors import ConfigError, FileSystemError, LoRAMoEError, TrainingError, is_write_fault
from loramoe.files import atomic_write_text, tagged_temp_files
from loramoe.inject import inject, summary
from loramoe.models.base import context_length
from loramoe.models.quantization import prepare_for_training
from loramoe.training.baselines import BaselineTrainer, unfreeze, wrap_lora
from loramoe.training.checkpoints import (
    check_output_dir,
    claim_output_dir,
    latest_good_checkpoint,
    list_checkpoints,
    refuse_foreign,
    remove_torn_checkpoints,
    run_id_of,
    sweep_leftovers,
)
from loramoe.training.run_config import RUN_CONFIG_NAME, RunConfig
from loramoe.training.trainer import GuardedTrainer, LoRAMoETrainer, check_parameters_finite

logger = logging.getLogger("loramoe.train")


def prepare_model(model: nn.Module, run: RunConfig) -> nn.Module:
    """Adapt (loramoe), wrap with PEFT (lora) or unfreeze (full) the base model; a quantized base first gets its
    unquantized half-precision parameters in float32 (``models.quantization.prepare_for_training``)."""
    model = prepare_for_training(model)
    if run.method == "loramoe":
        return inject(model, run.loramoe)
    if run.method == "full":
        return unfreeze(model)
    return wrap_lora(model, run.loramoe, run.lora)


def build_trainer(run: RunConfig, *, run_id: str | None = None) -> GuardedTrainer:
    """Load the base model, adapt it as ``run.method`` says, build the data, and return the ready Trainer.

    The base model is loaded on the CPU and the Trainer places it on the device (or devices) of the run; a quantized
    base is loaded straight onto this process's device (``args.device``): its linears are quantized as they load.

    Args:
        run: the validated run configuration.
        run_id: the output directory's run id (``claim_output_dir``); default: claim it here.
    """
    from transformers import set_seed

    from loramoe.data.dataset import DataCollatorForLoRAMoE, build_dataset
    from loramoe.models.base import load_base

    args = run.training_arguments()
    out = Path(args.output_dir)
    if run_id is None and args.should_save:
        check_output_dir(out)  # before the lock file: nothing is created in another project's directory
        # Held until this process ends: whoever built the Trainer may still save into the directory.
        DirectoryLock(out, what="training.output_dir").acquire()
        run_id = claim_output_dir(out)
    save_total_limit, args.save_total_limit = args.save_total_limit, None  # rotation is ours, after verifying
    # The adapter's initialisation draws from the global RNG: seed it (as the Trainer does later) so that a run,
    # and a resumed run, are reproducible in one process as well as in a fresh one.
    set_seed(args.seed)
    model, tokenizer = load_base(
        run.model,
        dtype=run.dtype,
        device=args.device if run.quantization else "cpu",
        allow_pickle=run.allow_pickle,
        quantization=run.quantization,
    )
    context = context_length(model)
    model = prepare_model(model, run)
    if args.should_save:
        atomic_write_text(
            out / RUN_CONFIG_NAME, json.dumps(run.to_dict(), indent=2, sort_keys=True, default=str)
        )
    if run.method == "loramoe":
        logger.info("%s", summary(model))
    built = build_dataset(run.data, tokenizer, run.loramoe.task_names)
    if context is not None and run.data.max_length > context:  # checked after the data: its errors come first
        raise ConfigError(
            f"data.max_length {run.data.max_length} is longer than the model's context ({context} positions); "
            f"set data.max_length to {context} or less"
        )
    trainer_class = LoRAMoETrainer if run.method == "loramoe" else BaselineTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=built.train,
        eval_dataset=built.val,
        data_collator=DataCollatorForLoRAMoE(tokenizer),
        processing_class=tokenizer,
        run_id=run_id,
        save_total_limit=save_total_limit,
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
        ConfigError: the output directory is not loramoe's, holds a checkpoint folder this run cannot prove is its
            own, or (a fresh run, ``resume=False``) holds this run's checkpoints: the new run would mix its
            checkpoints with the old run's, and a later resume could continue the wrong one.
        TrainingError: a NaN or infinite loss or gradient norm; the message names the step and the last good
            checkpoint.
        FileSystemError: a file could not be read or written (a full disk, a file-size limit, permissions); the
            message names the path and what to do, and the run continues with ``resume=True`` once it is done.
    """
    args = run.training_arguments()
    out = Path(args.output_dir)
    with contextlib.ExitStack() as held:
        run_id = _claim(out, args.should_save, held)
        earlier = list_checkpoints(out)
        if not resume and earlier:
            raise ConfigError(
                f"training.output_dir {str(out)!r} holds checkpoints of an earlier run ({earlier[0].name}, ...); "
                "continue it with --resume (resume=True), or choose a new output_dir"
            )
        if resume:
            check_resume_config(out, run)
        try:
            if run_id is None:
                return _train(run, out, None, resume)
            # What a killed process of this run left, its temporary files included; this process names its own
            # after the run id, so that the next one can prove they are its own.
            sweep_leftovers(out, run_id)
            with tagged_temp_files(run_id):
                return _train(run, out, run_id, resume)
        except FileSystemError as err:
            # Whatever was being written is complete (atomic writes, marked checkpoints) or never used: the run
            # goes on from its last checkpoint once the fault is repaired.
            raise FileSystemError(f"{err}, then run again with --resume") from err
        except Exception as err:
            if isinstance(err, LoRAMoEError) or not is_write_fault(err):
                raise
            where = getattr(err, "filename", None) or out
            fault = FileSystemError.from_fault(err, where, doing="training")
            raise FileSystemError(f"{fault}, then run again with --resume") from err


def _train(run: RunConfig, out: Path, run_id: str | None, resume: bool) -> dict[str, Any]:
    trainer = build_trainer(run, run_id=run_id)
    checkpoint = latest_good_checkpoint(out, run_id=run_id) if resume else None
    if resume:
        logger.info("resuming from %s", checkpoint or "the start (no complete checkpoint found)")
        if trainer.args.should_save:
            remove_torn_checkpoints(out, checkpoint, run_id)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        refused = _file_torch_load_read(err)
        unreadable = not isinstance(err, RuntimeError) or "PytorchStreamReader" in str(
            err
        )  # a damaged archive
        if checkpoint is None or refused is None or not unreadable or isinstance(err, LoRAMoEError):
            raise
        raise _refused_state(refused, checkpoint, err) from None
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


def _file_torch_load_read(err: BaseException) -> str | None:
    """The file ``torch.load`` was reading when ``err`` was raised (its argument ``f``), if it raised there."""
    found, tb = None, err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            f = frame.f_locals.get("f")
            found = str(f) if isinstance(f, (str, os.PathLike)) else found
        tb = tb.tb_next
    return found


def _refused_state(path: str, checkpoint: str, err: BaseException) -> TrainingError:
    """The one-line error for a checkpoint's optimizer, scheduler or RNG state that ``torch.load`` refused.

    The Trainer reads those files with ``weights_only=True``, which rebuilds tensors and plain values and refuses
    anything else before it is built, so no code in the file ran; only the message is loramoe's."""
    if isinstance(err, (EOFError, RuntimeError)):
        what = f"it is truncated or damaged ({(str(err).splitlines() or [type(err).__name__])[0][:120]})"
    else:
        name = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it asks to build {name.group(1)}" if name else "it holds something other than tensors"
    return TrainingError(
        f"{path}: refused on resume, {what}; it was read with torch.load(weights_only=True), so nothing in it ran. "
        f"{checkpoint} was changed after loramoe wrote it: move that folder out of training.output_dir to resume "
        "from the checkpoint before it, or start a new output_dir"
    )


def _claim(out: Path, writes: bool, held: contextlib.ExitStack) -> str | None:
    """Check the output directory, lock it (on the process that writes, into ``held``) and claim it, before
    anything is loaded or written; returns the run id (None on the processes that do not write).

    Every process of a distributed run ends this with the same outcome: an error on one (the directory is locked by
    another run, or not loramoe's) is raised on all, so none goes on to wait for the one that stopped.
    """
    error: LoRAMoEError | None = None
    run_id = None
    try:
        check_output_dir(out)  # before the lock file: nothing is created in another project's directory
        if writes:
            held.enter_context(DirectoryLock(out, what="training.output_dir"))
            run_id = claim_output_dir(out)
        refuse_foreign(out, run_id or run_id_of(out))
    except OSError as err:  # another process removed or changed it meanwhile
        error = ConfigError(
            f"training.output_dir {str(out)!r}: {err.strerror or err}; is another run using it?"
        )
        error.__cause__ = err
    except LoRAMoEError as err:
        error = err
    error = _first_error_of_all_processes(error)
    if error is not None:
        raise error
    return run_id


def _first_error_of_all_processes(error: LoRAMoEError | None) -> LoRAMoEError | None:
    """``error``, or in a distributed run with none here, the first error another process had (same type and
    message). A collective: every process calls it at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else (type(error), str(error)))
    if error is not None:
        return error
    first = next((o for o in outcomes if o is not None), None)
    return None if first is None else first[0](first[1])


def check_resume_config(output_dir: Path, run: RunConfig) -> None:
    """On resume, compare the run config with the one the run started with (``loramoe_run.json``).

    A changed ``training`` setting (more steps, another logging interval), or a data check that changes no sample
    (``data.sources.CHECK_ONLY_FIELDS``), is allowed and each change is logged;
    any other change (method, model, dtype, adapter, data) would continue a different run from this one's
    checkpoints and is refused, naming every changed field.
    """
    from loramoe.files import read_json

    path = output_dir / RUN_CONFIG_NAME
    if not path.is_file():
        return
    before = _flatten(read_json(path, error=ConfigError, what="run config"))
    now = _flatten(json.loads(json.dumps(run.to_dict(), default=str)))
    changed = [(k, before[k], now[k]) for k in sorted(before.keys() & now.keys()) if before[k] != now[k]]
    changed += [
        (k, before[k], "(absent)") for k in sorted(before.keys() - now.keys()) if before[k] is not None
    ]
    changed += [(k, "(absent)", now[k]) for k in sorted(now.keys() - before.keys()) if k.startswith("data.")]
    checks = {f"data.{name}" for name in CHECK_ONLY_FIELDS}  # they change no sample
    refused = [c for c in changed if not c[0].startswith("training.") and c[0] not in checks]
    if refused:
        shown = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, a, b in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise ConfigError(
            f"--resume with a changed config: {shown}{more}. A resumed run continues the checkpoints of the run in "
            f"{output_dir}, so its method, model, adapter and data must stay as they were ({path}); resume with "
            "that config, or start a new output_dir"
        )
    for key, was, now_value in changed:
        logger.warning("resuming with %s changed: was %r, now %r", key, was, now_value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}
