"""Teacher targets computed once: the teacher's CLS target and CLS-attention rows for K recorded views per image.

With a large teacher the teacher is the cost of distillation (a DINOv3 ViT-7B forward is about 100 ViT-S/16
training steps per image), and every seed, ablation setting and later student pays it again. A target cache
runs the teacher once over ``views_per_image`` published views of every image and keeps, per view, what a
training step reads from it: the crop box and flip (so the view is reproduced exactly from the image), the
CLS target and the last-layer CLS-attention row of every head (CLS key, then patches; registers dropped).
Training from it (``--teacher_targets``) loads no teacher: each epoch an image gets one of its stored views,
drawn from (seed, epoch, image), and the loss reads the stored targets.

On disk a cache is a ``datasets`` dataset (``datasets.load_dataset(PATH)`` reads it): parquet shards under
``data/``, a dataset card, and ``attndistill_cache.json`` (:class:`CacheInfo`: the teacher, its precision,
the image size, patch grid, heads, the augmentation and its settings, the storage dtype, the library
version). The cache is written only whole: shards are renamed into place when complete, so an interrupted
run resumes where it stopped (images already in a complete shard are skipped), and the info file, which
readers require, is written last.

Targets are stored in float16 by default (bfloat16 is kept as its 16 bits, float32 on request): a stored
target differs from the live one only by that rounding (bounds in docs/method.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from . import __version__
from .data.decoding import decode_image
from .data.transforms import (
    EXAMPLE_KEY,
    UNREADABLE_IDS,
    ExampleKey,
    TrainView,
    apply_train_view,
    derived_seed,
    example_id,
)
from .hub import public_name
from .teacher import TeacherTargets

logger = logging.getLogger(__name__)

INFO_FILE = "attndistill_cache.json"
FORMAT_VERSION = 1
# How stored targets are kept: parquet has float16 and float32; bfloat16 keeps its 16 bits in an int16 column.
STORAGE_DTYPES = {"float16": "float16", "bfloat16": "int16", "float32": "float32"}
# The published training view (data/transforms.py train_transform): what a cache's views are drawn from.
PUBLISHED_AUGMENTATION = {
    "name": "published",
    "crop": "RandomResizedCrop",
    "scale": [0.2, 1.0],
    "ratio": [3 / 4, 4 / 3],
    "interpolation": "bicubic",
    "antialias": True,
    "flip_probability": 0.5,
}


class CacheMismatchError(ValueError):
    """A target cache that does not fit the run (image size, patch grid, images, augmentation)."""


@dataclass
class CacheInfo:
    """What a target cache holds and how it was made (``attndistill_cache.json``)."""

    teacher: str
    teacher_revision: str | None
    teacher_class: str
    teacher_dtype: str
    teacher_config: dict[str, Any]
    hidden_size: int
    heads: int | None  # None: no attention rows stored (a cache for projector-only students)
    image_size: int
    patch_grid: list[int]
    tokens_dropped: int  # tokens of the teacher's sequence that are neither CLS nor patch (registers, ...)
    # How images are identified: "index" (their index in a map-style dataset) or "image" (a digest of the
    # encoded image: streams). A run must read its data the same way.
    keyed_by: str
    views_per_image: int
    seed: int
    storage_dtype: str
    mean: list[float]
    std: list[float]
    dataset: str
    num_images: int = 0
    unreadable_images: int = 0
    augmentation: dict[str, Any] = field(default_factory=lambda: dict(PUBLISHED_AUGMENTATION))
    library_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def with_attention(self) -> bool:
        return self.heads is not None

    @property
    def keys(self) -> int:
        """CLS and patch keys of a stored attention row."""
        return 1 + self.patch_grid[0] * self.patch_grid[1]

    def features(self) -> datasets.Features:
        stored = STORAGE_DTYPES[self.storage_dtype]
        columns: dict[str, Any] = {
            "example": datasets.Value("int64"),  # the example's identity (data/transforms.example_id)
            "image": datasets.Value("int64"),  # a digest of its encoded image: checks the images are the same
            "view": datasets.Value("int16"),
            "crop": datasets.Sequence(datasets.Value("int32"), length=4),  # top, left, height, width
            "flip": datasets.Value("bool"),
            "cls": datasets.Sequence(datasets.Value(stored), length=self.hidden_size),
        }
        if self.heads is not None:
            columns["attention"] = datasets.Array2D((self.heads, self.keys), stored)
        return datasets.Features(columns)

    def save(self, folder: Path) -> None:
        (folder / INFO_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> CacheInfo:
        path = folder / INFO_FILE
        if not path.is_file():
            raise CacheMismatchError(
                f"{folder} has no {INFO_FILE}: it is not a teacher-target cache, or its writing did not finish "
                "(run recipes/cache_teacher.py again with the same arguments to complete it)."
            )
        values = json.loads(path.read_text())
        if values.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{path} is of cache format {values.get('format_version')}; this library reads format {FORMAT_VERSION}."
            )
        return cls(**values)


def teacher_reference(name_or_path: str) -> str:
    """How a cache names its teacher: a Hub id as given, a local folder by its name (a cache is published with its
    info file, which must hold no local path)."""
    return public_name(name_or_path)


def encoded_image(example: Mapping[str, Any], image_column: str) -> Any:
    """The example's image as stored: its value, or for an image known by its path only, the file's bytes.

    Read once, both the decoded pixels and :func:`image_identity` come from the same bytes: a file rewritten
    between two reads could otherwise pass the check with one image and train on another.
    """
    value = example.get(image_column)
    path = value.get("path") if isinstance(value, Mapping) and not value.get("bytes") else value
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        with open(path, "rb") as file:
            return file.read()
    return value


def image_identity(example: Mapping[str, Any], image_column: str, encoded: Any = None) -> int:
    """A digest of the example's encoded image (``encoded``, else :func:`encoded_image`): the same image gives the
    same one, and a file rewritten in place another."""
    if encoded is None:
        encoded = encoded_image(example, image_column)
    return example_id(ExampleKey(0, 0), {**example, image_column: encoded}, image_column)


def stored_view_seed(cache_seed: int, identity: int, view: int) -> int:
    """The seed of stored view ``view`` of example ``identity``."""
    return derived_seed("cached-view", cache_seed, identity, view)


def chosen_view(key: ExampleKey, identity: int, views_per_image: int) -> int:
    """Which stored view an example is trained on in ``key``'s run and epoch: a function of (seed, epoch, example)."""
    return derived_seed("cache-choice", key.seed, key.epoch, identity) % views_per_image


def encode_targets(values: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """``values`` in the storage dtype, as numpy (bfloat16 as its int16 bits)."""
    if storage_dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return values.to(getattr(torch, storage_dtype)).cpu().numpy()


def decode_targets(values: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored values back as float32."""
    if storage_dtype == "bfloat16":  # the formatter widens the int16 bits: narrow them back first
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(values)).float()


# In float16, attention rows are stored as log-probabilities: float16 flushes probabilities below 6e-8 to 0
# and keeps those below 6e-5 with few bits, and where head counts differ the loss fuses heads through their
# logarithms (a 0 would weigh as 1e-30); a logarithm keeps small probabilities to a relative precision.
# bfloat16 has float32's range: it keeps the probabilities themselves.
def encode_attention(rows: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """CLS-attention rows ``[B, H, T]`` for storage (their logarithm in float16)."""
    return encode_targets(rows.float().log() if storage_dtype == "float16" else rows, storage_dtype)


def decode_attention(values: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored rows back as float32 probabilities; from 16 bits renormalised, since the rounding leaves each row's
    sum off 1 by up to a few thousandths."""
    rows = decode_targets(values, storage_dtype)
    if storage_dtype == "float32":
        return rows
    if storage_dtype == "float16":
        rows = rows.exp()
    return rows / rows.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def shard_files(folder: Path) -> list[str]:
    """The cache's parquet shards, by absolute path, in name order."""
    return sorted(str(path.resolve()) for path in (folder / "data").glob("*.parquet"))


def hub_cache_folder(name: str, revision: str | None) -> Path:
    """The local snapshot of the cache published as Hub dataset ``name``; a one-line error for a local path that is
    no folder, and for a dataset that cannot be read."""
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        raise ValueError(
            f"--teacher_targets {name} is not a folder: give the folder that recipes/cache_teacher.py wrote, or a Hub "
            "dataset id."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", revision=revision))
    except (ValueError, OSError) as error:  # an invalid id, a missing or gated repo, no network
        raise ValueError(
            f"Cannot read the teacher-target cache {name!r} from the Hub: {error}\nGive the folder that "
            "recipes/cache_teacher.py wrote, or a Hub dataset id (with network access and, for gated repos, a login)."
        ) from None


class TargetCache:
    """A written cache: its info, and the stored view and targets of any (example, view)."""

    def __init__(self, path_or_hub_id: str | os.PathLike[str], revision: str | None = None) -> None:
        folder = Path(path_or_hub_id).expanduser()
        folder = self.folder = folder if folder.is_dir() else hub_cache_folder(str(path_or_hub_id), revision)
        self.info = CacheInfo.load(folder)
        # The shards by their absolute paths: datasets then keys its Arrow copy by those paths and their mtimes.
        # Loaded by folder, two caches in folders of the same name can share one stale copy.
        self.rows = datasets.load_dataset("parquet", data_files=shard_files(folder), split="train").with_format("numpy")
        examples = np.asarray(self.rows["example"], dtype=np.int64)
        views = np.asarray(self.rows["view"], dtype=np.int64)
        order = np.lexsort((views, examples))
        examples, views = examples[order], views[order]
        # An image that a stream holds twice (the same bytes: one identity) was cached twice: one row per view.
        first = np.ones(len(order), dtype=bool)
        first[1:] = (examples[1:] != examples[:-1]) | (views[1:] != views[:-1])
        self.order, self.sorted_examples = order[first], examples[first]
        counts = np.unique(self.sorted_examples, return_counts=True)[1]
        if len(counts) and ((counts != self.info.views_per_image).any() or views.max() >= self.info.views_per_image):
            raise CacheMismatchError(
                f"{folder}: some images have another number of views than views_per_image "
                f"{self.info.views_per_image}; the cache is damaged."
            )

    def __len__(self) -> int:
        return len(self.sorted_examples) // max(1, self.info.views_per_image)

    def describe(self, name: str) -> str:
        """One sentence for a model card: which cache, of which teacher, how many views, stored how."""
        info = self.info
        return (
            f"the teacher-target cache `{public_name(name)}`: {info.views_per_image} recorded view(s) of each of "
            f"{info.num_images} images at {info.image_size} px, targets stored as {info.storage_dtype}; each image "
            "was trained on one of its stored views per epoch."
        )

    def row(self, identity: int, view: int) -> int:
        """The row of view ``view`` of example ``identity``; a CacheMismatchError when the cache lacks it."""
        position = int(np.searchsorted(self.sorted_examples, identity))
        if position >= len(self.sorted_examples) or self.sorted_examples[position] != identity:
            raise CacheMismatchError(
                f"Image {identity} of the training data is not in the teacher-target cache {self.folder}: the cache "
                "was made from other images."
            )
        return int(self.order[position + view])

    def read(self, rows: Sequence[int]) -> dict[str, Any]:
        """The stored columns of ``rows``: image digests, views, and the targets as float32 tensors."""
        info = self.info
        if not rows:
            empty = {"image": [], "views": [], "cls": torch.empty(0, info.hidden_size)}
            return empty | ({"attention": torch.empty(0, info.heads, info.keys)} if info.with_attention else {})
        values = self.rows[list(rows)]
        boxes = zip(values["crop"], values["flip"], strict=True)
        views = [TrainView(*map(int, crop), bool(flip)) for crop, flip in boxes]
        out = {"image": values["image"], "views": views, "cls": decode_targets(values["cls"], info.storage_dtype)}
        if info.with_attention:
            out["attention"] = decode_attention(values["attention"], info.storage_dtype)
        return out


def check_cache_run(info: CacheInfo, args: Any, *, image_size: int, needs_attention: bool) -> None:
    """Refuse a cache that does not fit the run (``args``: its AttnDistillConfig), before training, naming the
    mismatch. Any student grid and head count fit: the loss resizes and fuses the stored rows as it does a live
    teacher's (cases b and c)."""
    if info.image_size != image_size:
        raise CacheMismatchError(
            f"The teacher-target cache holds {info.image_size} px views; this run crops {image_size} px "
            f"(--image_size {info.image_size}, or a cache made at {image_size} px)."
        )
    if info.augmentation != PUBLISHED_AUGMENTATION:
        raise CacheMismatchError(
            f"The teacher-target cache's views are of another augmentation ({info.augmentation}); this library "
            "reproduces the published one."
        )
    if needs_attention and not info.with_attention:
        raise CacheMismatchError(
            "The teacher-target cache holds no attention rows, and a student of this run is guided by the teacher's "
            "attention (attn_loss_weight > 0)."
        )
    if args.teacher_dtype not in ("float32", info.teacher_dtype):
        raise CacheMismatchError(
            f"--teacher_dtype {args.teacher_dtype}: the teacher-target cache was made with the teacher's weights in "
            f"{info.teacher_dtype}; a run from it has no teacher to load (drop --teacher_dtype)."
        )
    if args.teacher_sharding != "none":  # a config's setting for the teacher this run does not load
        logger.info("--teacher_sharding %s: no teacher to shard (its targets are stored).", args.teacher_sharding)


def check_cache_covers(
    cache: TargetCache, dataset: Any, image_column: str, *, streaming: bool, probes: int = 8
) -> None:
    """Refuse training data that is not the data of the cache, before training: the way images are identified,
    the number of a map-style dataset's images, and the stored image digests of its first ``probes`` images."""
    info = cache.info
    needed = "image" if streaming else "index"
    if info.keyed_by != needed:
        how = {"image": "a stream (--streaming true)", "index": "prepared data (--streaming false)"}
        raise CacheMismatchError(
            f"The teacher-target cache was made from {how[info.keyed_by]}; this run reads {how[needed]}. Read the data "
            "as the cache did."
        )
    if streaming:  # the first images of this process's stream; the rest are checked as they are read
        for example in itertools.islice(dataset, probes):
            if decode_image(example[image_column]) is not None:
                cache.row(example_id(ExampleKey(0, 0), example, image_column), 0)
        return
    if len(dataset) != info.num_images + info.unreadable_images:
        raise CacheMismatchError(
            f"The training data has {len(dataset)} images; the teacher-target cache was made from "
            f"{info.num_images + info.unreadable_images}: it holds the targets of other images."
        )
    for index in range(min(probes, len(dataset))):
        example = dataset[index]
        encoded = encoded_image(example, image_column)
        if decode_image(encoded) is None:
            continue  # unreadable then as now: not in the cache
        stored = cache.read([cache.row(index, 0)])["image"][0]
        if int(stored) != image_identity(example, image_column, encoded):
            raise CacheMismatchError(
                f"Image {index} of the training data is another image than the cache's image {index}: the teacher-"
                "target cache was made from other images (or the data changed since)."
            )


def cached_targets(batch: Mapping[str, Any], info: CacheInfo) -> TeacherTargets:
    """A batch's stored targets as :class:`~attndistill_hf.teacher.TeacherTargets` (what a live teacher would give)."""
    return TeacherTargets(
        cls=batch["teacher_cls"],
        attention=batch.get("teacher_attention"),
        grid=(info.patch_grid[0], info.patch_grid[1]),
    )


class CachedViewCollator:
    """Decodes training examples and makes each one's stored view, with the view's stored targets.

    The counterpart of :class:`~attndistill_hf.data.ImageCollator` for a run from a cache: the view of an
    example in an epoch is its stored view :func:`chosen_view` (a function of the run's seed, the epoch and
    the example), cropped and flipped as recorded, so the image matches the targets the teacher gave for it.
    An undecodable image is skipped and counted; with ``fill_skipped`` another example of the batch takes its
    place with one of that example's own stored views (same batch size on every process).
    """

    uses_example_keys = True

    def __init__(self, cache: TargetCache, image_column: str = "image", *, fill_skipped: bool = False) -> None:
        self.cache = cache
        self.image_column = image_column
        self.fill_skipped = fill_skipped

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        info = self.cache.info
        decoded: list[tuple[Image.Image, int, int]] = []  # image, identity, digest
        picks: list[tuple[int, int]] = []  # (decoded image, stored row) of each view of the batch
        failed: list[tuple[int, ExampleKey]] = []
        for example in examples:
            key = example[EXAMPLE_KEY]
            identity = example_id(key, example, self.image_column)
            encoded = encoded_image(example, self.image_column)
            image = decode_image(encoded)
            if image is None:
                failed.append((identity, key))
                continue
            picks.append((len(decoded), self.cache.row(identity, chosen_view(key, identity, info.views_per_image))))
            decoded.append((image, identity, image_identity(example, self.image_column, encoded)))
        if self.fill_skipped and decoded:
            for i, (identity, key) in enumerate(failed):
                stand_in = i % len(decoded)
                view = chosen_view(key, identity, info.views_per_image)
                picks.append((stand_in, self.cache.row(decoded[stand_in][1], view)))
        stored = self.cache.read([row for _, row in picks])
        for (i, _), digest in zip(picks, stored["image"], strict=True):
            if int(digest) != decoded[i][2]:
                raise CacheMismatchError(
                    f"Example {decoded[i][1]} is another image than the one the teacher-target cache "
                    f"{self.cache.folder} was made from: the training data changed since the cache was written."
                )
        size = info.image_size
        views = [
            apply_train_view(decoded[i][0], view, size, info.mean, info.std)
            for (i, _), view in zip(picks, stored["views"], strict=True)
        ]
        batch: dict[str, Any] = {
            "pixel_values": torch.stack(views) if views else torch.empty(0, 3, size, size),
            "teacher_cls": stored["cls"],
            "skipped_images": torch.tensor(len(failed), dtype=torch.long),
            UNREADABLE_IDS: [identity for identity, _ in failed],
        }
        if info.with_attention:
            batch["teacher_attention"] = stored["attention"]
        return batch
