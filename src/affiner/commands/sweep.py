"""Scaffold."""
from affiner.experiments.sweep import add_arguments, main  # noqa: F401
