"""Batches: widths rounded up on CPU change the shapes, never the loss."""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, gemma_checkpoint):
    from tunesmith import testing

    return testing.tiny_family_checkpoint(tmp_path_factory.mktemp("gemma3") / "base", "gemma3")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_packed_rows_give_the_same_loss_and_gradients_as_padded_batches(family, request):
    """train.packing: one row per batch, attention kept inside each example by position ids. The loss summed over
    trained tokens and every gradient equal the padded batch's within fp32 rounding (1e-5 of the largest value):
    the same sums in another order. Gemma 3 also runs its sliding-window layers through the packed mask."""
    model = load_model(request.getfixturevalue(f"tiny_{family}")).train()
    examples = _examples()

    def loss_and_grads(batch):
        model.zero_grad()
        loss, count = completion_loss(model, batch)
        loss.backward()
        return float(loss), int(count), {name: p.grad.clone() for name, p in model.named_parameters()
                                         if p.grad is not None}

    padded = loss_and_grads(batches.collate(examples, pad_id=0, multiple=8))
    packed_batch = batches.collate_packed(examples)
    assert packed_batch["input_ids"].shape == (1, 9 + 13 + 17) and "attention_mask" not in packed_batch
    assert packed_batch["position_ids"][0].tolist() == [*range(9), *range(13), *range(17)]
    packed = loss_and_grads(packed_batch)
    assert packed[1] == padded[1] == 12
    assert abs(packed[0] - padded[0]) <= 1e-5 * abs(padded[0])
    assert padded[2].keys() == packed[2].keys() and padded[2]
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()) + 1e-12)


def test_the_shared_prefix_is_the_untrained_start_every_example_has():
    start = list(range(100, 110))
    examples = [{"input_ids": start + tail, "labels": [-100] * (10 + 2) + tail[2:]}
                for tail in ([1, 2, 3, 4], [1, 5, 6], [1, 2, 7, 8, 9])]
    assert batches.shared_prefix(examples) == 11  # the 10 shared tokens and the 1 all three continue with
    examples[1]["labels"][11] = 5  # position 10 now predicts a trained token in one example
    assert batches.shared_prefix(examples) == 10
    assert batches.shared_prefix(examples[:1]) == 0  # alone: nothing to share
    short = [{"input_ids": list(range(5)) + [9], "labels": [-100] * 6}] * 2
    assert batches.shared_prefix(short) == 0  # under MIN_SHARED_PREFIX tokens
    batch = batches.collate_shared_prefix(examples, pad_id=0)
    assert batch["prefix_ids"].tolist() == [start]
    assert batch["input_ids"].shape == (3, 5) and batch["attention_mask"].sum(dim=1).tolist() == [4, 3, 5]


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients(family, request):
    """The common start computed once per batch through a KV cache: the same loss and gradients as the padded
    batch, within fp32 rounding (1e-5 of the largest value), as for packed rows."""
    model = load_model(request.getfixturevalue(f"tiny_{family}")).train()
    start = list(range(200, 212))
    examples = [{"input_ids": start + e["input_ids"], "labels": [-100] * 12 + e["labels"]} for e in _examples()]

    def loss_and_grads(batch):
        model.zero_grad()
        loss, count = completion_loss(model, batch)
        loss.backward()
        return float(loss), int(count), {name: p.grad.clone() for name, p in model.named_parameters()
                                         if p.grad is not None}

    padded = loss_and_grads(batches.collate(examples, pad_id=0, multiple=8))
    shared_batch = batches.collate_shared_prefix(examples, pad_id=0, multiple=8)
    assert shared_batch["prefix_ids"].shape == (1, 12 + 4)  # _examples() share their first 4 prompt tokens too
    shared = loss_and_grads(shared_batch)
    assert shared[1] == padded[1] == 12
    assert abs(shared[0] - padded[0]) <= 1e-5 * abs(padded[0])
    assert padded[2].keys() == shared[2].keys() and padded[2]
    for name, grad in padded[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()) + 1e-12)
