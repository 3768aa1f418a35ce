"""Diagnostics a user runs on the pipeline's outputs; not stages of the DAG (no stage depends
on this package, so changing it re-runs nothing)."""
