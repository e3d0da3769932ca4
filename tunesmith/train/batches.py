"""Batches without padding waste: examples of similar length go together, in a seeded, resumable order.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would have seen from the same step on: no data is skipped or repeated.
"""

from __future__ import annotations

import random
from typing import Any

MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are not worth a second decoder call."""

# Sort inside windows of this many batches: long enough to group lengths tightly, short enough that the
# epoch stays well shuffled (the same idea as transformers' group_by_length "megabatches").
WINDOW_BATCHES = 50


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch of one epoch: shuffled, then length-grouped within windows, then shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_multiple(device: str) -> int:
    """Batch widths are rounded up to this many tokens on CPU, so that steps see a few shapes, not a new one
    each time (oneDNN picks kernels and the allocator keeps blocks per shape).

    Measured on the 2-core Sapphire Rapids VM (SmolLM2-135M, bf16, goDrive; one process per variant, one after
    the other; bench/RESULTS.md): batches of 4 over 100 steps, exact widths slowed from 380 to 294 tokens/s
    (RSS 5.2 GB) while widths rounded to 32 held 381-402 (RSS 3.6 GB); batches of 8 over 40 steps, exact
    370 -> 342, rounded to 8 382 -> 375, to 32 366 -> 331 (32 pads goDrive's 258-token median to 288).
    Run-to-run noise on these VMs is ~10%, so the gain is modest; 8 costs at most 7 pad tokens a sequence.
    GPUs need none of it: exact widths."""
    return 8 if device == "cpu" else 1


def collate(examples: list[dict[str, list[int]]], pad_id: int, multiple: int = 1) -> dict[str, Any]:
    """Right-pad to the longest example of the batch, rounded up to `multiple`; padding is masked out and
    never trained on."""
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """The examples of a batch end to end in one row, with no padding: position ids restart at each example, and
    transformers turns them into attention that stays inside each example. The last token of one example is
    never trained to predict the next example's first (a prompt token, labelled -100). Same loss as `collate`."""
    import torch

    input_ids = torch.tensor([[token for example in examples for token in example["input_ids"]]])
    labels = torch.tensor([[label for example in examples for label in example["labels"]]])
    position_ids = torch.tensor([[position for example in examples for position in range(len(example["input_ids"]))]])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def shared_prefix(examples: list[dict[str, list[int]]]) -> int:
    """Tokens every example of the batch starts with that are trained in none of them, nor predict a trained
    token: the template's start and the system prompt, which the loss can compute once for the batch."""
    first = examples[0]["input_ids"]
    length = min(len(example["input_ids"]) for example in examples) - 1
    shared = 0
    while shared < length and all(example["input_ids"][shared] == first[shared] for example in examples):
        shared += 1
    # labels[i] is what position i-1 predicts: the prefix's last position must not predict a trained token
    while shared and any(label != -100 for example in examples for label in example["labels"][:shared + 1]):
        shared -= 1
    return shared if shared >= MIN_SHARED_PREFIX and len(examples) > 1 else 0


def collate_shared_prefix(examples: list[dict[str, list[int]]], pad_id: int, multiple: int = 1) -> dict[str, Any]:
    """`collate`, with the batch's common prefix (`shared_prefix`) taken out once as `prefix_ids` (1, P): the loss
    runs the decoder on it once and lets every example attend to its keys and values (loss.completion_loss).
    Same loss and gradients as `collate`; a batch with no such prefix is `collate`'s."""
    import torch

    shared = shared_prefix(examples)
    if not shared:
        return collate(examples, pad_id, multiple)
    rest = [{"input_ids": e["input_ids"][shared:], "labels": e["labels"][shared:]} for e in examples]
    return {"prefix_ids": torch.tensor([examples[0]["input_ids"][:shared]]), **collate(rest, pad_id, multiple)}
