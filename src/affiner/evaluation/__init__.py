"""Before/after evaluation: plan the models and questions, generate, score, judge, report.
Imports core and data, never training.
"""
