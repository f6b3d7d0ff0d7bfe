"""Analysis of trained adapters: where each task's tokens are routed (``report``)."""
