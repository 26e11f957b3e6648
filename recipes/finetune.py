"""Fine-tune a distilled student on a labelled image dataset: the downstream use of a published model.

The student folder (or Hub id) is a plain transformers ``ViTModel``; ``ViTForImageClassification``
loads it with a fresh classification head and the standard ``Trainer`` fine-tunes it. Nothing here
needs this library's own model code, which is the point: a distilled student is an ordinary checkpoint.

    python recipes/finetune.py --student_dir outputs/student --dataset data/fashion-mnist \\
        --output_dir outputs/finetuned --num_train_epochs 3 --per_device_train_batch_size 64

Data is anything ``datasets.load_dataset`` reads: a local folder with a dataset card (as written by
``attndistill_hf.fashion_mnist``), a Hub id, or a builder (``parquet``, ``imagefolder``) with
``--train_files`` / ``--eval_files``. A single ``.yaml`` / ``.json`` argument is read as a config file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from PIL import Image
from torchvision.transforms import v2
from transformers import (
    AutoImageProcessor,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

logger = logging.getLogger(__name__)

EVAL_SPLIT_CANDIDATES = ("validation", "test", "eval")


@dataclass
class ModelArguments:
    """Which student to fine-tune and how many classes its new head has."""

    student_dir: str = field(metadata={"help": "Folder or Hub id of the distilled student (a ViTModel)."})
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Classes of the new head; inferred from the label column when not given."},
    )


@dataclass
class FinetuneDataArguments:
    """Where the labelled images are and which columns hold them."""

    dataset: str = field(
        metadata={"help": "Dataset folder / Hub id, or a builder name (parquet, imagefolder) with *_files."}
    )
    train_files: list[str] | None = field(default=None, metadata={"help": "Data files of the train split."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "Data files of the eval split."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (default: validation, test or eval, if present)."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding integer class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
    min_crop_scale: float = field(default=0.2, metadata={"help": "Lower scale bound of RandomResizedCrop."})


def load_splits(data_args: FinetuneDataArguments) -> tuple[Dataset, Dataset | None]:
    """The train split and the evaluation split (None when the dataset has none)."""
    data_files: dict[str, list[str]] = {}
    if data_args.train_files:
        data_files["train"] = list(data_args.train_files)
    if data_args.eval_files:
        data_files["eval"] = list(data_args.eval_files)
    loaded = load_dataset(data_args.dataset, data_files=data_files or None)
    if not isinstance(loaded, DatasetDict):
        raise TypeError(f"Expected a dataset with named splits from {data_args.dataset!r}, got {type(loaded)}.")
    train_split = "train" if data_args.train_files else data_args.train_split
    if train_split not in loaded:
        raise ValueError(f"No split {train_split!r} in {data_args.dataset!r}; it has {sorted(loaded)}.")
    eval_split = "eval" if data_args.eval_files else data_args.eval_split
    if eval_split is None:
        eval_split = next((name for name in EVAL_SPLIT_CANDIDATES if name in loaded), None)
    elif eval_split not in loaded:
        raise ValueError(f"No split {eval_split!r} in {data_args.dataset!r}; it has {sorted(loaded)}.")
    train = loaded[train_split]
    evaluation = loaded[eval_split] if eval_split is not None else None
    for name, split in (("train", train), ("eval", evaluation)):
        if split is None:
            continue
        missing = {data_args.image_column, data_args.label_column} - set(split.column_names)
        if missing:
            raise ValueError(f"The {name} split lacks column(s) {sorted(missing)}; it has {split.column_names}.")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


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


def build_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float], min_crop_scale: float
) -> tuple[v2.Compose, v2.Compose]:
    """Train (random resized crop + flip) and eval (resize + center crop) transforms to normalised tensors."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
    train = v2.Compose(
        [
            v2.RandomResizedCrop(
                image_size, scale=(min_crop_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            *to_tensor,
        ]
    )
    evaluation = v2.Compose(
        [
            v2.Resize(round(image_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *to_tensor,
        ]
    )
    return train, evaluation


class ClassificationCollator:
    """Rows of (PIL image, label) to ``{"pixel_values", "labels"}``; images are converted to RGB.

    Unreadable images are skipped and counted (``self.skipped``) rather than failing a long run; a
    batch with no readable image at all is an error, since there is nothing to train on.
    """

    def __init__(self, transform: v2.Compose, image_column: str, label_column: str) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.skipped = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels: list[torch.Tensor] = []
        labels: list[int] = []
        for row in rows:
            try:
                image = row[self.image_column]
                if not isinstance(image, Image.Image):
                    raise TypeError(f"not an image: {type(image).__name__}")
                pixels.append(self.transform(image.convert("RGB")))
            except (OSError, ValueError, TypeError) as exc:
                self.skipped += 1
                logger.warning("Skipping an unreadable image (%s).", exc)
                continue
            labels.append(int(row[self.label_column]))
        if not pixels:
            raise ValueError(f"None of the {len(rows)} images in this batch could be read.")
        return {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.long)}


class FinetuneTrainer(Trainer):
    """``Trainer`` whose evaluation batches use their own collator (the deterministic eval transform).

    The stock Trainer has one ``data_collator`` for every loader, so evaluation during training would
    otherwise see the training augmentation and report a noisier accuracy.
    """

    def __init__(self, *args: Any, eval_data_collator: ClassificationCollator | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def _with_eval_collator(self, make: Any) -> torch.utils.data.DataLoader:
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
) -> tuple[ModelArguments, FinetuneDataArguments, TrainingArguments]:
    """Command-line flags, or a single ``.yaml`` / ``.json`` config file, into the three argument groups."""
    parser = HfArgumentParser((ModelArguments, FinetuneDataArguments, TrainingArguments))
    argv = list(sys.argv[1:] if args is None else args)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(Path(argv[0]).resolve())
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(Path(argv[0]).resolve())
    return parser.parse_args_into_dataclasses(args=argv)


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and save; return the train (and eval) metrics and the log history."""
    model_args, data_args, training_args = parse_args(args)
    # The collator needs the image column, which the Trainer would otherwise drop as unused by forward.
    training_args.remove_unused_columns = False

    train, evaluation = load_splits(data_args)
    names = label_names(train, data_args.label_column, model_args.num_labels)
    processor = AutoImageProcessor.from_pretrained(model_args.student_dir)
    model = ViTForImageClassification.from_pretrained(
        model_args.student_dir,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    image_size = model.config.image_size
    train_tf, eval_tf = build_transforms(
        image_size, processor.image_mean, processor.image_std, data_args.min_crop_scale
    )
    train_collator = ClassificationCollator(train_tf, data_args.image_column, data_args.label_column)
    eval_collator = ClassificationCollator(eval_tf, data_args.image_column, data_args.label_column)

    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        compute_metrics=accuracy,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics: dict[str, Any] = {"train": dict(result.metrics), "skipped_images": train_collator.skipped}
    trainer.save_model()
    trainer.save_state()

    if evaluation is not None:
        metrics["eval"] = trainer.evaluate()
        metrics["skipped_images"] += eval_collator.skipped
        trainer.save_metrics("eval", metrics["eval"])
    trainer.save_metrics("train", metrics["train"])
    metrics["log_history"] = list(trainer.state.log_history)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
