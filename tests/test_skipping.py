"""Skipped batches: a non-finite loss, a batch without a readable image, fp16 overflow; no empty update."""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import pytest
import torch

from attndistill_hf.skipping import NonFiniteLossError, UnreadableDataError
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import PixelDataset, RecordWeights, tiny_run_config, tiny_student, tiny_teacher


class PoisonedWindow(PixelDataset):
    """Images whose reads number ``first``..``last`` (counting from 0) are NaN: one whole update at batch 8."""

    def __init__(self, first: int = 8, last: int = 15) -> None:
        super().__init__()
        self.reads, self.first, self.last = 0, first, last

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        if self.first <= self.reads <= self.last:
            item = {"pixel_values": torch.full_like(item["pixel_values"], float("nan"))}
        self.reads += 1
        return item


def run_with_poisoned_second_update(
    tmp_path: Path, scaler: torch.amp.GradScaler | None = None, **overrides
) -> tuple[AttnDistillTrainer, RecordWeights]:
    record = RecordWeights()
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, **{"max_steps": 3, "max_grad_norm": 0.0, **overrides}),
        train_dataset=PoisonedWindow(),
        callbacks=[record],
    )
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # what Accelerate creates for fp16 on a GPU
    trainer.train()
    assert trainer.skips.nonfinite_steps == 1
    return trainer, record


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=0, rtol=0)


class UnreadableBatches:
    """A collator whose chosen calls (counting from 1) hold no readable image, as ImageCollator gives them."""

    def __init__(self, unreadable: Container[int]) -> None:
        self.calls, self.unreadable = 0, unreadable

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.calls += 1
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        if self.calls in self.unreadable:
            return {"pixel_values": pixel_values[:0], "skipped_images": torch.tensor(len(items))}
        return {"pixel_values": pixel_values, "skipped_images": torch.tensor(0)}


def test_nonfinite_batch_is_skipped_and_stops_the_run_when_repeated(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_consecutive_nonfinite_steps=2),
        train_dataset=PixelDataset(),
    )
    trainer.create_optimizer()
    bad = {"pixel_values": torch.full((2, 3, 32, 32), float("nan"))}
    trainer._validated = True  # input validation happens on the first step; here the NaN must be survived
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, bad)
    assert loss.item() == 0.0 and trainer.skips.nonfinite_steps == 1
    # The whole update was skipped: no gradient reaches the optimizer (zeros would still move AdamW).
    assert all(p.grad is None for p in trainer.model.parameters())
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        trainer.training_step(trainer.model, bad)


def test_an_update_with_only_nonfinite_batches_changes_nothing(tmp_path: Path) -> None:
    # AdamW with weight decay after a real first step: zero gradients alone would still move every weight.
    after = run_with_poisoned_second_update(tmp_path)[1].after_step
    assert_same(after[0], after[1])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])  # training goes on


def test_a_batch_without_a_readable_image_is_skipped_and_a_run_without_any_stops(tmp_path: Path) -> None:
    record = RecordWeights()
    args = tiny_run_config(tmp_path, max_steps=3)
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        args,
        train_dataset=PixelDataset(),
        data_collator=UnreadableBatches({2}),
        callbacks=[record],
    )
    trainer.train()
    after = record.after_step
    assert_same(after[0], after[1])  # the second update had nothing to learn from
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert (trainer.skips.skipped_images, trainer.skips.nonfinite_steps) == (8, 0)

    def unreadable_run(**overrides: int) -> AttnDistillTrainer:
        return AttnDistillTrainer(
            tiny_student(),
            tiny_teacher(),
            tiny_run_config(tmp_path, **overrides),
            train_dataset=PixelDataset(),
            data_collator=UnreadableBatches(range(1, 100)),
        )

    with pytest.raises(UnreadableDataError, match=r"^3 batches in a row held no readable image \(24 unreadable images"):
        unreadable_run(max_steps=5, max_consecutive_nonfinite_steps=3).train()
    with pytest.raises(UnreadableDataError, match=r"^No training batch held a readable image: 16 unreadable images"):
        unreadable_run(max_steps=2).train()  # fewer batches than the limit in a row


def test_a_batch_transform_that_decodes_nothing_is_skipped_like_an_unreadable_batch(tmp_path: Path) -> None:
    """GPU decoding (a batch_transform) can find no readable image in a batch too: skipped, no crash."""
    record = RecordWeights()
    unreadable = UnreadableBatches({2})

    def decode(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unreadable([{"pixel_values": image} for image in batch["pixel_values"]])

    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_steps=3),
        train_dataset=PixelDataset(),
        batch_transform=decode,
        callbacks=[record],
    )
    trainer.train()
    after = record.after_step
    assert_same(after[0], after[1])  # the second update had nothing to learn from
    assert (trainer.skips.skipped_images, trainer.skips.nonfinite_steps) == (8, 0)


def test_fp16_grad_scaler_skips_the_poisoned_update_and_backs_off(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    after = run_with_poisoned_second_update(tmp_path, scaler)[1].after_step
    assert_same(after[0], after[1])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert scaler.get_scale() == 2.0**9  # the skipped update counted as one overflow


def test_fp16_without_a_grad_scaler_is_refused_and_bf16_needs_none(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs a gradient scaler"):
        AttnDistillTrainer(
            tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, fp16=True), train_dataset=PixelDataset()
        )
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, bf16=True), train_dataset=PixelDataset()
    )
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.scaler is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_scales_the_loss_and_skips_a_poisoned_update(tmp_path: Path) -> None:
    trainer, record = run_with_poisoned_second_update(tmp_path, use_cpu=False, fp16=True)
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert_same(record.after_step[0], record.after_step[1])
    assert any(not torch.equal(record.after_step[1][k], record.after_step[2][k]) for k in record.after_step[1])
    assert scaler.get_scale() < 2.0**16  # the poisoned update backed the default initial scale off
