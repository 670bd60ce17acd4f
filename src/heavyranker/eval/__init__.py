"""Evaluation: per-task metrics (AUROC, RCE, NRCE, ...) and the evaluator that computes them per split."""
