"""Linear-probe and semi-supervised evaluation (DINO's protocol) of any teacher or student.

    python recipes/eval_linear.py --model_name_or_path facebook/dino-vits16 --dataset_name ILSVRC/imagenet-1k \\
        --eval_split validation                                   # faithful: augmented images, 100 epochs
    python recipes/eval_linear.py --model_name_or_path outputs/student --dataset_name data/fashion_mnist \\
        --no_augment --epochs 20 --lr_sweep 0.1 1 10              # fast: cached features, lr sweep
    python recipes/eval_linear.py ... --label_fraction 0.01       # semi-supervised: 1% of the labels per class

A frozen backbone; a linear layer on the chosen features (by default DINO's choice for the model: the CLS
of the last 4 blocks, 'last4_cls', below hidden size 768 (ViT-S/T); last CLS + mean patch token,
'cls+avgpool', from 768 on (ViT-B); the results record which) trained with SGD (momentum 0.9, no weight
decay, lr 1e-3 x batch / 256, cosine). With augmentation (default) the training images get DINO's probe view
(RandomResizedCrop at torchvision's defaults: scale 0.08-1, bilinear; + flip) and pass through the backbone
every epoch; ``--no_augment`` extracts their features once with the evaluation view (resize 256/224
bicubic, centre crop) and trains on those (cacheable). The test set always gets the evaluation view. Images
are cropped to the model's configured image size unless ``--image_size`` says otherwise.
Single process. Prints a table and writes JSON. Importable: ``run_linear_eval_from_args(...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import (
    DataArguments,
    ImageCollator,
    dataloader_workers,
    eval_transform,
    load_split,
    probe_train_transform,
)
from attndistill_hf.evaluation import (
    EvalArguments,
    EvalDataArguments,
    LinearProbeConfig,
    add_results_to_card,
    class_count,
    load_eval_setup,
    run_linear_eval,
)


@dataclass
class ProbeArguments:
    """The linear probe's training (DINO's defaults)."""

    epochs: int = field(default=100, metadata={"help": "Training epochs of the linear layer."})
    base_lr: float = field(default=1e-3, metadata={"help": "Learning rate per 256 images (scaled by batch / 256)."})
    lr: float | None = field(default=None, metadata={"help": "Absolute learning rate; overrides --base_lr scaling."})
    lr_sweep: list[float] | None = field(
        default=None,
        metadata={"help": "Base learning rates trained in parallel heads on the same batches; the best is reported."},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay."})
    label_fraction: float | None = field(
        default=None,
        metadata={"help": "Semi-supervised: train on this fraction of the labels, per class (0.01 or 0.1 in DINO)."},
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "Train on augmented images (DINO's probe view: RandomResizedCrop, scale 0.08-1, bilinear, + flip) "
            "through the frozen backbone every epoch; --no_augment trains on features extracted once with the "
            "evaluation view (fast path)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the head initialisation, shuffling and label subset."})
    eval_every: int = field(
        default=1,
        metadata={
            "help": "Also score the heads on the test set every N epochs and report the best (epoch, lr) as "
            "best_epoch, the number DINO's linear evaluation prints (chosen on the test set); 0: final epoch only. "
            "The headline top1 is always the final epoch's."
        },
    )
    probe_device: str | None = field(
        default=None, metadata={"help": "Device of the linear heads (default: the model's device)."}
    )


def run_linear_eval_from_args(
    eval_args: EvalArguments, probe_args: ProbeArguments, data_args: DataArguments
) -> dict[str, Any]:
    """Load the model and both splits, train and score the probe, print the table, write the JSON."""
    setup = load_eval_setup(eval_args, data_args)
    data_args = setup.data_args
    model = setup.model.to("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = setup.mean, setup.std
    train_set = load_split(data_args, "train")
    test_set = load_split(data_args, "eval")
    streamed = not hasattr(train_set, "__len__")
    if probe_args.label_fraction is not None and streamed:
        raise ValueError("--label_fraction needs a non-streamed training set (drop --streaming).")

    view = eval_transform(data_args.image_size, mean, std)
    if probe_args.augment:
        view_train = probe_train_transform(data_args.image_size, mean, std)
        if streamed:
            train_set = train_set.shuffle(seed=probe_args.seed, buffer_size=data_args.shuffle_buffer_size)
    else:
        view_train = view

    def loader(dataset: Any, transform: Any, shuffle: bool) -> DataLoader:
        collator = ImageCollator(transform, data_args.image_column, data_args.label_column)
        return DataLoader(
            dataset,
            batch_size=eval_args.batch_size,
            shuffle=shuffle,
            num_workers=dataloader_workers(dataset, eval_args.num_workers),
            collate_fn=collator,
            generator=torch.Generator().manual_seed(probe_args.seed) if shuffle else None,
        )

    train_loader = loader(train_set, view_train, shuffle=probe_args.augment and not streamed)
    test_loader = loader(test_set, view, shuffle=False)
    train_labels = None
    if probe_args.label_fraction is not None:
        train_labels = torch.as_tensor(train_set[data_args.label_column])

    config = LinearProbeConfig(
        epochs=probe_args.epochs,
        batch_size=eval_args.batch_size,
        base_lr=probe_args.base_lr,
        lr=probe_args.lr,
        lr_sweep=tuple(probe_args.lr_sweep) if probe_args.lr_sweep else None,
        momentum=probe_args.momentum,
        weight_decay=probe_args.weight_decay,
        label_fraction=probe_args.label_fraction,
        seed=probe_args.seed,
        eval_every=probe_args.eval_every,
        device=probe_args.probe_device,
        progress=eval_args.progress,
    )
    results = run_linear_eval(
        model,
        train_loader,
        test_loader,
        kind=eval_args.feature_kind or "auto",
        config=config,
        augment=probe_args.augment,
        train_labels=train_labels,
        num_classes=eval_args.num_classes or class_count(train_set, data_args.label_column),
        cache_dir=eval_args.feature_cache_dir,
        output_json=eval_args.output_json,
        dtype=eval_args.dtype,
        extra=setup.metadata,
    )
    add_results_to_card(eval_args, data_args, results)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: ``[config.yaml|json] [--field value ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    eval_args, probe_args, data_args = parse_config_and_flags(
        (EvalArguments, ProbeArguments, EvalDataArguments), argv, description=__doc__.split("\n\n")[0]
    )
    return run_linear_eval_from_args(eval_args, probe_args, data_args)


if __name__ == "__main__":
    run_recipe(main)
