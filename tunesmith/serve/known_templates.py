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

# Export's skeletons of each family's TEMPLATE (export/ollama_template.py fills the parts it probes from the
# model's chat template: {BOS}, {GEN} the generation prompt, {SYSTEM_BLOCK} Llama 3's system turn, {SYSTEM_TURN}
# Mistral's). Literal text is never next to a `{{-`/`-}}` trim marker where it could lose whitespace.
CHATML_SKELETON = (
    "{BOS}{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{ end }}{GEN}"
)
LLAMA3_SKELETON = (
    "{BOS}{SYSTEM_BLOCK}"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}{GEN}"
)
GEMMA_SKELETON = (
    "{BOS}{{- $first := true }}{{ range .Messages }}"
    "{{ if eq .Role \"user\" }}<start_of_turn>user\n{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}"
    "{{ .Content }}<end_of_turn>\n{{ $first = false }}"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}"
    "{{ end }}{GEN}"
)
MISTRAL_SKELETON = (
    "{BOS}{{- $first := true }}{{ range $i, $_ := .Messages }}"
    "{{ if eq .Role \"user\" }}[INST] {{ if and $.System {SYSTEM_TURN} }}{{ $.System }}\n\n{{ end }}"
    "{{ .Content }}[/INST]{{ $first = false }}"
    "{{ else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}"
    "{{ end }}{GEN}"
)


@dataclass(frozen=True)
class Family:
    """A chat-template family: the marker that identifies it in a HF (Jinja) chat template, its end-of-turn tokens
    (Ollama's PARAMETER stop; evaluation's stop ids too), Ollama's own template for it where the server picks one
    (`detect`), export's skeleton of the TEMPLATE it derives, and the text around a system turn where the family
    writes the system prompt in a turn of its own."""

    marker: str
    stop: tuple[str, ...]
    template: str | None = None
    skeleton: str = ""
    system_turn: tuple[str, str] | None = None


# The one table of families: the server picks templates from it, export derives templates for each of them.
FAMILIES: dict[str, Family] = {
    "chatml": Family("<|im_start|>", ("<|im_start|>", "<|im_end|>"), CHATML, CHATML_SKELETON,
                     ("<|im_start|>system\n", "<|im_end|>")),
    "llama3": Family("<|start_header_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3,
                     LLAMA3_SKELETON, ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")),
    "gemma": Family("<start_of_turn>", ("<end_of_turn>",), GEMMA, GEMMA_SKELETON),
    "mistral": Family("[INST]", ("[INST]", "</s>"), None, MISTRAL_SKELETON),
}


def detect(chat_template: str | None) -> tuple[str, dict[str, Any]] | None:
    """(template, parameters) for a HF chat template, or None when the family is unknown."""
    for family in FAMILIES.values():
        if chat_template and family.template is not None and family.marker in chat_template:
            return family.template, {"stop": list(family.stop)}
    return None
