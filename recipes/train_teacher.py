"""Train the demo teacher: a small **supervised** ViT on Fashion-MNIST, on a CPU, in a few minutes.

    python recipes/train_teacher.py --data_dir data/fashion_mnist --output_dir outputs/demo-teacher

transformers' ``ViTForImageClassification`` (4 layers, width 96, 4 heads, patch 4 on 32 px RGB crops)
learns the ten Fashion-MNIST classes with ``Trainer``; its backbone is saved as a plain ``ViTModel``
with its image processor, a model card stating its k-NN top-1 on the test split (measured at the end of
the run) and ``teacher_recipe.json`` (the recipe, its hash and the measured numbers). A later run with
the same recipe and the same data reuses the teacher instead of training it again.

The images are the parquet shards of ``recipes/prepare_fashion_mnist.py``. What the teacher is and why
it is supervised: ``attndistill_hf/demo/pipeline.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.demo.pipeline import TeacherRecipe, TeacherRunArguments, train_teacher


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python recipes/train_teacher.py [config.yaml] [--flag value ...]``; ``--help`` lists every field."""
    recipe, run = parse_config_and_flags((TeacherRecipe, TeacherRunArguments), argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = train_teacher(recipe, run)
    top1 = record["knn"]["knn"]["20"]["top1"]
    state = "reused" if record["reused"] else f"trained in {record['train_time_s']:.0f} s"
    print(f"Teacher {state}: {run.output_dir} (k-NN top-1, k=20: {top1:.2f}%, recipe {record['recipe_hash']})")
    return record


if __name__ == "__main__":
    run_recipe(main)
