"""A GGUF's SentencePiece vocabulary written back as the files llama.cpp's converter reads (Gemma).

Hugging Face repositories of SentencePiece models (Gemma, Llama 2, Mistral) ship `tokenizer.model`, and their
`tokenizer_config.json` lists the control and user-defined tokens (`added_tokens_decoder`). llama.cpp's
`convert_hf_to_gguf.py` builds a Gemma GGUF's vocabulary from exactly those two; a checkpoint made from a
GGUF by transformers has neither (only `tokenizer.json`), and the converter then falls back to its byte-level
BPE path, hashes the tokenizer, and names some unrelated BPE pre-tokenizer: a GGUF that tokenizes garbage.

`write_sentencepiece(gguf, out)` writes both from the GGUF's own token list, scores and types, so the
converted GGUF gets the original's vocabulary back token for token (types and scores included), and
llama.cpp tokenizes the fine-tuned model as it tokenized the original. tokenizer.json stays as it is:
transformers keeps using it, and reads the added tokens it already has.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.atomic import atomic_path, write_text

# llama.cpp's token types (gguf-py's TokenType), the same numbers as SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SPACE = "\u2581"  # how SentencePiece writes a space inside a piece


def write_sentencepiece(gguf: Path, out: Path) -> bool:
    """Write `out/tokenizer.model` and `added_tokens_decoder` into `out/tokenizer_config.json` when the GGUF's
    vocabulary is SentencePiece (`tokenizer.ggml.model` "llama"); False, writing nothing, for any other."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    reader = GGUFReader(gguf)

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    if field("tokenizer.ggml.model") != "llama":
        return False
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    model = model_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = field(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(trainer, f"{name}_id", token_id)
            setattr(trainer, f"{name}_piece", tokens[token_id])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix"))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    decoder: dict[str, dict] = {}
    for token_id, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = model.pieces.add()
        piece.piece, piece.score = token, score
        # SentencePiece refuses a model whose unk piece is not of type UNKNOWN; GGUFs often mark it CONTROL.
        piece.type = UNKNOWN if token_id == trainer.unk_id else kind
        if kind in (CONTROL, USER_DEFINED):
            # The converter takes a token's type from here (special: control, else user-defined) and turns a
            # user-defined token's ▁ back into spaces, which is how the GGUF spells Gemma's whitespace tokens.
            content = token.replace(" ", SPACE) if kind == USER_DEFINED and not token.strip(" ") else token
            decoder[str(token_id)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": kind == CONTROL}
    with atomic_path(out / "tokenizer.model") as tmp:
        tmp.write_bytes(model.SerializeToString())
    add_tokens_decoder(out, decoder)
    return True


def added_tokens_decoder(directory: Path) -> dict[str, dict]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}


def add_tokens_decoder(directory: Path, decoder: dict[str, dict]) -> None:
    """Put `added_tokens_decoder` into the folder's tokenizer_config.json (transformers 5 no longer writes it)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["added_tokens_decoder"] = decoder
    write_text(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
