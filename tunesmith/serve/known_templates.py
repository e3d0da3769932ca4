"""Ollama templates for models whose Modelfile has no TEMPLATE, picked from the GGUF's HF chat template.

Ollama matches `tokenizer.chat_template` against its template library; the marker tokens are enough
for the families tunesmith trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Ollama's template/chatml.gotmpl (SmolLM2, Qwen2/2.5, Hermes...).
CHATML = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
{{ else }}
{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{- end }}"""

# Ollama's template/llama3-instruct.gotmpl.
LLAMA3 = """{{- if .Messages }}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

{{ else -}}
{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>
{{- end -}}"""

# Ollama's template/gemma-instruct.gotmpl.
GEMMA = """{{- if .Messages }}
{{- range $index, $_ := .Messages }}
{{- if ne .Role "system" }}<start_of_turn>
{{- if eq .Role "user" }}user
{{- if and $.System (eq $index 1) }}
{{ $.System }}
{{- end }}
{{- else if eq .Role "assistant" }}model
{{- end }}
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
{{ else -}}
<start_of_turn>user
{{ if .System }}{{ .System }}
{{ end }}{{ .Prompt }}<end_of_turn>
<start_of_turn>model
{{ .Response }}<end_of_turn>
{{ end -}}"""

@dataclass(frozen=True)
class Family:
    """A chat-template family: the marker that identifies it in a HF (Jinja) chat template, its end-of-turn tokens
    (Ollama's PARAMETER stop), and Ollama's own template for it where the server picks one (`detect`)."""

    marker: str
    stop: tuple[str, ...]
    template: str | None = None


# The one table of families: the server picks templates from it, export derives templates for each of them.
FAMILIES: dict[str, Family] = {
    "chatml": Family("<|im_start|>", ("<|im_start|>", "<|im_end|>"), CHATML),
    "llama3": Family("<|start_header_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3),
    "gemma": Family("<start_of_turn>", ("<end_of_turn>",), GEMMA),
    "mistral": Family("[INST]", ("[INST]", "</s>")),
}


def detect(chat_template: str | None) -> tuple[str, dict[str, Any]] | None:
    """(template, parameters) for a HF chat template, or None when the family is unknown."""
    for family in FAMILIES.values():
        if chat_template and family.template is not None and family.marker in chat_template:
            return family.template, {"stop": list(family.stop)}
    return None
