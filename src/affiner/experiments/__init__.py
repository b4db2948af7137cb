"""Where training and evaluation meet: train with the held-out probe, train then evaluate, list and
compare runs, sweep a grid of settings.
"""
