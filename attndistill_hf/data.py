"""Training and evaluation images: sources, per-rank streaming, the published transforms, a robust collator.

Distillation needs no labels, only many images, read fast and never stopping a run. The design follows
from that:

* Images stay encoded in the dataset (``datasets.Image(decode=False)``) and are decoded in the collator,
  inside the DataLoader workers, where a corrupt file can be caught, skipped and counted. The count
  travels inside the batch (``skipped_images``) because workers are separate processes.
* Streaming (``--streaming``) reads shards as they come. Every rank reads its own shards
  (``split_dataset_by_node``), shuffles with the same seed (so shard assignment agrees across ranks) and
  is truncated or cycled to the same number of batches (:class:`EqualStepsIterable`): a rank that ran
  out early would leave the others blocked in a collective forever.
* Augmentation is the published one: RandomResizedCrop(scale 0.2-1, bicubic) + flip + the teacher's
  normalisation; evaluation resizes to 256/224 of the crop and centre-crops.

Per-rank streaming and Accelerate: by default Accelerate dispatches an iterable dataset from rank 0
(``dispatch_batches=True``) and, when told not to, re-shards it itself. Both defeat per-rank shards, so a
trainer that streams turns dispatching off (``AttnDistillConfig`` sets ``dispatch_batches: False``) and
wraps its DataLoader with :func:`prepare_per_rank_dataloader` instead of ``accelerator.prepare``.

Epochs: ``Trainer`` calls ``set_epoch`` on the prepared DataLoader at the start of each epoch, and
Accelerate forwards it to the dataset; :class:`EqualStepsIterable` passes it on to the streamed dataset,
whose shuffle order (buffer and shard order) then changes. The epoch lives in shared memory, so it also
reaches persistent DataLoader workers.
"""

from __future__ import annotations

import functools
import glob
import io
import math
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Column names the webdataset builder gives images and class indices (from the files' extensions).
WEBDATASET_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
WEBDATASET_LABEL_KEYS: tuple[str, ...] = ("cls",)

_SHARD_BUILDERS: dict[str, str] = {".parquet": "parquet", ".tar": "webdataset"}
_DEFAULT_IMAGE_COLUMN = "image"
_DEFAULT_LABEL_COLUMN = "label"


def _shard_builder(patterns: Sequence[str], flag: str) -> str:
    """The datasets builder ("parquet" or "webdataset") for shard patterns, which must all be of one kind."""
    kinds = set()
    for pattern in patterns:
        ext = os.path.splitext(pattern)[1].lower()
        if ext not in _SHARD_BUILDERS:
            raise ValueError(
                f"{flag} {pattern!r}: cannot tell the shard format; the pattern must end in .parquet "
                "(parquet shards) or .tar (webdataset shards)"
            )
        kinds.add(_SHARD_BUILDERS[ext])
    if len(kinds) > 1:
        raise ValueError(f"{flag} mixes parquet and webdataset shards ({list(patterns)}); use one format")
    return kinds.pop()


def _holds_an_image(folder: str) -> bool:
    """Whether a file with an image extension is anywhere under ``folder`` (stops at the first)."""
    extensions = set(Image.registered_extensions())
    for _root, _dirs, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return True
    return False


def _is_remote(path: str) -> bool:
    return "://" in path


@dataclass
class DataArguments:
    """Where the images come from and how they are prepared (parsed by ``HfArgumentParser``).

    Exactly one training source may be set: a Hub dataset (``dataset_name``), a local image folder
    (``train_dir``) or shard files (``data_files``). None is allowed for runs that only evaluate;
    :func:`load_split` then says what is missing.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. 'ILSVRC/imagenet-1k') or local dataset directory to train on."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of --dataset_name, if it has several."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name used for training."})
    eval_split: str | None = field(
        default="test",
        metadata={"help": "Split of --dataset_name used for evaluation (ImageNet calls it 'validation')."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training data shard by shard instead of preparing it on disk first."},
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Local folder of training images (imagefolder layout: one sub-folder per class)."},
    )
    eval_dir: str | None = field(
        default=None, metadata={"help": "Local folder of evaluation images (imagefolder layout)."}
    )
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Glob(s) of local or remote training shards: '*.parquet' files or webdataset '*.tar' files."},
    )
    eval_data_files: list[str] | None = field(
        default=None, metadata={"help": "Glob(s) of evaluation shards ('*.parquet' or webdataset '*.tar')."}
    )
    image_column: str = field(
        default=_DEFAULT_IMAGE_COLUMN,
        metadata={
            "help": "Column holding the images. Webdataset shards name it after the extension ('jpg'); "
            "with the default, such a column is found and renamed automatically."
        },
    )
    label_column: str = field(
        default=_DEFAULT_LABEL_COLUMN,
        metadata={
            "help": "Column holding class indices (only evaluation needs labels). Webdataset: 'cls', "
            "found automatically with the default."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Examples held in the shuffle buffer when streaming."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only N training examples (quick runs, debugging), a random subset drawn with the run's "
            "--seed: uniform over a prepared dataset (shuffle(seed), then the first N). When streaming, the "
            "first N of a seeded shuffle (shard order, then a buffer of --shuffle_buffer_size examples): as "
            "uniform as the shards are mixed (a class-sorted single-shard source is not), drawn afresh each "
            "epoch, and N in total over several readers."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only N evaluation examples, a random subset drawn with the run's --seed as for "
            "--max_train_samples."
        },
    )
    num_train_examples: int | None = field(
        default=None,
        metadata={
            "help": "Number of training examples, when streaming from a source whose size cannot be read "
            "(it fixes the steps per epoch that every rank runs)."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where prepared (non-streamed) datasets are cached; datasets' default if unset."},
    )
    image_size: int = field(default=224, metadata={"help": "Side of the square crop fed to the models, in pixels."})
    gpu_augment: bool = field(
        default=False,
        metadata={
            "help": "Decode JPEGs and augment on the GPU (workers only gather bytes); falls back to the "
            "CPU when no GPU is present. Same crop distribution as the published augmentation, but the crop is "
            "resized bilinearly with antialiasing instead of bicubically (slightly softer, same geometry)."
        },
    )

    def __post_init__(self) -> None:
        # YAML / JSON configs may give one pattern as a plain string.
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if isinstance(self.eval_data_files, str):
            self.eval_data_files = [self.eval_data_files]

        train_sources = {
            "--dataset_name": self.dataset_name,
            "--train_dir": self.train_dir,
            "--data_files": self.data_files,
        }
        given = [flag for flag, value in train_sources.items() if value]
        if len(given) > 1:
            raise ValueError(
                f"Several training sources are set ({', '.join(given)}); keep exactly one of "
                "--dataset_name, --train_dir, --data_files"
            )
        if self.dataset_config and not self.dataset_name:
            raise ValueError("--dataset_config is set without --dataset_name; set both or neither")
        if self.eval_dir and self.eval_data_files:
            raise ValueError("Both --eval_dir and --eval_data_files are set; keep one evaluation source")
        for flag, path in (("--train_dir", self.train_dir), ("--eval_dir", self.eval_dir)):
            if path and not _is_remote(path) and not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r} is not a directory; give a folder of images")
        if self.data_files is not None:
            if not self.data_files:
                raise ValueError("--data_files is empty; give at least one glob of shard files")
            _shard_builder(self.data_files, "--data_files")
        if self.eval_data_files is not None:
            if not self.eval_data_files:
                raise ValueError("--eval_data_files is empty; give at least one glob of shard files")
            _shard_builder(self.eval_data_files, "--eval_data_files")
        if not self.image_column:
            raise ValueError("--image_column must name a column")
        for flag, value in (
            ("--shuffle_buffer_size", self.shuffle_buffer_size),
            ("--image_size", self.image_size),
            ("--max_train_samples", self.max_train_samples),
            ("--max_eval_samples", self.max_eval_samples),
            ("--num_train_examples", self.num_train_examples),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")

    @property
    def source_name(self) -> str:
        """The training data's name for model cards: the Hub id, else the name of its local folder."""
        if self.dataset_name:
            return self.dataset_name
        if self.train_dir:
            folder = Path(self.train_dir).resolve()
            return folder.parent.name if folder.name.lower() in ("train", "training") else folder.name
        if self.data_files:
            return Path(self.data_files[0]).parent.name or "data"
        return "data"

    @property
    def eval_split_name(self) -> str:
        """The evaluation data's split as model cards name it: the Hub split, else the local folder's name."""
        if self.eval_source == "hub":
            return str(self.eval_split)
        if self.eval_dir:
            return Path(self.eval_dir).resolve().name
        return "eval"

    @property
    def train_source(self) -> Literal["hub", "folder", "shards"] | None:
        """Which kind of training source is configured (None: none)."""
        if self.dataset_name:
            return "hub"
        if self.train_dir:
            return "folder"
        if self.data_files:
            return "shards"
        return None

    @property
    def eval_source(self) -> Literal["hub", "folder", "shards"] | None:
        """Which kind of evaluation source is configured; a Hub dataset serves both when nothing local is."""
        if self.eval_dir:
            return "folder"
        if self.eval_data_files:
            return "shards"
        if self.dataset_name and self.eval_split:
            return "hub"
        return None


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def column_names(ds: Any) -> list[str]:
    """Columns of a Dataset or IterableDataset; a stream with unknown features is peeked at once."""
    names = getattr(ds, "column_names", None)
    if names is not None:
        return list(names)
    first = next(iter(ds.take(1)), None)
    return [] if first is None else list(first)


def require_label_column(ds: Any, label_column: str, what: str, hint: str) -> None:
    """A ``ValueError`` naming ``what``, its columns and ``hint`` when ``ds`` has no ``label_column``.

    For the recipes that need labels to check their data before training rather than fail after it.
    """
    present = column_names(ds)
    if label_column not in present:
        raise ValueError(f"The {what} has no label column {label_column!r} (its columns: {present}). {hint}")


def _resolve_column(ds: Any, wanted: str, default: str, alternatives: Sequence[str]) -> tuple[Any, bool]:
    """Find ``wanted`` in ``ds``; with the default name, rename a webdataset-style column to it.

    Returns the (possibly renamed) dataset and whether the column is present.
    """
    names = column_names(ds)
    if wanted in names:
        return ds, True
    if wanted == default:
        found = [name for name in alternatives if name in names]
        if len(found) == 1:
            return ds.rename_column(found[0], wanted), True
    return ds, False


def _check_local_patterns(patterns: Sequence[str], flag: str) -> None:
    for pattern in patterns:
        if not _is_remote(pattern) and not glob.glob(pattern, recursive=True):
            raise FileNotFoundError(f"{flag} {pattern!r} matches no file; check the path and the glob")


@functools.cache
def _hub_split_names(name: str, config: str | None, cache_dir: str | None) -> tuple[str, ...]:
    """The split names of a Hub dataset, read once per process: recipes check a split up front and
    ``load_split`` checks it again for every loader built from it."""
    from datasets import get_dataset_split_names

    return tuple(get_dataset_split_names(name, config, cache_dir=cache_dir))


def check_hub_split(data_args: DataArguments, split: Literal["train", "eval"]) -> None:
    """Raise ``ValueError`` naming the available splits when ``--dataset_name`` lacks the configured split.

    Only a split read from ``--dataset_name`` is checked (local folders and shards have no split names).
    Reads the dataset's metadata alone (its card and data file names; a local dataset directory works
    offline), so that a wrong ``--eval_split`` fails before anything is trained, downloaded or prepared.
    When the names cannot be read (offline, gated, ...), it returns and ``load_dataset`` reports the cause.
    """
    source = data_args.train_source if split == "train" else data_args.eval_source
    if source != "hub" or data_args.dataset_name is None:
        return
    flag, wanted = (
        ("--train_split", data_args.train_split) if split == "train" else ("--eval_split", data_args.eval_split)
    )
    try:
        names = list(_hub_split_names(data_args.dataset_name, data_args.dataset_config, data_args.cache_dir))
    except Exception:  # no network, no access, no parsable config: many types; load_dataset says which
        return
    # datasets' split syntax: "train", "train[:10%]", "train+validation".
    missing = [name for name in (part.split("[")[0].strip() for part in str(wanted).split("+")) if name not in names]
    if missing:
        raise ValueError(
            f"Dataset {data_args.dataset_name!r} has no split {missing[0]!r} ({flag} {wanted!r}); its splits are "
            f"{names}. Set {flag} to one of them"
        )


# The seed of ``max_*_samples`` / ``limit`` subsets when the caller has no run seed (transformers' default).
DEFAULT_SUBSET_SEED = 42


def _random_subset(ds: Any, n: int, *, seed: int, buffer_size: int) -> Any:
    """``n`` examples of ``ds`` drawn at random with ``seed`` (all of them when it holds no more).

    A prepared dataset: ``shuffle(seed)`` then the first ``n``, a uniform subset (as transformers' examples
    take one). A stream: a seeded shuffle (shard order, then a buffer of ``buffer_size`` examples) then
    ``take(n)``, as uniform as the shards are mixed; ``set_epoch`` redraws it.
    """
    if hasattr(ds, "__len__"):
        return ds if n >= len(ds) else ds.shuffle(seed=seed).select(range(n))
    return ds.shuffle(seed=seed, buffer_size=buffer_size).take(n)


def load_split(
    data_args: DataArguments,
    split: Literal["train", "eval"],
    *,
    streaming: bool | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_SUBSET_SEED,
) -> Any:
    """Load the training or evaluation images as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    The image column is cast to ``Image(decode=False)``: examples carry the encoded bytes (or a path) and
    the collator decodes them, so that a corrupt file is skipped there instead of failing in ``datasets``.
    Webdataset columns ('jpg', 'cls') are renamed to the default names when those are configured.
    ``max_train_samples`` / ``max_eval_samples`` and ``limit`` (the smallest applies) keep a random subset
    drawn with ``seed`` (the run's): uniform over a prepared dataset, through the shuffle buffer when
    streaming (see ``DataArguments.max_train_samples``). A Hub split is checked first (:func:`check_hub_split`).

    Raises ``ValueError`` when no source is configured for the split, the Hub dataset lacks the split (the
    message lists its splits), the image column is missing (the message lists the columns present) or the
    dataset is empty.
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if streaming is None:
        streaming = data_args.streaming

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

    if split == "train":
        source, configured = data_args.train_source, data_args.max_train_samples
        folder, files, files_flag, hub_split = (
            data_args.train_dir,
            data_args.data_files,
            "--data_files",
            data_args.train_split,
        )
    else:
        source, configured = data_args.eval_source, data_args.max_eval_samples
        folder, files, files_flag, hub_split = (
            data_args.eval_dir,
            data_args.eval_data_files,
            "--eval_data_files",
            data_args.eval_split,
        )

    if source is None:
        if split == "train":
            raise ValueError("No training data: set one of --dataset_name, --train_dir or --data_files")
        raise ValueError("No evaluation data: set --eval_dir, --eval_data_files, or --dataset_name with --eval_split")
    if source == "shards":
        assert files is not None
        builder = _shard_builder(files, files_flag)
        _check_local_patterns(files, files_flag)
        ds = load_dataset(
            builder, data_files=list(files), split="train", streaming=streaming, cache_dir=data_args.cache_dir
        )
        where = f"{files_flag} {list(files)}"
    elif source == "folder":
        assert folder is not None
        if not _is_remote(folder) and not _holds_an_image(folder):
            flag = "--train_dir" if split == "train" else "--eval_dir"
            raise ValueError(
                f"{flag} {folder!r} holds no image files (none with an extension PIL reads, such as .jpg or "
                ".png, in it or its sub-folders)"
            )
        ds = load_dataset(
            "imagefolder", data_dir=folder, split="train", streaming=streaming, cache_dir=data_args.cache_dir
        )
        where = f"folder {folder!r}"
    else:
        check_hub_split(data_args, split)
        ds = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config,
            split=hub_split,
            streaming=streaming,
            cache_dir=data_args.cache_dir,
        )
        where = f"dataset {data_args.dataset_name!r} split {hub_split!r}"

    ds, has_image = _resolve_column(ds, data_args.image_column, _DEFAULT_IMAGE_COLUMN, WEBDATASET_IMAGE_KEYS)
    if not has_image:
        present = column_names(ds)
        if not present:
            raise ValueError(f"{where} is empty: it holds no examples")
        raise ValueError(
            f"{where} has no image column {data_args.image_column!r}; its columns are {present}. "
            "Set --image_column to the one holding the images"
        )
    ds, _ = _resolve_column(ds, data_args.label_column, _DEFAULT_LABEL_COLUMN, WEBDATASET_LABEL_KEYS)

    feature = (ds.features or {}).get(data_args.image_column)
    if not (isinstance(feature, ImageFeature) and not feature.decode):
        try:
            ds = ds.cast_column(data_args.image_column, ImageFeature(decode=False))
        except Exception as err:  # arrow raises several types for an impossible cast
            raise ValueError(
                f"Column {data_args.image_column!r} of {where} ({feature}) cannot be read as images: {err}"
            ) from err

    empty = next(iter(ds.take(1)), None) is None if streaming else len(ds) == 0
    if empty:
        raise ValueError(f"{where} is empty: it holds no examples")
    limits = [n for n in (configured, limit) if n is not None]
    if limits:
        ds = _random_subset(ds, min(limits), seed=seed, buffer_size=data_args.shuffle_buffer_size)
    return ds


# --------------------------------------------------------------------------------------------------
# Sizes and steps (streaming has no len())
# --------------------------------------------------------------------------------------------------


def _tar_example_count(path: str) -> int:
    """Examples in a webdataset tar: distinct keys (member path up to the first dot of its file name)."""
    keys = set()
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            if "." not in name or name.startswith("."):
                continue
            keys.add((folder, name.split(".", 1)[0]))
    return len(keys)


def _count_local_files(patterns: Sequence[str]) -> int | None:
    import pyarrow.parquet as pq

    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)})
    if not files or any(_is_remote(p) for p in patterns):
        return None
    total = 0
    for path in files:
        if path.lower().endswith(".parquet"):
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += _tar_example_count(path)
    return total


def _count_folder_images(folder: str) -> int:
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sum(
        1 for _, _, names in os.walk(folder) for name in names if os.path.splitext(name)[1].lower() in extensions
    )


def count_examples(data_args: DataArguments, split: Literal["train", "eval"] = "train", ds: Any = None) -> int | None:
    """Number of examples in a split without iterating it, or None when it cannot be known.

    Order of trust: ``--num_train_examples`` (train only); ``len(ds)`` for a prepared dataset; parquet
    footers or tar member lists for local shards; image files for a local folder; the dataset info of a
    Hub dataset. ``max_*_samples`` caps the result. Streaming needs this to give every rank the same
    number of steps (:func:`steps_per_epoch`).
    """
    limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    source = data_args.train_source if split == "train" else data_args.eval_source
    count: int | None = None
    if split == "train" and data_args.num_train_examples is not None:
        count = data_args.num_train_examples
    elif ds is not None and hasattr(ds, "__len__"):
        return len(ds)  # already truncated by load_split
    elif source == "shards":
        count = _count_local_files(data_args.data_files if split == "train" else data_args.eval_data_files or [])
    elif source == "folder":
        count = _count_folder_images(data_args.train_dir if split == "train" else data_args.eval_dir)
    elif source == "hub" and ds is not None:
        splits = getattr(getattr(ds, "info", None), "splits", None)
        name = data_args.train_split if split == "train" else data_args.eval_split
        if splits and name in splits and splits[name].num_examples:
            count = splits[name].num_examples
    if count is not None and limit is not None:
        count = min(count, limit)
    return count


def steps_per_epoch(num_examples: int, world_size: int, per_device_batch: int, *, drop_last: bool = True) -> int:
    """Batches every rank runs in one epoch, the same on all ranks.

    ``drop_last=True`` leaves out the remainder that does not fill a global batch (``world_size x
    per_device_batch``); ``False`` rounds up and the ranks repeat a few examples to fill the last one.
    """
    for name, value in (
        ("num_examples", num_examples),
        ("world_size", world_size),
        ("per_device_batch", per_device_batch),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    global_batch = world_size * per_device_batch
    steps = num_examples // global_batch if drop_last else math.ceil(num_examples / global_batch)
    if steps == 0:
        raise ValueError(
            f"{num_examples} examples do not fill one global batch of {global_batch} "
            f"({world_size} ranks x {per_device_batch}); lower the batch size or pass drop_last=False"
        )
    return steps


# --------------------------------------------------------------------------------------------------
# Streaming per rank
# --------------------------------------------------------------------------------------------------


def shard_stream(
    ds: Any, *, rank: int, world_size: int, seed: int, buffer_size: int = 10_000, shuffle: bool = True
) -> Any:
    """This rank's part of a streamed dataset, shuffled with a seed common to all ranks.

    ``split_dataset_by_node`` gives each rank whole shards when their number divides by ``world_size``,
    else every ``world_size``-th example of all shards; both are disjoint and cover everything. The seed
    must be the same on every rank: the shard order it draws decides which shards a rank gets.
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if not isinstance(ds, IterableDataset):
        raise TypeError(f"shard_stream expects a streamed datasets.IterableDataset, got {type(ds).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    if shuffle and buffer_size < 1:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    return ds


class EqualStepsIterable(torch.utils.data.IterableDataset):
    """Yields exactly ``steps x per_device_batch`` examples of a stream, in whole batches per worker.

    Ranks' shards rarely hold the same number of examples; a rank that stops early leaves the others
    waiting in a collective. This wrapper cuts a long stream and cycles a short one (the repeats are
    this rank's own examples, in the same order), so every rank yields ``steps`` batches. With
    DataLoader workers the batches are divided among the workers that own shards (the stream gives
    workers beyond ``num_shards`` nothing), whole batches each, so no partial batch appears.

    ``len()`` is known, so ``Trainer`` can count epochs. ``set_epoch`` is forwarded to the stream.
    """

    def __init__(self, dataset: Any, steps: int, per_device_batch: int) -> None:
        super().__init__()
        if steps < 1 or per_device_batch < 1:
            raise ValueError(f"steps and per_device_batch must be positive, got {steps} and {per_device_batch}")
        self.dataset = dataset
        self.steps = steps
        self.per_device_batch = per_device_batch
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps * self.per_device_batch

    @property
    def num_shards(self) -> int | None:
        """Shards of the wrapped stream for this rank (the useful maximum of DataLoader workers)."""
        return getattr(self.dataset, "num_shards", None)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the stream, which reseeds its shuffle with it."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _quota(self) -> int:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards = self.num_shards
        active = min(workers, shards) if shards else workers
        if worker >= active:
            return 0
        batches = self.steps // active + (1 if worker < self.steps % active else 0)
        return batches * self.per_device_batch

    def __iter__(self) -> Iterator[Any]:
        quota = self._quota()
        emitted = 0
        while emitted < quota:
            produced = 0
            for example in self.dataset:
                yield example
                produced += 1
                emitted += 1
                if emitted >= quota:
                    return
            if produced == 0:
                raise RuntimeError(
                    "The stream gave this rank/worker no examples, so it cannot fill its batches; use fewer "
                    "DataLoader workers (see dataloader_workers) or more shards"
                )


def dataloader_workers(ds: Any, requested: int) -> int:
    """DataLoader workers worth starting for ``ds``: a stream cannot feed more workers than it has shards.

    Warns and returns the shard count when ``requested`` exceeds it (the surplus workers would sit idle).
    """
    if requested < 0:
        raise ValueError(f"the number of workers cannot be negative, got {requested}")
    shards = getattr(ds, "num_shards", None)
    streamed = isinstance(ds, torch.utils.data.IterableDataset) or type(ds).__name__ == "IterableDataset"
    if streamed and shards and requested > shards:
        warnings.warn(
            f"{requested} DataLoader workers requested but this rank's stream has {shards} shard(s); "
            f"using {shards}. Write the data in more shards to read it with more workers.",
            stacklevel=2,
        )
        return shards
    return requested


def prepare_per_rank_dataloader(accelerator: Any, dataloader: torch.utils.data.DataLoader) -> Any:
    """Device placement for a DataLoader that already reads only this rank's data.

    ``accelerator.prepare`` would shard an iterable dataset again (``.shard`` or ``IterableDatasetShard``)
    and each rank would see a fraction of its own part. Preparing as a single process keeps the stream
    whole; the loader is still registered with the accelerator so that ``save_state`` knows it. RNG
    states are not synchronised: each rank draws its own augmentations.
    """
    from accelerate.data_loader import prepare_data_loader

    prepared = prepare_data_loader(
        dataloader,
        accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=accelerator.device_placement,
        rng_types=None,
        dispatch_batches=False,
        non_blocking=getattr(accelerator, "non_blocking", False),
        use_stateful_dataloader=getattr(accelerator, "use_stateful_dataloader", False),
    )
    registry = getattr(accelerator, "_dataloaders", None)
    if isinstance(registry, list):
        registry.append(prepared)
    return prepared


# --------------------------------------------------------------------------------------------------
# Decoding and colour
# --------------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as the models expect.

    Transparent images are composited on white, as viewers show them (dropping alpha would reveal
    whatever colour hides under transparent pixels, often black). 16-bit images are scaled to 8 bits
    (PIL's own conversion clips them, turning most of the image white). 32-bit integer images are treated
    as 16-bit when they exceed 255; float images as [0, 1] when they fit in it, else [0, 255].
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.float32)
        if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float32)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(source: Any) -> Image.Image | None:
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image) if image.mode != "RGB" else image.copy()
    except Exception:  # corrupt data raises many types in PIL (OSError, SyntaxError, struct.error, ...)
        return None


def decode_image(value: Any) -> Image.Image | None:
    """Decode one image value to RGB, or return None when it cannot be decoded (never raises for bad data).

    Accepts what ``datasets`` gives with ``Image(decode=False)`` (``{"bytes": ..., "path": ...}``), raw
    bytes, a file path, or a PIL image. Truncated, corrupt, missing or empty data gives None so the
    caller can skip and count it. Raises ``TypeError`` only for a value that is no image at all (a
    misconfigured column).
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        try:
            value.load()
            return to_rgb(value)
        except Exception:
            return None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return decode_image(bytes(data))
        if path:
            return _open(path)
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(value))) if len(value) else None
    if isinstance(value, (str, os.PathLike)):
        return _open(value)
    raise TypeError(
        f"Cannot read an image from a {type(value).__name__}; the image column must hold image bytes, "
        "paths or {'bytes', 'path'} dicts"
    )


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _stats_triplet(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * 3
    else:
        values = [float(v) for v in value]
        if len(values) == 1:
            values *= 3
    if len(values) != 3:
        raise ValueError(f"image {name} must have 1 or 3 values (one per RGB channel), got {len(values)}")
    return values[0], values[1], values[2]


def image_stats(
    image_processor: Any = None,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Normalisation (mean, std) per RGB channel that the teacher was trained with.

    Read from a transformers image processor (or its dict form): ``image_mean`` / ``image_std``; a
    processor with ``do_normalize=False`` expects unnormalised [0, 1] pixels, i.e. mean 0 and std 1.
    Without a processor or without stats, ImageNet's (the teachers of the paper all use them).
    """
    if image_processor is None:
        return IMAGENET_MEAN, IMAGENET_STD

    def get(key: str) -> Any:
        if isinstance(image_processor, Mapping):
            return image_processor.get(key)
        return getattr(image_processor, key, None)

    if get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = get("image_mean"), get("image_std")
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    mean3, std3 = _stats_triplet(mean, "mean"), _stats_triplet(std, "std")
    if min(std3) <= 0:
        raise ValueError(f"image std must be positive, got {std3}")
    return mean3, std3


def _check_transform_args(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (RGB), got {list(mean)} and {list(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
) -> v2.Compose:
    """The published training view: RandomResizedCrop(image_size, scale=(0.2, 1), bicubic) + flip + normalise.

    Works on PIL images of any mode (converted to RGB first); images smaller than the crop are upsampled.
    Returns a float tensor [3, image_size, image_size].
    """
    _check_transform_args(image_size, mean, std)
    return v2.Compose(
        [
            v2.Lambda(to_rgb, Image.Image),
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(mean, std),
        ]
    )


def eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """The evaluation view of DINO's protocol, scaled to ``image_size``: resize the short side to
    round(image_size x 256 / 224) (bicubic), centre-crop ``image_size``, normalise."""
    _check_transform_args(image_size, mean, std)
    return v2.Compose(
        [
            v2.Lambda(to_rgb, Image.Image),
            v2.Resize(round(image_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_tensor(mean, std),
        ]
    )


def probe_train_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """The training view of DINO's linear evaluation: RandomResizedCrop(image_size) at torchvision's defaults
    (scale (0.08, 1), bilinear) + horizontal flip + normalise.

    Not the distillation view (``train_transform``: scale (0.2, 1), bicubic). The probe is scored
    on ``eval_transform`` (resize 256/224 bicubic, centre crop). Returns a float tensor
    [3, image_size, image_size] for a PIL image of any mode.
    """
    _check_transform_args(image_size, mean, std)
    return v2.Compose(
        [
            v2.Lambda(to_rgb, Image.Image),
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(mean, std),
        ]
    )


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def _label(example: Mapping[str, Any], column: str) -> int:
    if column not in example:
        raise KeyError(f"Example has no label column {column!r}; its columns are {sorted(example)}")
    value = example[column]
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Label {value!r} in column {column!r} is not a class index") from err


class ImageCollator:
    """Decodes, augments and batches examples in the DataLoader workers; undecodable images are skipped.

    Returns ``{"pixel_values": float [B', 3, H, W], "labels": long [B'] (with a label column),
    "skipped_images": long scalar}`` where B' = B minus the images that failed to decode. The count rides
    in the batch because workers are other processes; the trainer pops and sums it.

    When every image of a batch fails, ``pixel_values`` has 0 rows (the right H and W) and
    ``labels`` 0 entries; the trainer skips such a batch. ``fill_skipped=True`` instead keeps the batch
    size constant (static shapes for ``torch.compile``, equal work across ranks) by adding fresh random
    views of the batch's decoded images in place of the failed ones; the count still reports the failures.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        image_column: str = _DEFAULT_IMAGE_COLUMN,
        label_column: str | None = None,
        *,
        fill_skipped: bool = False,
    ) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.fill_skipped = fill_skipped
        self._empty_shape: tuple[int, ...] | None = None

    def _output_shape(self) -> tuple[int, ...]:
        # Every transform used here gives a fixed shape whatever the input; measure it once.
        if self._empty_shape is None:
            self._empty_shape = tuple(self.transform(Image.new("RGB", (64, 64), (128, 128, 128))).shape)
        return self._empty_shape

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        images: list[Image.Image] = []
        labels: list[int] = []
        for example in examples:
            if self.image_column not in example:
                raise KeyError(f"Example has no image column {self.image_column!r}; its columns are {sorted(example)}")
            image = decode_image(example[self.image_column])
            if image is None:
                continue
            images.append(image)
            if self.label_column is not None:
                labels.append(_label(example, self.label_column))
        skipped = len(examples) - len(images)
        sources = list(range(len(images)))
        if self.fill_skipped and images and skipped:
            sources += [i % len(images) for i in range(skipped)]
        if sources:
            pixel_values = torch.stack([self.transform(images[i]) for i in sources])
        else:
            pixel_values = torch.empty((0, *self._output_shape()), dtype=torch.float32)
        batch = {"pixel_values": pixel_values}
        if self.label_column is not None:
            batch["labels"] = torch.tensor([labels[i] for i in sources], dtype=torch.long)
        batch["skipped_images"] = torch.tensor(skipped, dtype=torch.long)
        return batch


def eval_view_loader(
    data_args: DataArguments,
    split: Literal["train", "eval"],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    batch_size: int,
    num_workers: int = 0,
    streaming: bool | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_SUBSET_SEED,
) -> tuple[torch.utils.data.DataLoader, Any]:
    """Labelled images of ``split`` with the evaluation view (resize + centre crop), unshuffled.

    What every k-NN memory bank and test set is read with. ``limit`` keeps at most N examples, a random
    subset drawn with ``seed`` like ``max_*_samples`` (see :func:`load_split`), so that a class-sorted
    source (an image folder) still gives a bank of every class. Returns ``(loader, dataset)``.
    """
    dataset = load_split(data_args, split, streaming=streaming, limit=limit, seed=seed)
    collator = ImageCollator(
        eval_transform(data_args.image_size, mean, std), data_args.image_column, data_args.label_column
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=dataloader_workers(dataset, num_workers),
        collate_fn=collator,
    )
    return loader, dataset
