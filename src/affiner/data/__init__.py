"""Training data: read any source, turn rows into examples, clean them through one counted pipeline,
tokenise with response-only labels, and write prepared folders. Imports only core.
"""
