"""The paper's ablation at small scale: which loss term matters, in each of the three attention cases.

    make ablation                  # = python recipes/ablation.py
    python recipes/ablation.py --seeds 0 1 2 3 --max_steps 300

The demo teacher (``recipes/train_teacher.py``: supervised ViT, 4 layers, width 96, 4 heads, patch 4,
on Fashion-MNIST; trained here when it is not cached yet) is distilled into students of width 64 and 4
layers (the ``vit-mini-*`` presets) that differ from it as the method's three cases do:

- ``same``:  ``vit-mini-patch4``, 4 heads, patch 4: head-to-head KL on the same 8x8 grid (case a);
- ``heads``: ``vit-mini-2heads-patch4``, 2 heads, patch 4: the heads of both sides fused into one map (case c);
- ``patch``: ``vit-mini-patch8``, 4 heads, patch 8: the teacher's 8x8 maps resized to the student's 4x4 grid
  (case b);

each with the projector term only (``attn_loss_weight 0``), the attention term only
(``proj_loss_weight 0``) and both (the published 1.0 / 0.1): the nine ``recipes/configs/ablation_*.yaml``.
Every configuration runs for every seed (student initialisation, data order and augmentation change
with it), and the k-NN top-1 of each student on the held-out test images is reported as mean ± sample
standard deviation over the seeds, next to the teacher and an untrained student of each architecture.

The three loss settings of a case train side by side in one run per seed (``distill.py --students``: one
teacher forward per batch for the three students, each of which trains exactly as it would alone). Each
run is started as the demo starts its distillation (``recipes/distill.py`` in a process of its own).
Results go to ``<output_root>/ablation/results.json`` after every run (an interrupted ablation resumes
where it stopped; a run is redone only when its settings change) and to ``docs/results.md``.

The runs and the report: ``attndistill_hf/demo/ablation.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.demo.ablation import AblationArguments, run_ablation

RECIPES = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every config for every seed (runs already in results.json are reused) and write the report."""
    (args,) = parse_config_and_flags((AblationArguments,), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_ablation(args, RECIPES)


if __name__ == "__main__":
    run_recipe(main)
