"""The AttnDistill demo: real data, a real teacher, a distilled student and its baselines, on a CPU.

    make demo                      # = python recipes/demo.py
    python recipes/demo.py --quick --output_root /tmp/demo   # a small slice (the test suite runs this)

Four stages, each with a progress bar, all offline:

1. **Data**: Fashion-MNIST written as parquet shards (``recipes/prepare_fashion_mnist.py``), a
   class-balanced subset of the train split and a held-out subset of the test split.
2. **Teacher**: a small supervised ViT (patch 4, 4 heads) trained with ``Trainer`` as
   ``recipes/train_teacher.py`` trains it, or reused when ``<output_root>/demo-teacher`` already holds
   one made with the same recipe and data.
3. **Distillation**: ``accelerate launch --num_processes 1 --cpu recipes/distill.py
   recipes/configs/demo.yaml`` (plain ``python`` when the ``accelerate`` command is missing), started
   as ``recipes/ablation.py`` starts its runs. No labels.
   The student is the config's preset ``vit-mini-2heads-patch8``: a smaller ViT with 2 heads and patch 8,
   so the attention guidance needs both of its shape adaptations (the teacher's 8x8 maps resized to the
   student's 4x4 grid, and the heads of both sides fused into one map).
4. **Evaluation**: weighted k-NN (k = 10, 20, 100, 200) of the teacher, the distilled student and an
   untrained student of the same architecture, on the held-out test images; a summary table, printed
   and added to the student's model card, and ``demo_results.json``.

The student folder (``<output_root>/demo-student``) is a Hub-ready model repo: weights, image
processor, model card, training curves and the teacher-vs-student attention figure.

The stages: ``attndistill_hf/demo/run.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.demo.run import DemoArguments, run_demo

RECIPES = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the four stages; returns what ``demo_results.json`` holds."""
    (args,) = parse_config_and_flags((DemoArguments,), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MPLBACKEND", "Agg")
    return run_demo(args, RECIPES)


if __name__ == "__main__":
    run_recipe(main)
