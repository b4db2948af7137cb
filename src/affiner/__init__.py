"""affiner: fine-tune a causal language model with LoRA/QLoRA and prove the gain."""

__version__ = "0.1.0"
