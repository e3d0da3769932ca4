"""Answers from Hugging Face models: the base, or base + a run's LoRA adapter, through the chat template.

Used by `tunesmith generate` (the article's quick inference test), evaluation, export (the merged model's answers
and log-likelihoods for the fidelity check) and training's accuracy probe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import ModelError
from tunesmith.run import Run
from tunesmith.serve.known_templates import FAMILIES

STOP_TOKENS = tuple(dict.fromkeys(token for family in FAMILIES.values() for token in family.stop))
"""The stop tokens of every chat family tunesmith knows: what a Modelfile's PARAMETER stop ends answers on."""


def load_finetuned(run: Run, config: Config) -> tuple[Any, Any]:
    """(model, tokenizer) as fine-tuned: base + the run's adapter, or the fully fine-tuned checkpoint."""
    directory = run.trained_dir(config)
    if config.train.method != "full":
        return load(config, directory)
    from tunesmith.models import load_model, load_tokenizer

    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: no fine-tuned model here", "run `tunesmith train` first")
    model = load_model(directory, trust_remote_code=config.model.trust_remote_code)
    model.eval()
    return model, load_tokenizer(directory)


def load(config: Config, adapter: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) for the run's base model, with the adapter applied when one is given."""
    from tunesmith.models import load_model, load_tokenizer, resolve_base

    base = resolve_base(config.model.base, config.model.revision)
    # A QLoRA adapter answers on the 4-bit base it was trained on (merging into 4-bit weights would round it away).
    four_bit = adapter is not None and config.train.method == "qlora"
    model = load_model(base, trust_remote_code=config.model.trust_remote_code, four_bit=four_bit)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"{adapter}: no trained adapter here", "run `tunesmith train` first")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, load_tokenizer(base)


def messages_for(prompt: str, config: Config) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": config.data.system_prompt}] if config.data.system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], config: Config) -> list[int]:
    """The prompt's token ids as training rendered it: the same template variables (data/render.py)."""
    from tunesmith.data.render import template_kwargs

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **template_kwargs(config.data))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stream(model: Any, tokenizer: Any, messages: list[dict[str, str]], config: Config,
           max_new_tokens: int = 256) -> Iterator[str]:
    """Greedy answer, yielded piece by piece as it is generated."""
    import torch
    from transformers import TextIteratorStreamer

    ids = torch.tensor([prompt_ids(tokenizer, messages, config)], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
                  "do_sample": False, "streamer": streamer, "pad_token_id": tokenizer.pad_token_id}
    def generate() -> None:
        with contiguous_lm_head(model):
            model.generate(**kwargs)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    yield from streamer
    worker.join()


def stop_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an answer: EOS and the stop tokens of the chat families tunesmith knows
    (`STOP_TOKENS`), those the tokenizer has. A base model given a chat template (Gemma 3 270M) has only `<eos>`
    as its EOS, while its turns end in `<end_of_turn>`."""
    ids = {tokenizer.eos_token_id} - {None}
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


@contextlib.contextmanager
def contiguous_lm_head(model: Any) -> Iterator[None]:
    """Give the LM head contiguous input while generating.

    At the first step `generate()` runs the LM head on `hidden[:, -1:, :]`, which is not contiguous across the
    batch. torch.matmul folds a 3-D by 2-D product into one matrix product only when the 3-D input's leading
    dimensions are contiguous or the weight requires grad; otherwise it expands the weight to the batch and
    copies it. For a frozen LM head (a peft model's, or one merged from it) that is a copy of the whole
    embedding per sequence: with Gemma 3's 262k-token vocabulary, 16 prompts took 53 s instead of 8 on one
    core (profile: 42 s in aten::copy_ under one aten::bmm), SmolLM2's 49k vocabulary suffers less."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


ANSWER_MARGIN = 8
"""Tokens generated beyond the longest reference: room to end the turn, and for a different tokenization."""


def answer_limit(tokenizer: Any, references: list[str] | None, max_new: int) -> int:
    """`max_new`, or fewer when references are known: an answer longer than every reference by ANSWER_MARGIN
    tokens cannot be right. A model that does not stop (the base model, a fine-tune early in training) otherwise
    generates `eval.max_new_tokens` for every prompt: 32 base answers took 39 s on a 2-core CPU, most of it text
    after where the reference ends. Exact match is unchanged; a too-long answer's edit similarity is computed on
    its first `limit` tokens."""
    if not references:
        return max_new
    longest = max(len(tokenizer(reference, add_special_tokens=False).input_ids) for reference in references)
    return min(max_new, longest + ANSWER_MARGIN)


ANSWER_CACHE_BYTES = 2 * 2**30
"""The KV cache one batch of answers may fill: how many prompts `generate_batch` decodes together. On a CPU the
batch is what keeps the LM head's matrix product near the cores' peak: address's 200 held-out messages with Gemma 3
270M (a 262k-token vocabulary) on 2 cores took 176 s in batches of 64 and 136 s in one batch of 200, with the same
answers (bench/RESULTS.md, issue 30). 2 GiB holds 256 such prompts with Gemma, ~50 with Qwen3-0.6B."""
MAX_ANSWER_BATCH = 256


def answer_batch_size(model: Any, tokens: int) -> int:
    """How many sequences of `tokens` (prompt and answer) fit ANSWER_CACHE_BYTES of the model's KV cache."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize
    return max(1, min(MAX_ANSWER_BATCH, ANSWER_CACHE_BYTES // (per_token * max(tokens, 1))))


def generate_batch(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], config: Config,
                   max_new_tokens: int, batch_size: int | None = None) -> list[str]:
    """Greedy answers for many prompts, left-padded in batches of similar length (as many as
    `answer_batch_size` allows, at most `batch_size`), each cut at its first stop token (`stop_ids`)."""
    import torch

    encoded = [prompt_ids(tokenizer, messages, config) for messages in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    stops = stop_ids(tokenizer)
    for chunk in _batches(order, [len(ids) for ids in encoded], max_new_tokens,
                          lambda tokens: min(batch_size or MAX_ANSWER_BATCH, answer_batch_size(model, tokens))):
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.no_grad(), contiguous_lm_head(model):
            # use_cache: a model being trained has it off in its config (no KV cache is needed for a loss)
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=sorted(stops), use_cache=True)
        for row, i in enumerate(chunk):
            answer = out[row, width:].tolist()
            end = next((at for at, token in enumerate(answer) if token in stops), len(answer))
            answers[i] = answer_text(tokenizer, answer[:end], cut=end == len(answer))
    return answers


def _batches(order: list[int], lengths: list[int], max_new: int, fits: Any) -> Iterator[list[int]]:
    """`order` (indices by increasing prompt length) cut into batches, each as long as `fits(tokens)` allows
    for its longest prompt plus `max_new`."""
    chunk: list[int] = []
    for i in order:
        if chunk and len(chunk) + 1 > fits(lengths[i] + max_new):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def answer_text(tokenizer: Any, tokens: list[int], cut: bool) -> str:
    """The text of an answer's tokens. An answer `cut` at the token limit can end inside a character that the
    tokenizer writes as several byte tokens; its bytes decode to U+FFFD, which is dropped, as Ollama drops
    incomplete UTF-8 at the end of a response."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if cut and text.endswith("\ufffd"):
        text = text[:-1]
    return text.strip()


def answer_logliks(model: Any, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """For each (prompt ids, answer ids): the mean log-likelihood per answer token under `model`, 0.0 for an
    empty answer. The LM head runs only over the positions that predict the answer (`logits_to_keep`): with
    Gemma 3's 262k-token vocabulary it costs more than the rest of the model at every position."""
    import torch

    logliks = []
    with torch.no_grad():
        for prompt, answer in pairs:
            if not answer:
                logliks.append(0.0)
                continue
            ids = torch.tensor([prompt + answer], device=model.device)
            # The last len(answer) + 1 positions: all but the last predict an answer token.
            logits = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
            logprobs = logits.log_softmax(-1)
            picked = logprobs[torch.arange(len(answer)), torch.tensor(answer, device=logprobs.device)]
            logliks.append(float(picked.double().mean()))
    return logliks
