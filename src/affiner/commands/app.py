"""Scaffold: replaced by the command module proper."""
from affiner.interfaces.app import add_arguments, main  # noqa: F401
