"""Packing: examples into fixed-size token buffers whose documents never see each other.

Every buffer has the same length, so the compiled model sees one shape for the whole run, and no
token is padding except a short tail. Each buffer carries where its documents start and end
(`doc_ids`, `cu_seqlens`, `position_ids` restarting at 0), which the model turns into a block-diagonal
causal attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One buffer of `seq_len` tokens holding whole documents back to back, then padding.

    `targets[t]` is the token position t must predict (the example's label at t + 1), already shifted
    inside each document: the last token of a document and the padding predict nothing (-100).
    The padding tail is a document of its own, so every token belongs to exactly one document.
    """

    input_ids: torch.Tensor  # (seq_len,) int64
    targets: torch.Tensor  # (seq_len,) int64, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (seq_len,) int64, restarting at 0 in each document
    doc_ids: torch.Tensor  # (seq_len,) int32, 0, 0, ..., 1, 1, ...; the padding tail has its own id
    cu_seqlens: torch.Tensor  # (documents + 1,) int32, document boundaries (padding tail included)
    num_tokens: int  # tokens of real documents (not padding)
    num_targets: int  # tokens that carry a loss

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)


def pack(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int = 0
) -> list[PackedBatch]:
    """Pack (input_ids, labels) examples into buffers of exactly `seq_len` tokens, best fit decreasing.

    Labels follow the Hugging Face convention (aligned with input_ids, -100 on tokens without loss).
    An example is never split across buffers; one longer than `seq_len` is an error (the data layer
    truncates or drops over-long examples first). The order of buffers follows the packing, not the
    input: shuffle the returned list per epoch.
    """
    for ids, labels in examples:
        if len(ids) != len(labels):
            raise ValueError(f"input_ids and labels differ in length: {len(ids)} != {len(labels)}")
        if len(ids) > seq_len:
            raise ValueError(f"an example of {len(ids)} tokens does not fit seq_len={seq_len}")
    bins: list[list[int]] = []
    room: list[int] = []
    # Best fit decreasing (as TRL's `pack_dataset(strategy="bfd")`, without needing a datasets.Dataset):
    # longest first, each into the fullest buffer it still fits. Measured on the bench's lengths
    # (uniform 64-512): buffers 98.9% full at 4,096 tokens, where padding each batch of 16 to its
    # longest wastes ~40% of the compute.
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        best = min((j for j, r in enumerate(room) if r >= n), key=lambda j: room[j], default=None)
        if best is None:
            bins.append([i])
            room.append(seq_len - n)
        else:
            bins[best].append(i)
            room[best] -= n
    return [_build([examples[i] for i in b], seq_len, pad_id) for b in bins]


def _build(docs: list[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int) -> PackedBatch:
    input_ids, targets, positions, doc_ids, lengths = [], [], [], [], []
    for d, (ids, labels) in enumerate(docs):
        input_ids += list(ids)
        targets += list(labels[1:]) + [IGNORE_INDEX]
        positions += range(len(ids))
        doc_ids += [d] * len(ids)
        lengths.append(len(ids))
    used = len(input_ids)
    if used < seq_len:
        pad = seq_len - used
        input_ids += [pad_id] * pad
        targets += [IGNORE_INDEX] * pad
        positions += range(pad)
        doc_ids += [len(docs)] * pad
        lengths.append(pad)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    t = torch.tensor(targets, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        targets=t,
        position_ids=torch.tensor(positions, dtype=torch.long),
        doc_ids=torch.tensor(doc_ids, dtype=torch.int32),
        cu_seqlens=cu,
        num_tokens=used,
        num_targets=int((t != IGNORE_INDEX).sum()),
    )
