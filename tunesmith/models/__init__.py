"""Resolve `model.base` to a local Hugging Face checkpoint: hub id, local directory, or a built-in."""

from tunesmith.models.resolve import BUILTINS, load_model, load_tokenizer, resolve_base, save_tokenizer

__all__ = ["BUILTINS", "load_model", "load_tokenizer", "resolve_base", "save_tokenizer"]
