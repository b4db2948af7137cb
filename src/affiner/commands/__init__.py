"""One thin module per verb: its --help (the module docstring), its arguments, and main() wiring
library calls, imported only inside main() so that --help stays light. No verb imports a verb.
"""
