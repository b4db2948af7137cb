"""What every layer stands on: config, errors, templates, the one model loader, the run folder, file I/O,
decoding settings, the loss, metric formatting, tracking, the HTTP client. Imports nothing else of affiner.
"""
