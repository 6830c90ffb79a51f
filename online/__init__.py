"""Online learning: outcomes to incremental updates, drift detection, guardrails, model registry."""
