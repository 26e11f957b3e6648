"""Where the images come from: ``DataArguments``, Hub / folder / shard sources, loading a split, counting it.

A split is loaded with its image column cast to ``datasets.Image(decode=False)``: examples carry the encoded
bytes (or a path) and :class:`~attndistill_hf.data.transforms.ImageCollator` decodes them in the DataLoader
workers, where a corrupt file can be caught, skipped and counted. Streams have no ``len()``;
:func:`count_examples` reads their size from shard footers, file lists or dataset info, so that every rank
can be given the same number of steps (:func:`~attndistill_hf.data.streaming.steps_per_epoch`).
"""

from __future__ import annotations

import functools
import glob
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..validation import OPTIONAL_POSITIVE_INT, POSITIVE_INT, Bound, check_fields, check_value
from .streaming import dataloader_workers
from .transforms import _DEFAULT_IMAGE_COLUMN, IMAGENET_MEAN, IMAGENET_STD, ImageCollator, eval_transform

# Column names the webdataset builder gives images and class indices (from the files' extensions).
WEBDATASET_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
WEBDATASET_LABEL_KEYS: tuple[str, ...] = ("cls",)

_SHARD_BUILDERS: dict[str, str] = {".parquet": "parquet", ".tar": "webdataset"}
_DEFAULT_LABEL_COLUMN = "label"
# The ranges of DataArguments' numeric fields (None: not given).
_DATA_BOUNDS: dict[str, Bound] = {
    "shuffle_buffer_size": POSITIVE_INT,
    "image_size": OPTIONAL_POSITIVE_INT,
    "max_train_samples": OPTIONAL_POSITIVE_INT,
    "max_eval_samples": OPTIONAL_POSITIVE_INT,
    "num_train_examples": OPTIONAL_POSITIVE_INT,
}


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
        check_fields(self, _DATA_BOUNDS)

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

    check_value("limit", limit, OPTIONAL_POSITIVE_INT)

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


# --------------------------------------------------------------------------------------------------
# Sizes (streaming has no len())
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
