"""Fine-tune a distilled student on a labelled image dataset: the downstream use of a published model.

The student folder (or Hub id) is a plain transformers ``ViTModel``; ``ViTForImageClassification``
loads it with a fresh classification head and the standard ``Trainer`` fine-tunes it. Nothing here
needs this library's model code, which is the point: a distilled student is an ordinary checkpoint.

    python recipes/finetune.py --student_dir outputs/student --data_files 'data/train-*.parquet' \
        --eval_data_files 'data/test-*.parquet' --image_size 224 --output_dir outputs/finetuned \
        --num_train_epochs 3 --per_device_train_batch_size 64

The data flags are the library's ``DataArguments`` (``--dataset_name``, ``--train_dir`` / ``--eval_dir``,
``--data_files`` / ``--eval_data_files``, columns, sample limits, ``--image_size``), read by the same
loader as distillation. As in transformers' image-classification example, each split gets its own view
(the training augmentation, the deterministic evaluation view) and one collator batches both;
undecodable images are skipped and counted rather than fatal (``attndistill_hf.finetune``).
A ``.yaml`` / ``.json`` config file may come first; flags after it override its values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoImageProcessor, TrainingArguments, ViTForImageClassification

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import (
    DataArguments,
    eval_transform,
    image_stats,
    load_split,
    require_label_column,
    train_transform,
)
from attndistill_hf.finetune import FinetuneTrainer, ViewTransform, accuracy, collate_views, label_names
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
    # The split views read the image column, which the Trainer would otherwise drop as unused by forward.
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
    columns = (data_args.image_column, data_args.label_column)
    train = train.with_transform(ViewTransform(train_transform(size, mean, std), *columns))
    if evaluation is not None:
        evaluation = evaluation.with_transform(ViewTransform(eval_transform(size, mean, std), *columns))

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate_views,
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
