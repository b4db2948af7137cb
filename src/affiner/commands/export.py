"""Scaffold."""
from affiner.export.export import add_arguments, main  # noqa: F401
