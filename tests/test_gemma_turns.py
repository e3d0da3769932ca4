"""The built-in Gemma 3 270M's turn format: what training renders is, token for token, what the server feeds
llama.cpp through the Modelfile TEMPLATE that export derives for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.data.render import template_kwargs
from tunesmith.export import llama_cpp, ollama_template
from tunesmith.models import load_tokenizer
from tunesmith.serve.prompt import build_prompt

GODRIVE = [
    {"role": "system", "content": "你是驾驶教练，根据车辆特征给出指令。"},
    {"role": "user", "content": "<特征>场地类型:科目二; 当前项目:倒车入库; 车辆类型:手动挡; 挡位:倒挡; 手刹:放下; 发动机:打火; "
                                "安全带:未系; 车门:关闭; 离合:未踩; 刹车:未踩; 油门:踩下; 速度:缓慢; 时间特征:夜晚</特征>"},
]


@pytest.fixture(scope="module")
def vocab(gemma_checkpoint, tmp_path_factory):
    """llama.cpp's tokenizer for the checkpoint: a vocab-only GGUF from llama.cpp's own converter."""
    from llama_cpp import Llama

    out = tmp_path_factory.mktemp("gemma") / "gemma.vocab.gguf"
    done = llama_cpp.run("convert_hf_to_gguf.py", [str(gemma_checkpoint), "--vocab-only", "--outfile", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.slow
def test_gemma_turns_are_token_identical_in_training_and_serving(gemma_checkpoint: Path, vocab):
    from tunesmith.config import DataConfig

    tokenizer = load_tokenizer(gemma_checkpoint)
    kwargs = template_kwargs(DataConfig())
    adds_bos = len(vocab.tokenize(b"", add_bos=True, special=True)) > 0
    derived = ollama_template.derive(tokenizer, kwargs, adds_bos)
    assert derived.family == "gemma" and derived.stop == ["<end_of_turn>"]

    def served(text: str) -> list[int]:  # as tunesmith's server (and Ollama's runner) tokenizes a prompt
        return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def trained(messages: list[dict[str, str]]) -> list[int]:  # as the data layer renders and tokenizes
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # The article's request and a multi-turn chat, the system prompt given as the Modelfile's SYSTEM.
    conversations = [GODRIVE, [*GODRIVE, {"role": "assistant", "content": "请系好安全带。"},
                               {"role": "user", "content": "然后呢？"}]]
    for messages in conversations:
        prompt = build_prompt(derived.template, messages)
        assert served(prompt) == trained(messages)
    ids = trained(GODRIVE)
    start, end = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert ids[:2] == [tokenizer.bos_token_id, start]  # one BOS, then the user turn carrying the system prompt
    assert ids.count(end) == 1 and ids[-3:] == tokenizer("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    # The whole probe set export checks with (system prompts, multi-turn, newlines, CJK): raises on a difference.
    ollama_template.verify(derived.template, GODRIVE[0]["content"], ollama_template.jinja_renderer(tokenizer, kwargs),
                      lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], served,
                      training_system=GODRIVE[0]["content"])
