"""Run a teacher once over K recorded views of every image and store its targets, to distill without it.

    python recipes/cache_teacher.py --teacher_name_or_path facebook/dinov3-vit7b16-pretrain-lvd1689m \
        --teacher_dtype bfloat16 --dataset_name timm/imagenet-1k-wds --streaming true --image_column jpg \
        --views_per_image 4 --output_dir targets/in1k-dinov3-vit7b16
    accelerate launch --multi_gpu --num_processes 8 recipes/cache_teacher.py ...   # each GPU caches its share
    python recipes/distill.py --teacher_targets targets/in1k-dinov3-vit7b16 --student_preset dinov3-vits16 ...

The output folder is a datasets dataset (``datasets.load_dataset(PATH)`` reads it) with a dataset card and
``attndistill_cache.json``. An interrupted cache resumes when run again with the same arguments.
"""

from __future__ import annotations

import logging

from attndistill_hf.cache_writer import CACHE_ARGUMENTS, build_target_cache
from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.target_cache import CacheInfo


def main(argv: list[str] | None = None) -> CacheInfo:
    cache_args, data_args = parse_config_and_flags(CACHE_ARGUMENTS, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return build_target_cache(cache_args, data_args)


if __name__ == "__main__":
    run_recipe(main)
