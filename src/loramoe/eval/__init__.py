"""Evaluation: the lm-eval tasks (``tasks``), their metrics (``metrics``), the lm-eval model (``lm_eval_model``),
running them (``evaluate``) and writing and comparing results (``report``)."""
