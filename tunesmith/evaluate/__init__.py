"""Evaluation: answers from the base model, the fine-tuned model and each GGUF, scored side by side."""
