"""Scaffold."""
from affiner.synth.synth import add_arguments, main  # noqa: F401
