"""Weighted k-NN evaluation (DINO's protocol) of any teacher or student, on any dataset source.

    python recipes/eval_knn.py --model_name_or_path facebook/dino-vits16 --dataset_name ILSVRC/imagenet-1k \\
        --eval_split validation
    python recipes/eval_knn.py --model_name_or_path outputs/student --dataset_name data/fashion_mnist \\
        --output_json outputs/student/knn.json
    python recipes/eval_knn.py config.yaml --ks 20          # a YAML/JSON file of the same fields, flags on top
    accelerate launch --num_processes 4 recipes/eval_knn.py ...   # features gathered across processes

The memory bank is the training source, the queries the evaluation source; both use the evaluation
view (resize to 256/224 of the image size, centre crop) at the model's configured image size unless
``--image_size`` says otherwise. A k larger than the memory bank is reported as the bank's size (every
train image votes), in the table, the JSON and the model card. Prints a table and writes JSON.
Importable: ``run_knn_eval_from_args(eval_args, knn_args, data_args)`` runs it without a subprocess.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import DataArguments, eval_view_loader
from attndistill_hf.evaluation import (
    DEFAULT_KNN_KS,
    EvalArguments,
    EvalDataArguments,
    add_results_to_card,
    class_count,
    load_eval_setup,
    run_knn_eval,
)


@dataclass
class KNNArguments:
    """The k-NN protocol's parameters."""

    ks: list[int] = field(
        default_factory=lambda: list(DEFAULT_KNN_KS),
        metadata={"help": "Numbers of neighbours to report (one larger than the memory bank: the bank's size)."},
    )
    temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(similarity / temperature)."})


def run_knn_eval_from_args(
    eval_args: EvalArguments, knn_args: KNNArguments, data_args: DataArguments
) -> dict[str, Any]:
    """Load the model and both splits, run the k-NN evaluation, print the table, write the JSON."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    setup = load_eval_setup(eval_args, data_args)
    data_args = setup.data_args
    views = {"batch_size": eval_args.batch_size, "num_workers": eval_args.num_workers}
    train_loader, train_set = eval_view_loader(data_args, "train", setup.mean, setup.std, **views)
    test_loader, _ = eval_view_loader(data_args, "eval", setup.mean, setup.std, **views)
    model = setup.model.to(accelerator.device)
    train_loader, test_loader = accelerator.prepare(train_loader, test_loader)
    kind = eval_args.feature_kind or "cls"
    results = run_knn_eval(
        model,
        train_loader,
        test_loader,
        kind=kind,
        ks=knn_args.ks,
        temperature=knn_args.temperature,
        num_classes=eval_args.num_classes or class_count(train_set, data_args.label_column),
        accelerator=accelerator,
        cache_dir=eval_args.feature_cache_dir,
        output_json=eval_args.output_json,
        dtype=eval_args.dtype,
        progress=eval_args.progress,
        extra=setup.metadata,
    )
    if accelerator.is_main_process:
        add_results_to_card(eval_args, data_args, results)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: ``[config.yaml|json] [--field value ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    eval_args, knn_args, data_args = parse_config_and_flags(
        (EvalArguments, KNNArguments, EvalDataArguments), argv, description=__doc__.split("\n\n")[0]
    )
    return run_knn_eval_from_args(eval_args, knn_args, data_args)


if __name__ == "__main__":
    run_recipe(main)
