"""Scaffold: replaced by the command module proper."""
from affiner.interfaces.chat import add_arguments, main  # noqa: F401
