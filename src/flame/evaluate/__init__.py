"""Evaluation stage: datasets, metrics and tasks in CLIP_benchmark's conventions."""
