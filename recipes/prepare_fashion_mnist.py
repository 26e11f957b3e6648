"""Write Fashion-MNIST as local parquet shards that every recipe reads (``--dataset_name <output_dir>``).

    python recipes/prepare_fashion_mnist.py --output_dir data/fashion_mnist
    python recipes/prepare_fashion_mnist.py --output_dir data/fmnist_small --max_train 2000 --max_test 500
    python recipes/prepare_fashion_mnist.py --output_dir data/fashion_mnist --hub   # from the Hub instead

Re-running with the same arguments is a no-op; the Debian package ``dataset-fashion-mnist`` provides
the source files offline.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from attndistill_hf.cli import run_recipe
from attndistill_hf.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, HUB_DATASET_ID, prepare_fashion_mnist


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--output_dir", required=True, help="Folder to write the parquet shards, README and info JSON to."
    )
    parser.add_argument(
        "--source_dir",
        default=DEBIAN_FASHION_MNIST_DIR,
        help="Folder with the gzip'd IDX files (train-images-idx3-ubyte.gz, ...); ignored with --hub.",
    )
    parser.add_argument("--hub", action="store_true", help=f"Read {HUB_DATASET_ID} from the Hub instead of IDX files.")
    parser.add_argument(
        "--max_train", type=int, default=None, help="Keep a class-balanced, seeded subset of this many train images."
    )
    parser.add_argument(
        "--max_test", type=int, default=None, help="Keep a class-balanced, seeded subset of this many test images."
    )
    parser.add_argument("--num_train_shards", type=int, default=8, help="Number of parquet files for the train split.")
    parser.add_argument("--num_test_shards", type=int, default=2, help="Number of parquet files for the test split.")
    parser.add_argument(
        "--image_size", type=int, default=None, help="Resize images (bicubic) to this square size; native 28 if unset."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the class-balanced subsets.")
    parser.add_argument("--overwrite", action="store_true", help="Rewrite even when a matching preparation exists.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (the command line by default), prepare the dataset and print where it is."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = prepare_fashion_mnist(
        args.output_dir,
        source_dir=args.source_dir,
        hub=args.hub,
        max_train=args.max_train,
        max_test=args.max_test,
        num_train_shards=args.num_train_shards,
        num_test_shards=args.num_test_shards,
        image_size=args.image_size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    counts = f"{len(result['train'])} train and {len(result['test'])} test shards"
    print(f"Fashion-MNIST ready in {result['data_dir']}: {counts}")
    return result


if __name__ == "__main__":
    run_recipe(main)
