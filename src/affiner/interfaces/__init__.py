"""Talking to trained models: the engine (one base, named adapters, streaming), the terminal chat,
the comparison page and the OpenAI-compatible server. Imports only core (and data, were it needed).
"""
