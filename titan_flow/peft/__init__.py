"""Parameter-efficient fine-tuning applied from outside the model, like parallelize: LoRA adapters.

It sits below both models/ and rl/: the trainer applies adapters to a backbone, and rl/ switches
them (the frozen reference is the adapter turned off) without importing any model family.
"""
