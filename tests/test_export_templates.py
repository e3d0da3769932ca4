"""The Modelfile TEMPLATE writes the same token ids as the chat template used in training, for every family.

Each family's Jinja chat template below is written for these tests in the style of its models (ChatML as
SmolLM2 uses it, Qwen3's empty think block, Llama 3 headers, Mistral [INST], Gemma turns). A tiny model
gets the family's special tokens, is converted to GGUF by llama.cpp's converter, and the same
conversations go (a) through Hugging Face's `apply_chat_template` and the HF tokenizer, as training
tokenized them, and (b) through the generated Go template with tunesmith's renderer, assembled as Ollama
assembles a chat (Modelfile SYSTEM first), and tokenized by llama.cpp from the GGUF as the server does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.export import ollama_template
from tunesmith.serve import modelfile as serve_modelfile
from tunesmith.serve.prompt import build_prompt

QWEN3 = (
    r"{%- for message in messages %}"
    r"{%- set content = message.content %}"
    r"{%- if message.role == 'assistant' and '</think>' in content %}"
    r"{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    r"{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    r"{%- endif %}"
)
LLAMA3 = (
    r"{{- bos_token }}{%- for message in messages %}"
    r"{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    r"{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"{%- endif %}"
)
MISTRAL = (  # the system prompt rides on the last user turn, as in Mistral-7B-Instruct-v0.3
    r"{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}"
    r"{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    r"{{- bos_token }}{%- for message in loop_messages %}{%- if message.role == 'user' %}"
    r"{%- if loop.last and system_message is defined %}"
    r"{{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}"
    r"{%- else %}{{- '[INST] ' + message.content + '[/INST]' }}{%- endif %}"
    r"{%- elif message.role == 'assistant' %}{{- ' ' + message.content + eos_token }}{%- endif %}{%- endfor %}"
)
MISTRAL_FIRST = MISTRAL.replace("loop.last and system_message", "loop.first and system_message")
GEMMA = (
    r"{{- bos_token }}{%- if messages[0].role == 'system' %}"
    r"{%- set first_user_prefix = messages[0].content + '\n\n' %}{%- set loop_messages = messages[1:] %}"
    r"{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    r"{%- for message in loop_messages %}{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    r"{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message.content"
    r" + '<end_of_turn>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

# family → (chat template, special tokens, bos, eos, does llama.cpp add BOS itself, enable_thinking=False)
FAMILIES = {
    "smollm2": (None, [], None, None, False, False),  # the built-in tokenizer's own ChatML template
    "qwen3": (QWEN3, [], None, None, False, True),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", True, False),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", False, False),
    "mistral-first": (MISTRAL_FIRST, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", False, False),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True, False),
}

CONVERSATIONS = ollama_template.PROBES + [
    [{"role": "user", "content": "Wie spät ist es? 🙂"}],
    [{"role": "system", "content": "You are a driving coach."}, {"role": "user", "content": "速度:静止"},
     {"role": "assistant", "content": "系好安全带。"}, {"role": "user", "content": "速度:慢速"}],
]


def _family_checkpoint(out: Path, family: str) -> Path:
    """A tiny llama with the family's chat template and special tokens, converted to GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.convert import convert_checkpoint
    from tunesmith.testing import tiny_checkpoint

    template, specials, bos, eos, adds_bos, _ = FAMILIES[family]
    checkpoint = tiny_checkpoint(out / family, "llama", chat_template=template)
    if specials:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials})
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        model.resize_token_embeddings(len(tokenizer))
        model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = adds_bos  # what the converter writes as tokenizer.ggml.add_bos_token
    config_path.write_text(json.dumps(config))
    convert_checkpoint(checkpoint, checkpoint / "model.gguf", "f16")
    return checkpoint


@pytest.fixture(scope="module")
def family_models(builtin_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    return {family: _family_checkpoint(out, family) for family in FAMILIES}


def _sides(checkpoint: Path, family: str):
    from llama_cpp import Llama

    from tunesmith.export.quantize import native_output
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    with native_output():
        vocab = Llama(model_path=str(checkpoint / "model.gguf"), vocab_only=True, verbose=False)
    kwargs = {"enable_thinking": False} if FAMILIES[family][5] else {}
    return tokenizer, vocab, kwargs


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("training_system", [None, "You are a driving coach. 你好"])
def test_modelfile_template_gives_the_training_token_ids(family_models, family, training_system):
    tokenizer, vocab, kwargs = _sides(family_models[family], family)
    adds_bos = len(vocab.tokenize(b"", add_bos=True, special=True)) > 0
    assert adds_bos == FAMILIES[family][4]
    derived = ollama_template.derive(tokenizer, kwargs, adds_bos)
    assert derived.family == {"smollm2": "chatml", "qwen3": "chatml"}.get(family, family.split("-")[0])
    system = training_system or derived.default_system
    # The Modelfile as written and read back (quoting must keep the template byte for byte).
    text = serve_modelfile.Modelfile(from_="./x.gguf", template=derived.template, system=system).to_text()
    parsed = serve_modelfile.parse(text)
    assert parsed.template == derived.template and parsed.system == system

    for messages in CONVERSATIONS:
        trained_messages = ollama_template.ollama_messages(messages, training_system)
        trained = tokenizer.apply_chat_template(trained_messages, tokenize=False, add_generation_prompt=True,
                                                **kwargs)
        trained_ids = tokenizer(trained, add_special_tokens=False)["input_ids"]
        served = build_prompt(parsed.template, ollama_template.ollama_messages(messages, parsed.system))
        served_ids = vocab.tokenize(served.encode(), add_bos=True, special=True)
        assert served_ids == trained_ids, (family, messages, trained, served)
        # The text agrees too, up to the BOS llama.cpp adds by itself.
        assert served == (trained.removeprefix(tokenizer.bos_token) if adds_bos else trained)
    if family == "smollm2" and training_system is None:
        assert derived.default_system.startswith("You are a helpful AI assistant named SmolLM")
    if family == "qwen3":
        assert derived.template.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_verify_catches_a_template_that_differs(family_models):
    tokenizer, vocab, kwargs = _sides(family_models["llama3"], "llama3")
    derived = ollama_template.derive(tokenizer, kwargs, True)
    render = ollama_template.jinja_renderer(tokenizer, kwargs)

    def hf_ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def served_ids(text):
        return vocab.tokenize(text.encode(), add_bos=True, special=True)

    ollama_template.verify(derived.template, None, render, hf_ids, served_ids)
    broken = derived.template.replace("<|end_header_id|>\n\n{{ .Content }}", "<|end_header_id|>\n{{ .Content }}")
    assert broken != derived.template
    with pytest.raises(ollama_template.TemplateFamilyError, match="different tokens"):
        ollama_template.verify(broken, None, render, hf_ids, served_ids)
    # Writing the BOS as well as llama.cpp adding it: the double-BOS bug.
    double = ollama_template.derive(tokenizer, kwargs, False).template
    with pytest.raises(ollama_template.TemplateFamilyError, match="from token 1 on"):
        ollama_template.verify(double, None, render, hf_ids, served_ids)


def test_unknown_family_names_export_template():
    zephyr = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    with pytest.raises(ollama_template.TemplateFamilyError, match="no family") as caught:
        ollama_template.detect_family(zephyr)
    assert "export.template" in str(caught.value)
    with pytest.raises(ollama_template.TemplateFamilyError, match="no chat template"):
        ollama_template.detect_family(None)
