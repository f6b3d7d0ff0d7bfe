"""Performance measurements of loramoe; ``python benchmarks/run.py`` runs them all."""
