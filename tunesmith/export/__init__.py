"""Export: merge the adapter, convert to GGUF with llama.cpp's converter, quantize, write the Modelfile."""
