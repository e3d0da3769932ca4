"""Batches: widths rounded up on CPU change the shapes, never the loss."""

from __future__ import annotations

import torch

from tunesmith.models import load_model
from tunesmith.train import batches
from tunesmith.train.loss import completion_loss


def _examples() -> list[dict[str, list[int]]]:
    # prompt tokens are not trained (-100); answers of different lengths
    return [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * (n - 4) + list(range(5 + n - 4, 5 + n))}
            for n in (9, 13, 17)]


def test_widths_are_rounded_up_and_the_padding_is_masked():
    batch = batches.collate(_examples(), pad_id=0, multiple=32)
    assert batch["input_ids"].shape == (3, 32)
    assert batch["attention_mask"].sum(dim=1).tolist() == [9, 13, 17]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batches.collate(_examples(), pad_id=0)["input_ids"].shape == (3, 17)
    assert batches.pad_multiple("cpu") == 8 and batches.pad_multiple("cuda") == 1


def test_rounded_widths_give_the_same_loss(tiny_qwen3):
    model = load_model(tiny_qwen3).eval()
    with torch.no_grad():
        exact, n_exact = completion_loss(model, batches.collate(_examples(), pad_id=0))
        rounded, n_rounded = completion_loss(model, batches.collate(_examples(), pad_id=0, multiple=32))
    assert int(n_exact) == int(n_rounded) == 12
    assert abs(float(exact) - float(rounded)) <= 1e-4 * abs(float(exact))
