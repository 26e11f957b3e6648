"""Distill a self-supervised ViT teacher into a ViT student with AttnDistill.

    accelerate launch recipes/distill.py recipes/configs/in1k_dino_vits8_to_vits16.yaml
    python recipes/distill.py --teacher_name_or_path DIR --student_preset vit-tiny-patch16 \
        --image_size 32 --patch_size 8 --train_dir IMAGES --max_steps 3 --output_dir OUT

A config file (YAML/JSON) may come first; flags after it override it. ``--help`` lists every field.
The output directory ends up a complete Hub model repo: the student (config.json, model.safetensors,
preprocessor_config.json), a model card with the evaluations that were run, and its figures.
"""

from __future__ import annotations

import logging

from attndistill_hf.cli import parse_config_and_flags, recipe_text, run_recipe
from attndistill_hf.pipeline import DISTILL_ARGUMENTS, DistillResult, run_distillation


def main(argv: list[str] | None = None) -> DistillResult:
    model_args, data_args, run_args, args = parse_config_and_flags(DISTILL_ARGUMENTS, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    return run_distillation(model_args, data_args, run_args, args, recipe=recipe_text(argv))


if __name__ == "__main__":
    run_recipe(main)
