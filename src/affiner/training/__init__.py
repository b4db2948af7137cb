"""Fine-tuning: start or resume a run, set up LoRA/QLoRA/full training, and the explicit loop.
Imports core and data, never evaluation (the held-out probe is handed in).
"""
