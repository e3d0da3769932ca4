"""The article's model families with their real tokenizers and chat templates, from training to serving.

Qwen3 (Qwen3-0.6B's template, thinking off as the article advises and on), Llama 3.1 and 3.2 (Meta's templates,
with their date preamble) and Gemma 3 (the built-in's SentencePiece vocabulary and turn format): tiny random
models that carry the real tokenizer (tunesmith/testing.py builds them from llama.cpp's own vocabulary files).

The proof is in token ids, compared at both ends: what training renders (the HF Jinja template through
data/render.py, and inference/hf.prompt_ids for evaluation) against what the server feeds llama.cpp (the Modelfile's
Go template through serve/prompt.py, tokenized by llama.cpp from the exported GGUF). The fast tests do it on a
GGUF of the base; the slow ones train, export, create and serve, and read the ids back from a real server through
the official `ollama` client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith import testing
from tunesmith.config import Config, TrainConfig
from tunesmith.data import IGNORE_INDEX, Example, Source, tokenize
from tunesmith.data.render import strip_think
from tunesmith.export import ollama_template
from tunesmith.inference import hf

SYSTEM = "You are a driving coach. 你好"
# family variant → (family, data.think)
VARIANTS = {"qwen3-no-think": ("qwen3", "strip"), "qwen3-think": ("qwen3", "keep"),
            "llama3.1": ("llama3.1", "strip"), "llama3.2": ("llama3.2", "strip"), "gemma3": ("gemma3", "strip")}
END_OF_TURN = {"qwen3": "<|im_end|>", "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "gemma3": "<end_of_turn>"}
REPLY = "<think>\nThe belt first.\n</think>\n\nFasten your seat belt."
CONVERSATIONS = {
    "one turn": [("user", "速度:静止 belt: off"), ("assistant", REPLY)],
    "multi-turn": [("user", "Hi!"), ("assistant", "<think>\nGreet.\n</think>\n\nHello. How can I help?"),
                   ("user", "Say 'ok'\nthen  stop."), ("assistant", REPLY)],
}


@pytest.fixture(scope="module")
def family_base(tmp_path_factory):
    """family → (tiny checkpoint, its f16 GGUF), each built once for the module."""
    from tunesmith.export.convert import convert_checkpoint

    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            checkpoint = testing.tiny_family_checkpoint(tmp_path_factory.mktemp(family) / "base", family)
            built[family] = checkpoint, convert_checkpoint(checkpoint, checkpoint.parent / "base.f16.gguf", "f16")
        return built[family]
    return get


def _vocab(gguf: Path):
    from llama_cpp import Llama

    from tunesmith.export.quantize import native_output

    with native_output():
        return Llama(model_path=str(gguf), vocab_only=True, verbose=False)


def _served_ids(vocab, text: str) -> list[int]:
    """As the server (serve/engine.py) and Ollama's runner tokenize a prompt."""
    return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def _config(base: Path, think: str, system: str | None, **sections) -> Config:
    return Config.model_validate({"name": "fam", "model": {"base": str(base)},
                                  "data": {"system_prompt": system, "think": think}, **sections})


def _messages(turns, system: str | None) -> list[dict[str, str]]:
    """The conversation as the data layer makes it: data.system_prompt first when configured."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in turns]


def _trained_prompt(tokenizer, messages, config: Config) -> tuple[list[int], list[int]]:
    """(the prompt of the last reply, the last reply's trained ids) exactly as training tokenized them."""
    tokens = tokenize(tokenizer, Example(messages, Source("mem.jsonl", 0, 1)), config.data, TrainConfig())
    labels = tokens["labels"]
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return tokens["input_ids"][:start], tokens["input_ids"][start:end]


def _history(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """What a client sends back as history: earlier answers without their thinking (Ollama returns it apart)."""
    return [{**m, "content": strip_think(m["content"])} if m["role"] == "assistant" else m for m in messages]


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_tokenizer_is_the_real_one_in_transformers_and_in_the_converted_gguf(family_base, family):
    from tunesmith.models import load_tokenizer
    from tunesmith.serve.gguf_meta import read_metadata

    checkpoint, gguf = family_base(family)
    tokenizer, vocab = load_tokenizer(checkpoint), _vocab(gguf)
    metadata = read_metadata(gguf)[0]
    if family == "gemma3":
        # SentencePiece, as Gemma's own GGUFs: the converter took the vocabulary from tokenizer.model
        # (models/spm_vocab.py); without it, it hashed the tokenizer and named a BPE pre-tokenizer.
        assert metadata["tokenizer.ggml.model"] == "llama" and len(tokenizer) == 262144
        texts = [text for name in ("qwen3", "llama3.1") for text, _ in testing.vocab_vectors(name)]
        texts += ["a  b\t\tc   d\n\n\ne", "<start_of_turn>user\nHi<end_of_turn>\n"]
        for text in texts:
            assert _served_ids(vocab, text)[1:] == tokenizer(text, add_special_tokens=False)["input_ids"], text
    else:
        # llama.cpp's own test vectors for this vocabulary, through transformers and through llama.cpp reading
        # the GGUF tunesmith's converter step wrote: the converter recognised the real pre-tokenizer.
        assert metadata["tokenizer.ggml.pre"] == {"qwen3": "qwen2"}.get(family, "llama-bpe")
        vectors = testing.vocab_vectors(family)
        assert len(vectors) > 40
        for text, ids in vectors:
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
            assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids, text
    if family == "qwen3":  # Qwen3's added tokens at Qwen3's ids, single tokens at both ends
        assert tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>"]) == [151667, 151668, 151645]
        assert _served_ids(vocab, "<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]
    vocab.close()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
def test_served_prompt_ids_are_the_trained_prompt_ids(family_base, variant, system):
    from tunesmith.config import ExportConfig
    from tunesmith.export.export import _template
    from tunesmith.models import load_tokenizer
    from tunesmith.serve.prompt import build_prompt

    family, think = VARIANTS[variant]
    checkpoint, gguf = family_base(family)
    tokenizer, vocab = load_tokenizer(checkpoint), _vocab(gguf)
    config = _config(checkpoint, think, system)
    # The Modelfile's TEMPLATE, SYSTEM and stops exactly as export writes them (derived, then verified).
    template, modelfile_system, stop = _template(tokenizer, config, ExportConfig(), gguf)
    assert modelfile_system == system
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert END_OF_TURN[family] in stop
    for name, turns in CONVERSATIONS.items():
        messages = _messages(turns, system)
        trained_prompt, trained_reply = _trained_prompt(tokenizer, messages, config)
        history = _history(messages[:-1])
        served = _served_ids(vocab, build_prompt(template, ollama_template.ollama_messages(
            [m for m in history if m["role"] != "system"], modelfile_system)))
        assert served == trained_prompt, (variant, name, tokenizer.decode(served), tokenizer.decode(trained_prompt))
        assert hf.prompt_ids(tokenizer, history, config) == trained_prompt, (variant, name)
        # The reply is trained through its end-of-turn token, which the server stops on.
        assert trained_reply[-1] == end_of_turn
        reply = tokenizer.decode(trained_reply)
        if think == "strip":  # the article's advice: trained and served without thinking
            assert "<think>" not in reply and tokenizer.decode(served).count("<think>") == (family == "qwen3")
        else:  # thinking kept: the model learns to think, then answer
            assert reply.startswith("<think>\nThe belt first.\n</think>\n\nFasten")
    if family == "qwen3":
        generation = "<|im_start|>assistant\n<think>\n\n</think>\n\n" if think == "strip" else "<|im_start|>assistant\n"
        assert template.endswith(generation)
    if family.startswith("llama3"):  # the date preamble is written with or without a system prompt, pinned
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ .System }}" in template
    vocab.close()


def test_llama3_preamble_alone_when_the_request_brings_no_system(family_base):
    """Ollama hands the template no system when neither the request nor the Modelfile has one: Meta's template
    still writes the preamble, and so must the Go template."""
    from tunesmith.config import ExportConfig
    from tunesmith.export.export import _template
    from tunesmith.models import load_tokenizer
    from tunesmith.serve.prompt import build_prompt

    checkpoint, gguf = family_base("llama3.1")
    tokenizer = load_tokenizer(checkpoint)
    template, system, _ = _template(tokenizer, _config(checkpoint, "strip", None), ExportConfig(), gguf)
    assert system is None
    served = build_prompt(template, [{"role": "user", "content": "hi"}])
    assert served.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                             "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user")


# ------------------------------------------------------------------------------------------ the whole path

def _write_data(folder: Path) -> tuple[Path, Path]:
    rows = []
    for i in range(12):
        rows.append({"messages": [{"role": "user", "content": f"速度:{i} belt: {'on' if i % 2 else 'off'}"},
                                  {"role": "assistant", "content": f"<think>\nCheck {i}.\n</think>\n\n"
                                                                   f"{'Drive on.' if i % 2 else 'Fasten your belt.'}"}]})
    rows.append({"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "speed: 0"}, {"role": "assistant", "content": "Start."}]})
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    test.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[:3]), encoding="utf-8")
    return train, test


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_export_create_serve_with_token_identical_prompts(family_base, tmp_path, variant):
    """train → merge (checked by logits) → convert → quantize → Modelfile → create → serve, and the prompt ids the
    real server fed llama.cpp (generate's `context`) equal the ids training rendered."""
    import ollama
    from rich.console import Console

    from tests.serve_fixtures import start_server
    from tunesmith.export import export_run
    from tunesmith.models import load_tokenizer
    from tunesmith.run import Run
    from tunesmith.serve import client
    from tunesmith.serve.store import Store
    from tunesmith.train.loop import train

    family, think = VARIANTS[variant]
    checkpoint, _ = family_base(family)
    train_file, test_file = _write_data(tmp_path)
    config = _config(checkpoint, think, SYSTEM, runs_dir=str(tmp_path / "runs"),
                     data={"train_file": str(train_file), "test_file": str(test_file), "system_prompt": SYSTEM,
                           "think": think, "eval_fraction": 0.2},
                     train={"max_steps": 2, "batch_size": 4, "log_steps": 1, "eval_steps": 2, "save_steps": 2,
                            "learning_rate": 0.01},
                     lora={"r": 4, "alpha": 8}, eval={"max_new_tokens": 4},
                     export={"quantizations": ["q8_0"], "fidelity_prompts": 2, "min_agreement": 0.0})
    console = Console(quiet=True)
    train(config, console)
    result = export_run(Run.of(config), None, console)
    assert result.lora is not None and result.lora.is_file() and result.ggufs["q8_0"].is_file()

    tokenizer = load_tokenizer(checkpoint)
    server = start_server(Store(tmp_path / "models"))
    try:
        client.create_from_modelfile(server.url, "fam", result.modelfile)
        ollama_client = ollama.Client(host=server.url)
        options = {"num_predict": 1, "temperature": 0}
        for system in (None, "Be terse."):  # the Modelfile's SYSTEM, then a request's own
            reply = ollama_client.generate(model="fam", prompt="速度:3 belt: off", system=system, options=options)
            messages = _messages([("user", "速度:3 belt: off"), ("assistant", "x")], system or SYSTEM)
            trained_prompt, _ = _trained_prompt(tokenizer, messages, config)
            assert reply.context[:reply.prompt_eval_count] == trained_prompt, (variant, system)
        turns = CONVERSATIONS["multi-turn"]
        history = _history(_messages(turns, None))[:-1]
        chat = ollama_client.chat(model="fam", messages=history, options=options)
        trained_prompt, _ = _trained_prompt(tokenizer, _messages(turns, SYSTEM), config)
        assert chat.prompt_eval_count == len(trained_prompt)
        # Tools: no Go template prints them as the HF templates do (README), so they are refused, not mis-served.
        tool = {"type": "function", "function": {"name": "speed", "description": "Current speed",
                                                 "parameters": {"type": "object", "properties": {}}}}
        with pytest.raises(ollama.ResponseError, match="does not support tools") as refused:
            ollama_client.chat(model="fam", messages=history, tools=[tool], options=options)
        assert refused.value.status_code == 400
    finally:
        server.stop()


@pytest.mark.slow
def test_gemma3_gguf_vocabulary_is_the_original_token_for_token(family_base, tmp_path):
    """The fine-tuned Gemma's GGUF carries the vocabulary of Google's own GGUF: tokens, scores and types
    (user-defined whitespace runs, control tokens), not a vocabulary rebuilt from tokenizer.json."""
    from gguf import GGUFReader

    from tunesmith.models.builtin import BUILTINS, GEMMA3

    _, converted = family_base("gemma3")
    original, ours = GGUFReader(BUILTINS[GEMMA3].gguf(tmp_path)), GGUFReader(converted)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key


@pytest.mark.slow
def test_a_gemma_checkpoint_materialized_without_tokenizer_model_gets_it(family_base, tmp_path, monkeypatch):
    """Built-ins materialized before tokenizer.model was written get it added on next use: only the tokenizer
    files change (the weights are not dequantized again)."""
    import dataclasses

    from tunesmith.models import builtin
    from tunesmith.models.spm_vocab import added_tokens_decoder

    _, gguf = family_base("gemma3")
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    spec = dataclasses.replace(builtin.BUILTINS[builtin.GEMMA3], gguf=lambda scratch: gguf)
    monkeypatch.setitem(builtin.BUILTINS, builtin.GEMMA3, spec)
    target = builtin.builtin_dir(builtin.GEMMA3)
    target.mkdir(parents=True)
    (target / builtin.COMPLETE_MARKER).write_text("ok\n")
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    assert builtin.materialize(builtin.GEMMA3) == target
    assert (target / "model.safetensors").read_bytes() == b"weights"
    decoder = added_tokens_decoder(target)
    assert decoder["106"] == {"content": "<end_of_turn>", "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True}
    assert decoder["138"]["content"] == "\u2581\u2581" and not decoder["138"]["special"]  # two spaces, user-defined
    assert json.loads((target / "tokenizer_config.json").read_text())["tokenizer_class"] == "GemmaTokenizer"
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    assert processor.vocab_size() == 262144 and processor.IdToPiece(106) == "<end_of_turn>"
