"""Scaffold: replaced by the command module proper."""
from affiner.interfaces.serve import add_arguments, main  # noqa: F401
