"""Fine-tune a distilled student on a labelled image dataset: the downstream use of a published model.

The student folder (or Hub id) is a plain transformers ``ViTModel``; ``ViTForImageClassification``
loads it with a fresh classification head and the standard ``Trainer`` fine-tunes it. Nothing here
needs this library's model code, which is the point: a distilled student is an ordinary checkpoint.

    python recipes/finetune.py --student_dir outputs/student --data_files 'data/train-*.parquet' \
        --eval_data_files 'data/test-*.parquet' --image_size 224 --output_dir outputs/finetuned \
        --num_train_epochs 3 --per_device_train_batch_size 64

The data flags are the library's ``DataArguments`` (``--dataset_name``, ``--train_dir`` / ``--eval_dir``,
``--data_files`` / ``--eval_data_files``, columns, sample limits, ``--image_size``), read by the same
loader and collator as distillation, so undecodable images are skipped and counted rather than fatal.
A ``.yaml`` / ``.json`` config file may come first; flags after it override its values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import ClassLabel, Dataset
from torch import nn
from transformers import (
    AutoImageProcessor,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import (
    DataArguments,
    ImageCollator,
    eval_transform,
    image_stats,
    load_split,
    require_label_column,
    train_transform,
)
from attndistill_hf.models import check_model_location

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which student to fine-tune and how many classes its new head has."""

    student_dir: str = field(metadata={"help": "Folder or Hub id of the distilled student (a ViTModel)."})
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Classes of the new head; inferred from the label column when not given."},
    )

    def __post_init__(self) -> None:
        self.student_dir = check_model_location(self.student_dir, role="student")


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


class FinetuneTrainer(Trainer):
    """The stock ``Trainer``, adapted to the library's image collator (which skips undecodable images).

    - Evaluation batches use their own collator (the deterministic eval view): the stock Trainer has one
      ``data_collator`` for every loader, so evaluation would otherwise see the training augmentation.
    - ``skipped_images`` is popped from each batch before the model sees it and summed per phase. The
      count rides in the batch, not in the collator, because DataLoader workers are other processes.
    - A batch whose images all failed to decode is not run (a mean over zero rows is NaN and would
      poison the weights); training takes a zero loss step on it instead.
    - ``interpolate_pos_encoding`` is passed when the crop size differs from the student's resolution.
    """

    def __init__(
        self,
        *args: Any,
        eval_data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
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

    def _with_eval_collator(self, make: Callable[[], torch.utils.data.DataLoader]) -> torch.utils.data.DataLoader:
        if self.eval_data_collator is None:
            return make()
        train_collator = self.data_collator
        self.data_collator = self.eval_data_collator
        try:
            return make()
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        return self._with_eval_collator(lambda: super(FinetuneTrainer, self).get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset: Any) -> torch.utils.data.DataLoader:
        return self._with_eval_collator(lambda: super(FinetuneTrainer, self).get_test_dataloader(test_dataset))


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy of the logits against the labels."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {
        "accuracy": torch.as_tensor(logits).argmax(-1).eq(torch.as_tensor(prediction.label_ids)).float().mean().item()
    }


def parse_args(
    args: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """``[config.yaml|json] [--flag value ...]`` into the three argument groups (flags override the file)."""
    return parse_config_and_flags((ModelArguments, DataArguments, TrainingArguments), args, description=__doc__)


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and save; return the train (and eval) metrics, skipped counts and log history."""
    model_args, data_args, training_args = parse_args(args)
    if data_args.streaming:
        raise ValueError("Fine-tuning reads a prepared (map-style) dataset; drop --streaming.")
    if data_args.gpu_augment:
        raise ValueError("--gpu_augment is for distillation; fine-tuning augments in the DataLoader workers.")
    # The collator needs the image column, which the Trainer would otherwise drop as unused by forward.
    training_args.remove_unused_columns = False

    train = load_split(data_args, "train")
    evaluation = load_split(data_args, "eval") if data_args.eval_source is not None else None
    for name, split in (("train", train), ("eval", evaluation)):
        if split is not None:
            require_label_column(split, data_args.label_column, f"{name} data", "Set --label_column.")
    names = label_names(train, data_args.label_column, model_args.num_labels)
    processor = AutoImageProcessor.from_pretrained(model_args.student_dir)
    model = ViTForImageClassification.from_pretrained(
        model_args.student_dir,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    size = data_args.image_size
    configured = model.config.image_size
    interpolate = size != (configured if isinstance(configured, int) else configured[0])
    if interpolate:
        logger.info(
            "Fine-tuning at %d px, the student was trained at %s px: interpolating positions.", size, configured
        )
    mean, std = image_stats(processor)
    train_collator = ImageCollator(train_transform(size, mean, std), data_args.image_column, data_args.label_column)
    eval_collator = ImageCollator(eval_transform(size, mean, std), data_args.image_column, data_args.label_column)

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        interpolate_pos_encoding=interpolate,
        processing_class=processor,
        compute_metrics=accuracy,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics: dict[str, Any] = {"train": dict(result.metrics)}
    trainer.save_model()
    trainer.save_state()
    trainer.save_metrics("train", metrics["train"])
    if evaluation is not None:
        metrics["eval"] = trainer.evaluate()
        trainer.save_metrics("eval", metrics["eval"])
    metrics["skipped_images"] = dict(trainer.skipped_images)
    metrics["log_history"] = list(trainer.state.log_history)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_recipe(main)
