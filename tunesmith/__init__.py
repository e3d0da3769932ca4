"""tunesmith: a file of examples in, a fine-tuned model behind an Ollama-compatible API out."""

__version__ = "0.1.0"
