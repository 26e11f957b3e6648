"""Write Fashion-MNIST as local parquet shards that every recipe reads (``--dataset_name <output_dir>``).

    python recipes/prepare_fashion_mnist.py --output_dir data/fashion_mnist
    python recipes/prepare_fashion_mnist.py --output_dir data/fmnist_small --max_train 2000 --max_test 500
    python recipes/prepare_fashion_mnist.py --output_dir data/fashion_mnist --hub   # from the Hub instead

Re-running with the same arguments is a no-op; the Debian package ``dataset-fashion-mnist`` provides
the source files offline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.demo.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, HUB_DATASET_ID, prepare_fashion_mnist


@dataclass
class PrepareArguments:
    """Where the shards go, where the images come from, and how many of them."""

    output_dir: str = field(metadata={"help": "Folder to write the parquet shards, README and info JSON to."})
    source_dir: str = field(
        default=DEBIAN_FASHION_MNIST_DIR,
        metadata={"help": "Folder with the gzip'd IDX files (train-images-idx3-ubyte.gz, ...); ignored with --hub."},
    )
    hub: bool = field(default=False, metadata={"help": f"Read {HUB_DATASET_ID} from the Hub instead of IDX files."})
    max_train: int | None = field(
        default=None, metadata={"help": "Keep a class-balanced, seeded subset of this many train images."}
    )
    max_test: int | None = field(
        default=None, metadata={"help": "Keep a class-balanced, seeded subset of this many test images."}
    )
    num_train_shards: int = field(default=8, metadata={"help": "Number of parquet files for the train split."})
    num_test_shards: int = field(default=2, metadata={"help": "Number of parquet files for the test split."})
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images (bicubic) to this square size; native 28 if unset."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the class-balanced subsets."})
    overwrite: bool = field(default=False, metadata={"help": "Rewrite even when a matching preparation exists."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (the command line by default), prepare the dataset and print where it is."""
    (args,) = parse_config_and_flags((PrepareArguments,), argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = prepare_fashion_mnist(**asdict(args))
    counts = f"{len(result['train'])} train and {len(result['test'])} test shards"
    print(f"Fashion-MNIST ready in {result['data_dir']}: {counts}")
    return result


if __name__ == "__main__":
    run_recipe(main)
