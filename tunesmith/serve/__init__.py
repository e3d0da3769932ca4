"""Serving: the model store, Modelfiles, Go templates, the llama.cpp engine and the Ollama-compatible API."""
