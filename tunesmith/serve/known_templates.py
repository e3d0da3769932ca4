"""Ollama templates for models whose Modelfile has no TEMPLATE, picked from the GGUF's HF chat template.

Ollama matches `tokenizer.chat_template` against its template library; the marker tokens are enough
for the families tunesmith trains.
"""

from __future__ import annotations

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

_KNOWN: list[tuple[str, str, dict[str, Any]]] = [
    ("<|im_start|>", CHATML, {"stop": ["<|im_start|>", "<|im_end|>"]}),
    ("<|start_header_id|>", LLAMA3, {"stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}),
    ("<start_of_turn>", GEMMA, {"stop": ["<end_of_turn>"]}),
]


def detect(chat_template: str | None) -> tuple[str, dict[str, Any]] | None:
    """(template, parameters) for a HF chat template, or None when the family is unknown."""
    for marker, template, parameters in _KNOWN:
        if chat_template and marker in chat_template:
            return template, {k: list(v) for k, v in parameters.items()}
    return None
