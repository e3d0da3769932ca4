"""Evaluation: the base model, the fine-tuned model and each GGUF answer held-out examples (tunesmith/inference)
and are scored side by side (tunesmith/scorers.py); report.html shows it all."""
