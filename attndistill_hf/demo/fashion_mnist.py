"""Fashion-MNIST as a local parquet dataset: the real data set that tests, demo and docs run on offline.

The Debian package ``dataset-fashion-mnist`` ships the original gzip'd IDX files; the Hub hosts
``zalando-datasets/fashion_mnist``. Either source is written to the same layout, which every loader of
the library reads with ``load_dataset(output_dir)`` (or the ``parquet`` builder):

    output_dir/train-00000-of-00008.parquet ... test-00001-of-00002.parquet
    output_dir/README.md              dataset card whose YAML header declares the splits
    output_dir/fashion_mnist_info.json what was written and from which source (used to skip re-runs)

Columns: ``image`` (``datasets.Image``, grayscale 'L' PNG bytes) and ``label`` (``ClassLabel`` with the
ten class names), so ``features["label"].names`` gives readable class names downstream.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..validation import NON_NEGATIVE_INT, OPTIONAL_POSITIVE_INT, POSITIVE_INT, check_value

logger = logging.getLogger(__name__)

# Where Debian's ``dataset-fashion-mnist`` package installs the original files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
HUB_DATASET_ID = "zalando-datasets/fashion_mnist"

CLASS_NAMES: tuple[str, ...] = (
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SOURCE_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INFO_FILENAME = "fashion_mnist_info.json"
# Bump when the written layout changes, so older output directories are rewritten instead of reused.
LAYOUT_VERSION = 1

# IDX type codes (third byte of the magic number) and the numpy dtype they encode (big-endian).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip'd or plain) into a numpy array, validating the header.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension. A truncated download or a file of another format fails here with the reason, rather than
    later as a reshape error or as silently wrong pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path} is not a valid gzip file (truncated or corrupt): {error}") from error
    if len(raw) < 4:
        raise ValueError(f"{path} is too short ({len(raw)} bytes) to hold an IDX header.")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path} has magic number {raw[:4].hex()}: an IDX file starts with two zero bytes "
            "(expected e.g. 00000803 for images, 00000801 for labels)."
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path} has unknown IDX type code 0x{type_code:02x} in its magic number.")
    if ndim == 0:
        raise ValueError(f"{path} declares zero dimensions in its IDX header.")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated inside its IDX header ({ndim} dimensions declared).")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_size
    if payload != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) but the file holds "
            f"{payload} bytes; the file is truncated or corrupt."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_fashion_mnist_split(source_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of one split ('train' or 'test') of the IDX files."""
    if split not in SOURCE_FILES:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'.")
    images_name, labels_name = SOURCE_FILES[split]
    source_dir = Path(source_dir)
    images_path, labels_path = source_dir / images_name, source_dir / labels_name
    for file in (images_path, labels_path):
        if not file.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {file} not found. Install the Debian package 'dataset-fashion-mnist', "
                "pass source_dir= the folder holding the IDX files, or use hub=True."
            )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path} should hold uint8 images [N, H, W], got {images.dtype} {images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images in {images_path}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{labels_path} holds labels outside 0..{len(CLASS_NAMES) - 1}.")
    return images, labels.astype(np.int64)


def balanced_subset_indices(labels: np.ndarray, total: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``total`` items with (almost) equal counts per class.

    Counts are filled like water: every class gets the same share, a class with too few items gives all
    it has and the rest is shared among the others; the last ``< C`` items go to a seeded choice of
    classes. The subset has exactly ``min(total, len(labels))`` items. Sorting keeps the source order
    (the original files are already shuffled), so shards stay class-mixed.
    """
    labels = np.asarray(labels)
    check_value("total", total, NON_NEGATIVE_INT)
    if total >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = [int(c) for c in np.unique(labels)]
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = dict.fromkeys(classes, 0)
    remaining = total
    while remaining > 0:
        open_classes = [c for c in classes if quota[c] < len(pools[c])]
        share = remaining // len(open_classes)
        if share == 0:
            for c in rng.permutation(open_classes)[:remaining]:
                quota[int(c)] += 1
            break
        for c in open_classes:
            add = min(share, len(pools[c]) - quota[c])
            quota[c] += add
            remaining -= add
    chosen = np.concatenate([pools[c][: quota[c]] for c in classes])
    return np.sort(chosen)


def _shard_paths(output_dir: Path, split: str, num_shards: int) -> list[Path]:
    return [output_dir / f"{split}-{i:05d}-of-{num_shards:05d}.parquet" for i in range(num_shards)]


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
    from PIL import Image as PILImage

    return np.stack(
        [
            np.asarray(PILImage.fromarray(image, mode="L").resize((image_size, image_size), PILImage.BICUBIC))
            for image in images
        ]
    )


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(images: np.ndarray, labels: np.ndarray, paths: Sequence[Path], progress: bool) -> None:
    """Write one split as ``len(paths)`` contiguous parquet shards with datasets' Image/ClassLabel features."""
    import datasets
    from datasets import ClassLabel, Dataset, Features, Image
    from tqdm.auto import tqdm

    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASS_NAMES))})
    bounds = np.linspace(0, len(labels), len(paths) + 1).astype(int)
    bar = tqdm(total=len(labels), desc=f"writing {paths[0].name.split('-')[0]}", unit="img", disable=not progress)
    # One bar for the split instead of datasets' per-shard "Creating parquet" bars.
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):
            records = {
                "image": [{"bytes": _png_bytes(image), "path": None} for image in images[start:stop]],
                "label": [int(label) for label in labels[start:stop]],
            }
            shard = Dataset.from_dict(records, features=features)
            tmp = path.with_name(path.name + ".tmp")
            shard.to_parquet(str(tmp))
            os.replace(tmp, path)  # a killed run never leaves a half-written shard under the final name
            bar.update(stop - start)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        bar.close()


def _readme(info: dict[str, Any]) -> str:
    counts = info["num_examples"]
    names = "\n".join(f"            '{i}': {name}" for i, name in enumerate(CLASS_NAMES))
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "train-*.parquet"
  - split: test
    path: "test-*.parquet"
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
---
# Fashion-MNIST (local parquet copy)

Zalando's Fashion-MNIST: 28x28 grayscale images of 10 clothing classes, written as parquet shards
from `{info["source"]}`.

| split | examples | shards |
|---|---|---|
| train | {counts["train"]} | {info["num_shards"]["train"]} |
| test | {counts["test"]} | {info["num_shards"]["test"]} |

Subsets (when `max_train` / `max_test` are set) are class-balanced and drawn with seed {info["seed"]}.
Images are stored as grayscale PNG{"" if info["image_size"] is None else f", resized to {info['image_size']} px"}.
Load with `datasets.load_dataset("<this folder>")`.
"""


def _load_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    from datasets import load_dataset

    dataset = load_dataset(HUB_DATASET_ID, split=split)
    images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in dataset["image"]])
    return images, np.asarray(dataset["label"], dtype=np.int64)


def prepare_fashion_mnist(
    output_dir: str | os.PathLike[str],
    *,
    source_dir: str | os.PathLike[str] = DEBIAN_FASHION_MNIST_DIR,
    hub: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    num_train_shards: int = 8,
    num_test_shards: int = 2,
    image_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write Fashion-MNIST (IDX files or the Hub copy) as parquet shards in ``output_dir``.

    Returns ``{"data_dir", "train": [shard paths], "test": [shard paths], "info", "readme"}``. A second
    call with the same arguments finds the info file and all shards and returns without rewriting
    (subsets are seeded, so the same arguments mean the same rows); different arguments rewrite the
    shards. ``max_train`` / ``max_test`` take class-balanced seeded subsets; ``image_size`` resizes
    (bicubic) at preparation time so loaders need not do it on every epoch.
    """
    output_dir = Path(output_dir)
    for name, value in (("max_train", max_train), ("max_test", max_test), ("image_size", image_size)):
        check_value(name, value, OPTIONAL_POSITIVE_INT)
    for name, value in (("num_train_shards", num_train_shards), ("num_test_shards", num_test_shards)):
        check_value(name, value, POSITIVE_INT)
    source = HUB_DATASET_ID if hub else str(Path(source_dir).resolve())
    request = {
        "layout_version": LAYOUT_VERSION,
        "source": source,
        "max_examples": {"train": max_train, "test": max_test},
        "num_shards": {"train": num_train_shards, "test": num_test_shards},
        "image_size": image_size,
        "seed": seed,
    }
    num_shards = {"train": num_train_shards, "test": num_test_shards}
    paths = {split: _shard_paths(output_dir, split, num_shards[split]) for split in ("train", "test")}
    info_path, readme_path = output_dir / INFO_FILENAME, output_dir / "README.md"
    result: dict[str, Any] = {
        "data_dir": str(output_dir),
        "train": [str(p) for p in paths["train"]],
        "test": [str(p) for p in paths["test"]],
        "info": str(info_path),
        "readme": str(readme_path),
    }

    if not overwrite and info_path.is_file():
        try:
            existing = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            existing = {}
        same_request = {key: existing.get(key) for key in request} == request
        if same_request and all(p.is_file() for split_paths in paths.values() for p in split_paths):
            logger.info("Fashion-MNIST already prepared in %s; skipping.", output_dir)
            return result

    output_dir.mkdir(parents=True, exist_ok=True)
    # Remove shards of an earlier, different preparation so globs like train-*.parquet see only ours.
    stale = re.compile(r"^(train|test)-\d{5}-of-\d{5}\.parquet$")
    for file in output_dir.iterdir():
        if stale.match(file.name):
            file.unlink()
    info_path.unlink(missing_ok=True)

    counts: dict[str, int] = {}
    for split in ("train", "test"):
        images, labels = _load_hub(split) if hub else read_fashion_mnist_split(source_dir, split)
        limit = request["max_examples"][split]
        if limit is not None:
            keep = balanced_subset_indices(labels, limit, seed + (0 if split == "train" else 1))
            images, labels = images[keep], labels[keep]
        if image_size is not None and image_size != images.shape[-1]:
            images = _resize(images, image_size)
        if len(labels) < num_shards[split]:
            raise ValueError(
                f"{split} split has {len(labels)} examples, fewer than its {num_shards[split]} shards; "
                "lower the number of shards."
            )
        _write_split(images, labels, paths[split], progress)
        counts[split] = len(labels)

    info = {**request, "num_examples": counts, "class_names": list(CLASS_NAMES)}
    readme_path.write_text(_readme(info))
    info_path.write_text(json.dumps(info, indent=2) + "\n")  # written last: its presence means "complete"
    return result
