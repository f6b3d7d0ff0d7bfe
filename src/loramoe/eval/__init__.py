"""Evaluation: the lm-eval tasks (``tasks``), their metrics (``metrics``), the lm-eval model (``lm_eval_model``),
running them (``evaluate.evaluate_benchmarks``) and writing and comparing results (``report``)."""
