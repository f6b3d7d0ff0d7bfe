"""Performance measurements of loramoe (issue 6); ``python benchmarks/run.py`` runs them all."""
