"""The teacher's normalisation, the published views, and the collator that decodes, augments and batches.

Augmentation is the published one: RandomResizedCrop(scale 0.2-1, bicubic) + flip + the teacher's
normalisation; evaluation resizes to 256/224 of the crop and centre-crops; the linear probe trains on DINO's
view. :class:`ImageCollator` decodes in the DataLoader workers, where a corrupt file can be skipped, and
carries the count of skipped images inside the batch (``skipped_images``) because workers are separate
processes.

Reproducible views: an example that carries an :class:`ExampleKey` (the trainer attaches one to every
training example) gets the random view drawn from a generator seeded by :func:`view_seed` of the run's
seed, the epoch and the example's identity (its index in a map-style dataset, else a digest of its image),
not from the process's random state. A view then depends on nothing else: not on the DataLoader worker
that makes it, the number of workers, the other examples of its batch, or where a run was interrupted
and resumed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2

from ..validation import POSITIVE, POSITIVE_INT, check_value
from .decoding import decode_image, to_rgb

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The image column's name in datasets' image builders; sources rename webdataset columns to it.
_DEFAULT_IMAGE_COLUMN = "image"


# --------------------------------------------------------------------------------------------------
# Normalisation and views
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
    check_value("image std", list(std3), POSITIVE)
    return mean3, std3


def _check_transform_args(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    check_value("image_size", image_size, POSITIVE_INT)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (RGB), got {list(mean)} and {list(std)}")
    check_value("std", list(std), POSITIVE)


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
# Example keys and seeded views
# --------------------------------------------------------------------------------------------------

# The field under which a training example carries its ExampleKey (the trainer's data loading adds it).
EXAMPLE_KEY = "__example__"
# The batch field listing the identities of the batch's unreadable examples, when its examples carry keys.
UNREADABLE_IDS = "unreadable_ids"


class ExampleKey(NamedTuple):
    """What the view of a training example is a function of: the run's seed, the epoch and the example.

    ``index`` is the example's index in a map-style dataset. A streamed example has none: it is known by
    its image instead (:func:`example_id`).
    """

    seed: int
    epoch: int
    index: int | None = None


def derived_seed(*parts: object) -> int:
    """A seed that is a hash of ``parts`` (a purpose, the run's seed, the epoch, an example, ...).

    Different parts give unrelated seeds, the same parts the same seed in any process. 63 bits: a
    non-negative int64, fit for torch tensors and ``torch.Generator.manual_seed``.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def example_id(key: ExampleKey, example: Mapping[str, Any], image_column: str) -> int:
    """The identity of an example: its index, else a digest of its encoded image (the bytes, else the path).

    A streamed example's position depends on how many DataLoader workers share the stream, its image
    does not. Identical images share an identity, so within an epoch they also share their view. An
    example without image data is known by its other fields.
    """
    if key.index is not None:
        return key.index
    value = example.get(image_column)
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return derived_seed("bytes", hashlib.blake2b(value, digest_size=16).hexdigest())
    if isinstance(value, (str, os.PathLike)):
        return derived_seed("path", os.fspath(value))
    others = sorted((name, repr(field)) for name, field in example.items() if name not in (image_column, EXAMPLE_KEY))
    return derived_seed("fields", others)


def view_seed(key: ExampleKey, identity: int) -> int:
    """The seed of the view of example ``identity`` (:func:`example_id`) in ``key``'s run and epoch."""
    return derived_seed("view", key.seed, key.epoch, identity)


def seeded_view(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int | None) -> torch.Tensor:
    """``transform(image)`` with its random choices drawn from a generator seeded with ``seed``.

    torchvision's random transforms draw from the global CPU generator: it is forked, seeded for this
    view and restored, so that the view depends on ``seed`` alone and the process's random state is left
    as it was. ``seed=None`` draws from the global generator as the transform always does.
    """
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


class TrainView(NamedTuple):
    """One published training view of an image: its crop box in the decoded image's pixels, and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_train_view(image: Image.Image, seed: int, scale: tuple[float, float] = (0.2, 1.0)) -> TrainView:
    """The crop and flip that :func:`train_transform` draws for ``image`` under ``seeded_view(..., seed)``.

    The same draws in the same order from the same seeded generator (RandomResizedCrop's box, then
    RandomHorizontalFlip's coin), so ``apply_train_view(image, draw_train_view(image, seed))`` is that view,
    to the bit. A recorded view (the teacher-target cache keeps them) is reproduced from the box alone.
    """
    crop = v2.RandomResizedCrop(1, scale=scale)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        box = crop.make_params([to_rgb(image)])
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip keeps the image when rand >= p
    return TrainView(int(box["top"]), int(box["left"]), int(box["height"]), int(box["width"]), flip)


def apply_train_view(
    image: Image.Image,
    view: TrainView,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The published training view ``view`` of ``image``: crop, bicubic resize to ``image_size``, flip, normalise."""
    _check_transform_args(image_size, mean, std)
    cropped = v2.functional.resized_crop(
        to_rgb(image),
        view.top,
        view.left,
        view.height,
        view.width,
        [image_size, image_size],
        interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True,
    )
    if view.flip:
        cropped = v2.functional.horizontal_flip(cropped)
    return v2.Compose(_to_normalised_tensor(mean, std))(cropped)


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
        # The value's type only: a wrong column can hold a whole encoded image.
        raise ValueError(f"Label column {column!r} holds {type(value).__name__} values, not class indices.") from err


class ImageCollator:
    """Decodes, augments and batches examples in the DataLoader workers; undecodable images are skipped.

    Returns ``{"pixel_values": float [B', 3, H, W], "labels": long [B'] (with a label column),
    "skipped_images": long scalar}`` where B' = B minus the images that failed to decode. The count rides
    in the batch because workers are other processes; the trainer pops and sums it.

    Examples that carry an :class:`ExampleKey` (under ``EXAMPLE_KEY``) get views seeded by :func:`view_seed`,
    and the batch also lists the identities of its unreadable examples (``unreadable_ids``, a plain list
    that stays on the CPU) so that the trainer can count each unreadable example once however often it is
    read. Other examples draw from the global random state, as torchvision's transforms do.

    When every image of a batch fails, ``pixel_values`` has 0 rows (the right H and W) and
    ``labels`` 0 entries; the trainer skips such a batch. ``fill_skipped=True`` instead keeps the batch
    size constant (static shapes for ``torch.compile``, equal work across ranks) by adding other views of
    the batch's decoded images in place of the failed ones, each drawn with the failed example's own seed
    (so reproducible too); the count still reports the failures.
    """

    # The trainer attaches an ExampleKey to the training examples of a collator that reads them.
    uses_example_keys = True

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
        # Every transform used here gives a fixed shape whatever the input; measure it once, with a fixed
        # seed so that the probe leaves the process's random state alone.
        if self._empty_shape is None:
            probe = Image.new("RGB", (64, 64), (128, 128, 128))
            self._empty_shape = tuple(seeded_view(self.transform, probe, 0).shape)
        return self._empty_shape

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        images: list[Image.Image] = []
        labels: list[int] = []
        seeds: list[int | None] = []  # of the decoded images' views
        failed_seeds: list[int | None] = []  # of the failed examples, for their fill-in views
        unreadable: list[int] = []
        for example in examples:
            if self.image_column not in example:
                raise KeyError(f"Example has no image column {self.image_column!r}; its columns are {sorted(example)}")
            key = example.get(EXAMPLE_KEY)
            identity = seed = None
            if key is not None:
                identity = example_id(key, example, self.image_column)
                seed = view_seed(key, identity)
            image = decode_image(example[self.image_column])
            if image is None:
                failed_seeds.append(seed)
                if identity is not None:
                    unreadable.append(identity)
                continue
            images.append(image)
            seeds.append(seed)
            if self.label_column is not None:
                labels.append(_label(example, self.label_column))
        skipped = len(examples) - len(images)
        views = list(enumerate(seeds))
        if self.fill_skipped and images and skipped:
            views += [(i % len(images), seed) for i, seed in enumerate(failed_seeds)]
        if views:
            pixel_values = torch.stack([seeded_view(self.transform, images[i], seed) for i, seed in views])
        else:
            pixel_values = torch.empty((0, *self._output_shape()), dtype=torch.float32)
        batch: dict[str, Any] = {"pixel_values": pixel_values}
        if self.label_column is not None:
            batch["labels"] = torch.tensor([labels[i] for i, _ in views], dtype=torch.long)
        batch["skipped_images"] = torch.tensor(skipped, dtype=torch.long)
        if any(EXAMPLE_KEY in example for example in examples):
            batch[UNREADABLE_IDS] = unreadable
        return batch
