"""Evaluation: answer extraction and accuracy (arithmetic), more tasks to come."""
