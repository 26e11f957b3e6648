"""Fine-tuning a distilled student as an image classifier with the stock ``Trainer``: views, collator, metric.

As in transformers' image-classification example, each split's dataset gets its own view through
``Dataset.with_transform`` (:class:`ViewTransform` with the training augmentation, or with the
deterministic evaluation view) and one collator batches both splits (:func:`collate_views`). Unlike the
example, an image that cannot be decoded is not fatal: the view gives None for it, the collator leaves it
out and counts it in the batch (``skipped_images``: DataLoader workers are other processes, so the count
has to ride with the data), and :class:`FinetuneTrainer` sums the counts per phase.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from datasets import ClassLabel, Dataset
from PIL import Image
from torch import nn
from transformers import EvalPrediction, Trainer

from .data.decoding import decode_image

logger = logging.getLogger(__name__)


def label_names(train: Dataset, label_column: str, num_labels: int | None) -> list[str]:
    """Class names for ``id2label``: the ClassLabel names, or ``class_<i>`` for plain integer labels.

    The class count comes from the ClassLabel feature when there is one (rare classes absent from a
    subset still get a logit), else from the largest label seen; ``num_labels`` may only enlarge it.
    """
    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        labels = train[label_column]
        if not labels:
            raise ValueError("The train split is empty: no labels to infer the number of classes from.")
        names = [f"class_{i}" for i in range(int(max(labels)) + 1)]
    if num_labels is not None:
        if num_labels < len(names):
            raise ValueError(f"num_labels={num_labels} but the labels need at least {len(names)} classes.")
        names += [f"class_{i}" for i in range(len(names), num_labels)]
    return names


class ViewTransform:
    """A ``Dataset.with_transform`` function that shows a split's images through ``transform``.

    Each image is decoded to RGB (:func:`~attndistill_hf.data.decoding.decode_image`) when the DataLoader
    workers read it; a batch of examples becomes ``{"pixel_values": [tensor or None], "labels": [int]}``,
    None where the image cannot be decoded, for :func:`collate_views` to skip and count. A class rather
    than a closure so that the dataset still pickles for workers started with ``spawn``.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], image_column: str, label_column: str) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        images = [decode_image(value) for value in batch[self.image_column]]
        return {
            "pixel_values": [None if image is None else self.transform(image) for image in images],
            "labels": [int(label) for label in batch[self.label_column]],
        }


def collate_views(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """One batch of either split from examples of :class:`ViewTransform`.

    Returns ``{"pixel_values": float [B', 3, H, W], "labels": long [B'], "skipped_images": long scalar}``,
    where B' leaves out the examples whose image failed to decode. When all of them failed, both tensors
    have 0 rows and :class:`FinetuneTrainer` does not run the model on the batch.
    """
    kept = [example for example in examples if example["pixel_values"] is not None]
    pixel_values = torch.stack([example["pixel_values"] for example in kept]) if kept else torch.empty(0)
    return {
        "pixel_values": pixel_values,
        "labels": torch.tensor([example["labels"] for example in kept], dtype=torch.long),
        "skipped_images": torch.tensor(len(examples) - len(kept), dtype=torch.long),
    }


class FinetuneTrainer(Trainer):
    """The stock ``Trainer`` on batches of :func:`collate_views`, which skip undecodable images.

    - ``skipped_images`` is popped from each batch before the model sees it and summed per phase in
      ``self.skipped_images``.
    - A batch whose images all failed to decode is not run (a mean over zero rows is NaN and would
      poison the weights); training takes a zero loss step on it instead.
    - ``interpolate_pos_encoding`` is passed when the crop size differs from the student's resolution.
    """

    def __init__(self, *args: Any, interpolate_pos_encoding: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.skipped_images = {"train": 0, "eval": 0}

    def _model_inputs(self, inputs: dict[str, Any], phase: str) -> dict[str, Any]:
        skipped = inputs.pop("skipped_images", None)
        if skipped is not None:
            self.skipped_images[phase] += int(torch.as_tensor(skipped).sum())
        if self.interpolate_pos_encoding:
            inputs["interpolate_pos_encoding"] = True
        return inputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = self._model_inputs(inputs, "train" if model.training else "eval")
        if inputs["pixel_values"].shape[0] == 0:
            logger.warning("Every image of a batch failed to decode; taking a zero step.")
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (zero, None) if return_outputs else zero
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._model_inputs(inputs, "eval")
        if inputs["pixel_values"].shape[0] == 0:
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy of the logits against the labels."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {
        "accuracy": torch.as_tensor(logits).argmax(-1).eq(torch.as_tensor(prediction.label_ids)).float().mean().item()
    }
