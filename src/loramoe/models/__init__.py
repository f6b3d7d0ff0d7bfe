"""Models: the bundled default and model-name aliases (``bundled``), loading a base model (``base``), loading a
trained output for inference (``trained``)."""
