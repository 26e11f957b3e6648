"""Downstream use: a saved student fine-tunes as a plain ViTForImageClassification with the stock Trainer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file
from transformers import EvalPrediction, ViTForImageClassification, ViTImageProcessor, ViTModel

from attndistill_hf.data import eval_transform
from attndistill_hf.finetune import ViewTransform, accuracy, collate_views, label_names

from helpers import load_recipe, tiny_student

NUM_CLASSES = 10
CLASS_NAMES = [f"shade-{i}" for i in range(NUM_CLASSES)]


finetune = load_recipe("finetune")


def save_student(folder: Path) -> ViTModel:
    student = tiny_student()
    student.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        folder
    )
    return student


def write_split(path: Path, per_class: int, seed: int, corrupt: int = 0) -> Path:
    """Grayscale 'L' images whose brightness encodes the class (learnable in a few steps), as parquet.

    The first ``corrupt`` rows hold bytes that are no image, replacing that many valid ones.
    """
    rng = np.random.default_rng(seed)
    images: list[Any] = []
    labels: list[int] = []
    for label in range(NUM_CLASSES):
        for _ in range(per_class):
            level = 20 + 23 * label
            pixels = np.clip(level + rng.normal(0, 4, (20, 20)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels, mode="L"))
            labels.append(label)
    images[:corrupt] = [{"bytes": b"not an image", "path": None}] * corrupt
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASS_NAMES)})
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return path


def test_accuracy_is_top1_of_the_logits() -> None:
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.2, 0.1], [0.0, 0.0, 5.0]])
    labels = np.array([1, 0, 2, 2])
    assert accuracy(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.75}


def test_label_names_from_classlabel_or_integers() -> None:
    with_names = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["a", "b", "c"])}))
    assert label_names(with_names, "label", None) == ["a", "b", "c"]
    plain = Dataset.from_dict({"label": [0, 3, 1]})
    assert label_names(plain, "label", None) == ["class_0", "class_1", "class_2", "class_3"]
    assert label_names(plain, "label", 6)[-2:] == ["class_4", "class_5"]
    with pytest.raises(ValueError, match="at least 4"):
        label_names(plain, "label", 3)


def test_split_view_skips_undecodable_images_and_the_collator_counts_them() -> None:
    view = ViewTransform(eval_transform(16), "image", "label")
    buffer = io.BytesIO()
    Image.new("L", (20, 24), 90).save(buffer, format="PNG")
    good = {"bytes": buffer.getvalue(), "path": None}
    batch = view({"image": [good, {"bytes": b"not an image", "path": None}, good], "label": [3, 1, 4]})
    assert batch["pixel_values"][1] is None and batch["labels"] == [3, 1, 4]
    # The evaluation view is deterministic: the same image gives the same pixels.
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])
    examples = [{"pixel_values": pixels, "labels": label} for pixels, label in zip(*batch.values(), strict=True)]
    collated = collate_views(examples)
    assert collated["pixel_values"].shape == (2, 3, 16, 16)
    assert collated["labels"].tolist() == [3, 4] and int(collated["skipped_images"]) == 1
    empty = collate_views(examples[1:2])
    assert empty["pixel_values"].shape[0] == 0 and empty["labels"].numel() == 0 and int(empty["skipped_images"]) == 1


def test_saved_student_loads_as_classifier_with_ten_labels(tmp_path: Path) -> None:
    student = save_student(tmp_path)
    model = ViTForImageClassification.from_pretrained(tmp_path, num_labels=NUM_CLASSES)
    assert model.classifier.out_features == NUM_CLASSES
    # The backbone weights are the student's, not a fresh initialisation.
    torch.testing.assert_close(
        model.vit.embeddings.patch_embeddings.projection.weight, student.embeddings.patch_embeddings.projection.weight
    )
    torch.testing.assert_close(model.vit.layernorm.weight, student.layernorm.weight)


@pytest.mark.slow
def test_finetune_recipe_trains_a_few_steps(tmp_path: Path) -> None:
    student_dir = tmp_path / "student"
    student = save_student(student_dir)
    # 40 rows, one of them corrupt: every batch of 20 holds at most one bad image, never an empty batch.
    train = write_split(tmp_path / "train.parquet", per_class=4, seed=0, corrupt=1)
    evaluation = write_split(tmp_path / "eval.parquet", per_class=1, seed=1)
    out = tmp_path / "finetuned"
    metrics = finetune.main(
        [
            "--student_dir", str(student_dir),
            "--data_files", str(train),
            "--eval_data_files", str(evaluation),
            "--image_size", "32",
            "--output_dir", str(out),
            "--max_steps", "12",
            "--per_device_train_batch_size", "20",
            "--per_device_eval_batch_size", "10",
            "--learning_rate", "3e-3",
            "--warmup_steps", "0",
            "--logging_steps", "1",
            "--save_strategy", "no",
            "--report_to", "none",
            "--use_cpu",
            "--seed", "0",
            "--dataloader_num_workers", "0",
        ]
    )  # fmt: skip
    losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert 0.0 <= metrics["eval"]["eval_accuracy"] <= 1.0
    # 12 steps of 20 over 40 rows = 6 epochs, each meeting the corrupt image once.
    assert metrics["skipped_images"] == {"train": 6, "eval": 0}

    # The saved classifier reloads with plain transformers, its class names, and trained weights.
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.num_labels == NUM_CLASSES
    assert model.config.id2label[3] == "shade-3"
    saved = load_file(str(out / "model.safetensors"))
    assert saved["classifier.weight"].shape == (NUM_CLASSES, 32)
    moved = (
        model.vit.embeddings.patch_embeddings.projection.weight - student.embeddings.patch_embeddings.projection.weight
    )
    assert moved.abs().max() > 1e-4
    assert (out / "preprocessor_config.json").is_file()
    assert (out / "eval_results.json").is_file()


@pytest.mark.slow
def test_finetune_at_another_resolution_interpolates_positions(tmp_path: Path) -> None:
    student_dir = tmp_path / "student"
    save_student(student_dir)  # trained at 32 px
    train = write_split(tmp_path / "train.parquet", per_class=1, seed=2)
    metrics = finetune.main(
        [
            "--student_dir", str(student_dir),
            "--data_files", str(train),
            "--image_size", "48",
            "--max_train_samples", "4",
            "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1",
            "--per_device_train_batch_size", "4",
            "--save_strategy", "no",
            "--report_to", "none",
            "--use_cpu",
        ]
    )  # fmt: skip
    assert "eval" not in metrics  # no evaluation source configured
    assert np.isfinite(metrics["train"]["train_loss"])
    assert ViTForImageClassification.from_pretrained(tmp_path / "out").config.image_size == 32
