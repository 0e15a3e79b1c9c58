"""Evaluation: arithmetic reasoning (answer extraction), multiple choice (two scorings), calibration
metrics, the named tasks and the lm-evaluation-harness plug-in (``harness``).

Kept import-free: ``lm_eval_hook`` runs at every interpreter start and imports this package.
"""
