"""Export: merge the adapter, convert to GGUF with llama.cpp's converter, quantize, write the Modelfile."""

from tunesmith.export.export import ExportResult, FidelityFailed, NotEnoughDisk, export_run

__all__ = ["ExportResult", "FidelityFailed", "NotEnoughDisk", "export_run"]
