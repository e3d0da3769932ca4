"""Tiny random-weight checkpoints for fast tests: real architectures, real tokenizers, seconds to build.

`tiny_checkpoint` uses the built-in SmolLM2 tokenizer (vocab 49152) and its ChatML chat template.
`tiny_family_checkpoint` builds one of the families the article's readers fine-tune (Qwen3, Llama 3.1/3.2,
Gemma 3) with that family's real tokenizer and real chat template, no download involved:

- Qwen3: the Qwen2 byte-level BPE (Qwen3 uses it unchanged) from llama.cpp's `ggml-vocab-qwen2.gguf`, plus the
  26 added tokens of Qwen/Qwen3-0.6B's tokenizer_config.json at their ids (`<think>` 151667 ...); the template is
  llama.cpp's copy of Qwen3-0.6B's (`models/templates/Qwen-Qwen3-0.6B.jinja`).
- Llama 3.1 / 3.2: the Llama 3 BPE from `ggml-vocab-llama-bpe.gguf` (128,256 tokens), with Meta's tokenizer.json
  settings that a GGUF does not record (`ignore_merges`, BOS added by the post-processor) and the instruct
  models' end of turn `<|eot_id|>` as EOS; templates `meta-llama-Llama-3.1-8B-Instruct.jinja`, `-3.2-3B-`.
- Gemma 3: the built-in gemma3-270m's tokenizer (Gemma 3's 262,144-token SentencePiece vocabulary) with its turn
  format (models/builtin.py's GEMMA_CHAT_TEMPLATE).

The vocabularies and templates come from the pinned llama-cpp-python sdist (export/llama_cpp.py `ensure_models`);
each tokenizer is checked against llama.cpp's own test vectors (`.inp`/`.out`) in tests/test_families.py.
The models are 2 layers 32 wide: the embedding covers the real vocabulary, the answers are noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from tunesmith.atomic import atomic_path
from tunesmith.models.builtin import materialize_smollm2

Architecture = Literal["qwen3", "llama"]
Family = Literal["qwen3", "llama3.1", "llama3.2", "gemma3"]
FAMILIES: tuple[Family, ...] = ("qwen3", "llama3.1", "llama3.2", "gemma3")
TEMPLATES = {"qwen3": "Qwen-Qwen3-0.6B.jinja", "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
             "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja"}
VOCABS = {"qwen3": "qwen2", "llama3.1": "llama-bpe", "llama3.2": "llama-bpe"}
"""llama.cpp's vocabulary test file (`ggml-vocab-NAME.gguf` + `.inp`/`.out`) each family's tokenizer comes from."""

# Qwen/Qwen3-0.6B's added tokens from id 151643 on, in order; the ones after <|video_pad|> are not special.
QWEN3_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
               "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
               "</tool_response>", "<think>", "</think>")
QWEN3_FIRST_ADDED = 151643
QWEN3_SPECIAL = QWEN3_ADDED[:14]


def tiny_checkpoint(out: str | Path, arch: Architecture = "qwen3", seed: int = 0, chat_template: str | None = None,
                    init_std: float | None = None) -> Path:
    """Write a 2-layer, 64-wide random model of `arch` with the SmolLM2 tokenizer to `out`.

    `init_std`: draw every weight matrix from N(0, init_std) instead of transformers' initialisation (std 0.02),
    whose greedy answers are a newline repeated whatever the prompt; at 0.16 they are words that differ from
    prompt to prompt, which tests comparing answers need."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(materialize_smollm2())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "qwen3":
        config = Qwen3Config(head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, **shape)
    elif arch == "llama":
        config = LlamaConfig(head_dim=16, **shape)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if init_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, init_std)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------ real families

def tiny_family_checkpoint(out: str | Path, family: Family, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide random model of `family`'s architecture with its real tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.models import save_tokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer_dir = real_tokenizer(family)
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, tokenizer_dir)
    return out


def _config(family: Family):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16}
    if family == "qwen3":  # Qwen3-0.6B's, scaled down
        return Qwen3Config(vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, **shape)
    if family in ("llama3.1", "llama3.2"):  # Llama-3.1-8B-Instruct's and Llama-3.2-3B-Instruct's
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0 if family == "llama3.1" else 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_parameters=rope,
                           rms_norm_eps=1e-5, tie_word_embeddings=family == "llama3.2", bos_token_id=128000,
                           eos_token_id=[128001, 128008, 128009], **shape)
    if family == "gemma3":  # gemma-3-270m's
        return Gemma3TextConfig(vocab_size=262144, max_position_embeddings=32768, query_pre_attn_scalar=16,
                                sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106],
                                pad_token_id=0, **shape)
    raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")


def chat_template(family: Family) -> str:
    if family == "gemma3":
        from tunesmith.models.builtin import GEMMA_CHAT_TEMPLATE

        return GEMMA_CHAT_TEMPLATE
    from tunesmith.export import llama_cpp

    return (llama_cpp.ensure_models() / "templates" / TEMPLATES[family]).read_text(encoding="utf-8")


def vocab_vectors(family: Family) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for the family's vocabulary: (text, token ids) pairs."""
    from tunesmith.export import llama_cpp

    base = llama_cpp.ensure_models() / f"ggml-vocab-{VOCABS[family]}.gguf"
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=False)]


def real_tokenizer(family: Family) -> Path:
    """A folder holding the family's tokenizer and chat template, built once (building from a GGUF takes ~20 s)."""
    from tunesmith.export import llama_cpp
    from tunesmith.models.builtin import GEMMA3, materialize

    if family == "gemma3":
        source = materialize(GEMMA3)
        target = llama_cpp.models_dir() / "tokenizers" / family
        if not (target / "tokenizer.model").is_file():
            with atomic_path(target, directory=True) as tmp:
                for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
                    shutil.copyfile(source / name, tmp / name)
        return target
    target = llama_cpp.models_dir() / "tokenizers" / family
    if (target / "tokenizer.json").is_file():
        return target
    vocab = llama_cpp.ensure_models() / f"ggml-vocab-{VOCABS[family]}.gguf"
    tokenizer = _qwen3_tokenizer(vocab) if family == "qwen3" else _llama3_tokenizer(vocab)
    tokenizer.chat_template = chat_template(family)
    with atomic_path(target, directory=True) as tmp:
        tokenizer.save_pretrained(tmp)
    return target


def _backend_spec(vocab: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _qwen3_tokenizer(vocab: Path):
    """The Qwen2 BPE of the GGUF (its first 151,643 tokens), Qwen3's added tokens in place of the GGUF's
    [PAD151646]... placeholders, and NFC normalization as Qwen's tokenizer.json has it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _backend_spec(vocab)
    spec["model"]["vocab"] = {token: i for token, i in spec["model"]["vocab"].items() if i < QWEN3_FIRST_ADDED}
    spec["added_tokens"] = []
    for offset, token in enumerate(QWEN3_ADDED):
        spec["model"]["vocab"][token] = QWEN3_FIRST_ADDED + offset
        spec["added_tokens"].append(_added(QWEN3_FIRST_ADDED + offset, token, token in QWEN3_SPECIAL))
    spec["normalizer"] = {"type": "NFC"}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(QWEN3_SPECIAL[1:]))


def _llama3_tokenizer(vocab: Path):
    """The Llama 3 BPE of the GGUF as Meta's tokenizer.json has it: whole words found in the vocabulary are taken
    as they are (`ignore_merges`: without it "Việt" splits in three), BOS added by the post-processor, and no
    `<|endoftext|>` (transformers' GPT-2 default, which Llama 3 does not have)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _backend_spec(vocab)
    size = 128256
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < size]
    spec["model"]["vocab"] = {token: i for token, i in spec["model"]["vocab"].items() if i < size}
    spec["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|begin_of_text|>",
                                                                                  "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
