"""Random-token data that `tunesmith train` reads like any data set, for timing the CLI on a GPU offline.

No real tokenizer travels to the GPU machine, so a checkpoint gets a word-level tokenizer over its whole
vocabulary: the word `w123` is token 123, and ChatML's markers are Qwen's own special tokens. A sequence of
token ids then becomes an input/output record whose rendering through ChatML is exactly that many tokens
(6 of them the template's: `<|im_start|> user ... <|im_end|> <|im_start|> assistant ... <|im_end|>`), so the
CLI trains sequences of the same lengths as the benchmark's packed path or the article's recipe.

    python bench/random_tokens.py MODEL_DIR OUT_DIR LENGTHS_JSON DATA.jsonl   # a folder and a data set
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE_TOKENS = 6
SPECIAL = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
ROLES = {151646: "user", 151647: "assistant", 151648: "system"}
WORD_IDS = 150_000
"""Sequences use ids below this (as ../shared/bench/anchor_sft.py draws them), clear of the named tokens."""


def with_word_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Path:
    """`out_dir`: the checkpoint in `model_dir` (its files linked, not copied) plus the word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return out_dir
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in SPECIAL and i not in ROLES}
    vocab.update({name: i for i, name in {**SPECIAL, **ROLES}.items()})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if not (out_dir / item.name).exists():
            (out_dir / item.name).symlink_to(item.resolve())
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_records(path: str | Path, sequences: list[list[int]], reply_share: float = 0.25) -> list[int]:
    """Write one input/output record per sequence (its last `reply_share` the output); return the lengths the
    CLI will see (each sequence's own, at least TEMPLATE_TOKENS + 2)."""
    lengths = []
    with open(path, "w", encoding="utf-8") as handle:
        for ids in sequences:
            words = [f"w{i % WORD_IDS}" for i in ids[: max(2, len(ids) - TEMPLATE_TOKENS)]]
            while len(words) < 2:
                words.append("w1")
            cut = max(1, min(len(words) - 1, round(len(words) * (1 - reply_share))))
            handle.write(json.dumps({"input": " ".join(words[:cut]), "output": " ".join(words[cut:])}) + "\n")
            lengths.append(len(words) + TEMPLATE_TOKENS)
    return lengths


def random_sequences(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(WORD_IDS) for _ in range(n)] for n in lengths]


def timed_lines(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
                log: str | None = None) -> tuple[int, float, list[tuple[float, str]]]:
    """Run `command`, stamping each line of its output (stdout and stderr together) with the seconds since the
    start as it arrives; returns (exit code, wall seconds, [(seconds, line)]). Each line is also appended to
    `log` as it comes, so a command killed from outside still leaves what it printed."""
    import subprocess
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[tuple[float, str]] = []

    def read() -> None:
        sink = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115 (closed below, in this thread)
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if sink:
                sink.write(f"{lines[-1][0]:8.2f} {lines[-1][1]}\n")
                sink.flush()
        if sink:
            sink.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    reader.join(5)
    return code, time.perf_counter() - start, lines


def log_times(lines: list[tuple[float, str]]) -> list[float]:
    """The arrival time of each article-style log line (`{'loss': ...}`), one per `train.log_steps` steps."""
    return [t for t, line in lines if line.startswith("{'loss'")]


if __name__ == "__main__":
    model, out, lengths_json, data = sys.argv[1:5]
    with_word_tokenizer(model, out)
    print(sum(write_records(data, random_sequences(json.loads(Path(lengths_json).read_text())))), "tokens")
