"""The Go-template renderer against Ollama's real templates (ChatML, Qwen3, Llama 3, Mistral, Gemma)."""

from __future__ import annotations

import pytest

from tunesmith.serve.gotemplate import TemplateError, render
from tunesmith.serve.prompt import build_prompt

# Ollama's template/chatml.gotmpl
CHATML = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{- end }}"""

# Ollama's template/llama3-instruct.gotmpl
LLAMA3 = """{{- if .Messages }}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

{{ else -}}
{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>
{{- end -}}"""

# Ollama's template/mistral-instruct.gotmpl
MISTRAL = """{{- if .Messages }}
{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}
{{ end }}{{ .Content }}
{{- else if eq .Role "assistant" }}[/INST] {{ .Content }}</s>
{{- end }}
{{- end }}[/INST]
{{- else -}}
[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>
{{- end -}}"""

# Ollama's template/gemma-instruct.gotmpl
GEMMA = """{{- if .Messages }}
{{- range $index, $_ := .Messages }}<start_of_turn>
{{- if eq .Role "user" }}user
{{- if and $.System (eq $index 0) }}
{{ $.System }}
{{- end }}
{{- else if eq .Role "assistant" }}model
{{- end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
{{ else -}}
<start_of_turn>user
{{ if .System }}{{ .System }}
{{ end }}{{ .Prompt }}<end_of_turn>
<start_of_turn>model
{{ .Response }}<end_of_turn>
{{ end -}}"""

# The qwen3 template from Ollama's library (thinking switch, tools, $lastUserIdx assignment).
QWEN3 = """{{- $lastUserIdx := -1 -}}
{{- range $idx, $msg := .Messages -}}
{{- if eq $msg.Role "user" }}{{ $lastUserIdx = $idx }}{{ end -}}
{{- end }}
{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end -}}
<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}
{{- if and $.IsThinkSet (eq $i $lastUserIdx) }}
   {{- if $.Think -}}
      {{- " "}}/think
   {{- else -}}
      {{- " "}}/no_think
   {{- end -}}
{{- end }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if (and $.IsThinkSet (and .Thinking (or $last (gt $i $lastUserIdx)))) -}}
<think>{{ .Thinking }}</think>
{{ end -}}
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{- range .ToolCalls }}
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{- end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) -}}
<think>

</think>

{{ end -}}
{{ end }}
{{- end }}"""

# The conversation of Ollama's template tests (template/testdata/*/system-user-assistant-user).
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]


def test_llama3_conversation_matches_ollama_testdata():
    expected = (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Ollama's collate keeps system messages in .Messages; the Llama 3 template prints .System and
    # then each message, so feed it the way Ollama's testdata does: System set, messages without it.
    got = render(LLAMA3, {"System": "You are a helpful assistant.", "Messages": CONVERSATION[1:]})
    assert got == expected


def test_llama3_single_user_turn():
    got = build_prompt(LLAMA3, [{"role": "user", "content": "Hello, how are you?"}])
    assert got == ("<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma_conversation_matches_ollama_testdata():
    expected = (
        "<start_of_turn>user\nYou are a helpful assistant.\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    got = render(GEMMA, {"System": "You are a helpful assistant.", "Messages": CONVERSATION[1:]})
    assert got == expected


def test_mistral_puts_system_on_last_user_turn():
    got = build_prompt(MISTRAL, CONVERSATION)
    # build_prompt keeps the system message in .Messages (as Ollama does); Mistral's range ignores it.
    assert got == (
        "[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?</s>"
        "[INST] You are a helpful assistant.\nI'd like to show off how chat templating works![/INST]"
    )


def test_chatml_messages_and_legacy_paths():
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert build_prompt(CHATML, messages) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert render(CHATML, {"Prompt": "hi", "Response": "hello", "System": "sys"}) == (
        "\n<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>")


def test_legacy_template_is_cut_after_response_on_the_last_turn():
    legacy = "{{ if .System }}S:{{ .System }}\n{{ end }}U:{{ .Prompt }}\nA:{{ .Response }}<END>\n"
    got = build_prompt(legacy, CONVERSATION)
    assert got == (
        "S:You are a helpful assistant.\nU:Hello, how are you?\nA:I'm doing great. How can I help you today?<END>\n"
        "U:I'd like to show off how chat templating works!\nA:"
    )


def test_template_without_response_gets_one_appended():
    assert build_prompt("Q: {{ .Prompt }} A: ", [{"role": "user", "content": "2+2?"}]) == "Q: 2+2? A: "


def test_consecutive_same_role_messages_are_collated():
    got = build_prompt(CHATML, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert got == "<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_thinking_switch_and_variable_assignment():
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second"}]
    plain = build_prompt(QWEN3, messages)
    assert plain == ("<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
                     "<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n")
    no_think = build_prompt(QWEN3, messages, think=False, is_think_set=True)
    # Only the last user turn ($lastUserIdx, assigned inside a range) gets the switch.
    assert "first /no_think" not in no_think
    assert no_think.endswith("second /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think = build_prompt(QWEN3, messages, think=True, is_think_set=True)
    assert think.endswith("second /think<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_tools_and_tool_calls_render_as_json():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                 "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                            "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    got = build_prompt(QWEN3, messages, tools=tools)
    assert got.startswith("<|im_start|>system\n\nBe brief.\n\n# Tools\n")
    assert '{"type": "function", "function": {"name":"get_weather","description":"Weather",' in got
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>' in got
    assert got.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("template", "values", "expected"), [
    ("{{ .A }}-{{ .B.C }}", {"A": 1, "B": {"C": "x"}}, "1-x"),
    ("a  {{- .A -}}  b", {"A": "!"}, "a!b"),
    ("{{ if eq .A 1 2 3 }}yes{{ else }}no{{ end }}", {"A": 3}, "yes"),
    ("{{ if ne .A \"x\" }}ne{{ end }}", {"A": "y"}, "ne"),
    ("{{ if and .A (not .B) }}1{{ else if or .B .C }}2{{ else }}3{{ end }}", {"A": 0, "B": 0, "C": 1}, "2"),
    ("{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }} {{ len \"héllo\" }}", {"L": ["a", "b", "c"]}, '3 b ["b","c"] 6'),
    ("{{ range $i, $m := .L }}{{ $i }}={{ $m }};{{ else }}empty{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
    ("{{ range .L }}{{ . }}{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}", {"L": [1, 2, 3]}, "1"),
    ("{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ . }}{{ end }}", {"L": [1, 2, 3]}, "13"),
    ("{{ with .A }}[{{ . }}]{{ else }}none{{ end }}", {"A": ""}, "none"),
    ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
    ("{{/* a comment */}}x{{- /* trimmed */ -}} y", {}, "xy"),
    ("{{ .Missing }}|{{ .A.Missing }}", {"A": {}}, "|"),
    ("{{ \"a\\tb\" }}{{ `raw\\n` }}", {}, "a\tbraw\\n"),
    ("{{ json .A }}", {"A": {"k": "<v>"}}, '{"k":"\\u003cv\\u003e"}'),
    ("{{ .A | printf \"%s!\" }}", {"A": "hi"}, "hi!"),
    ("{{ range $k, $v := .M }}{{ $k }}{{ $v }}{{ end }}", {"M": {"b": 2, "a": 1}}, "a1b2"),
    ("{{ if gt (len .L) 1 }}many{{ end }}", {"L": [1, 2]}, "many"),
    ("{{ range .Messages }}{{ .Role }}:{{ .ToolCalls }}{{ end }}",
     {"Messages": [{"role": "user", "tool_calls": [{"a": 1}]}]}, 'user:[{"a":1}]'),
])
def test_go_template_semantics(template, values, expected):
    assert render(template, values) == expected


@pytest.mark.parametrize("template", [
    "{{ if .A }}no end",
    "{{ end }}",
    "{{ .A ",
    "{{ nofunc .A }}",
    "{{ $undefined }}",
    "{{ index .L 5 }}",
    "{{ define \"x\" }}{{ end }}",
])
def test_bad_templates_raise_template_error(template):
    with pytest.raises(TemplateError):
        render(template, {"L": [1]})


def test_chatml_go_template_matches_smollm2_hf_chat_template(smollm2_gguf):
    """The Go template the server picks for SmolLM2 renders what the GGUF's own Jinja template renders."""
    import jinja2

    from tunesmith.serve import gguf_meta, known_templates

    meta, _ = gguf_meta.read_metadata(smollm2_gguf)
    hf = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    go_template, _ = known_templates.detect(meta["tokenizer.chat_template"])
    conversations = [
        CONVERSATION,
        [{"role": "system", "content": "Give driving instructions."}, {"role": "user", "content": "Turn?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "multi\nline <b>text</b> & \"quotes\""}],
    ]
    for messages in conversations:
        expected = hf.render(messages=messages, add_generation_prompt=True)
        assert build_prompt(go_template, messages) == expected


def test_a_huge_range_stops_cleanly_without_building_a_list():
    """`{{ range N }}` in a request's template: once a list of N pairs (311 MiB for N = 4 million), now lazy and
    bounded by the execution's step count."""
    import tracemalloc

    from tunesmith.serve import gotemplate as templates

    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="steps"):
            render("{{ range 4000000 }}{{ end }}", {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    for template in ("{{ range 1000000000000 }}{{ end }}", "{{ range 100000 }}{{ range 100000 }}{{ end }}{{ end }}"):
        with pytest.raises(TemplateError, match="steps"):
            render(template, {})
    with pytest.raises(TemplateError, match="output"):
        render("{{ range 60 }}{{ $.Big }}{{ end }}", {"Big": "x" * (templates.MAX_OUTPUT // 50)})
    assert render("{{ range 3 }}{{ . }}{{ else }}none{{ end }}|{{ range 0 }}x{{ else }}none{{ end }}", {}) == "012|none"


def test_a_template_nested_too_deeply_is_a_template_error():
    with pytest.raises(TemplateError, match="nested too deeply"):
        render("{{ if true }}" * 5000 + "{{ end }}" * 5000, {})
