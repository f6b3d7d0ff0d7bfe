"""Training: the run config (``run_config``), the Trainer and the train entry point (``train``), crash-safe
checkpoints (``checkpoints``), adapters of sharded parameters under FSDP2 / DeepSpeed ZeRO-3 (``sharded``)."""
