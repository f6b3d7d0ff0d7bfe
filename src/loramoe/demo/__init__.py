"""The demo application (``loramoe demo``): plain LoRA against LoRAMoE on the bundled model, built on the library
the way a user would build on it."""
