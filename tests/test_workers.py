"""A CPU step's batch in parts computed at once (train/workers.py): the same loss and gradients as the whole batch
in one piece, whichever part finishes first."""

from __future__ import annotations

import pytest
import torch

from tunesmith.models import load_model
from tunesmith.train import batches
from tunesmith.train.loss import completion_loss
from tunesmith.train.workers import StepWorkers, step_workers


def _examples(lengths: list[int], vocab: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_llama"])
def test_parts_at_once_give_the_whole_batch_loss_and_gradients(family, request):
    """Tolerance: 1e-5 of the largest gradient (fp32 sums in another order, padding to each part's own width)."""
    from tunesmith.config import LoraConfig
    from tunesmith.train.lora import apply_lora

    model = apply_lora(load_model(request.getfixturevalue(family), dtype=torch.float32), LoraConfig(r=4, alpha=8), 0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # a fresh adapter's B is zero: give A's gradient something to flow through
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    examples = _examples([37, 23, 41, 30], model.config.vocab_size)
    targets = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)

    whole, _ = completion_loss(model, batches.collate(examples, 0))
    (whole / targets).backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    workers = StepWorkers(2, 1)
    torch.set_num_threads(2)
    try:
        parts = workers.parts(list(range(4)))
        assert parts == [[0, 2], [1, 3]]
        loss = workers.gradients(params, parts, lambda part: completion_loss(
            model, batches.collate([examples[i] for i in part], 0))[0] / targets)
    finally:
        workers.close()
    assert torch.get_num_threads() == 2  # the workers' one thread each stays theirs
    assert loss == pytest.approx(whole.item() / targets, rel=1e-5)
    scale = max(g.abs().max().item() for g in expected)
    assert scale > 0
    for got, want in zip((p.grad for p in params), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)


def test_workers_only_where_they_apply():
    assert step_workers("cpu", 4, "auto", 1, False, 2).count == 2
    assert step_workers("cpu", 4, "auto", 1, False, 8).threads_each == 4
    for args in [("cuda", 4, "auto", 1, False, 2), ("cpu", 1, "auto", 1, False, 2), ("cpu", 4, 2, 1, False, 2),
                 ("cpu", 4, "auto", 2, False, 2), ("cpu", 4, "auto", 1, True, 2), ("cpu", 4, "auto", 1, False, 1)]:
        assert step_workers(*args) is None, args
